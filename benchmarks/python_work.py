"""The Python work of one LoRA step, counted exactly: bytecodes executed and Python calls, stock vs ours.

On a host-bound step (batch 1 on a fast GPU, the tiny UNet on a CPU) the Python around each op is part
of the step's time, and on a shared 2-core machine seconds move by 10-20% between runs: these counts do
not move at all. With the ATen dispatch counts (``benchmarks/dispatch_counts.py``) they are the host
work of a step; what they leave out is the C++ of autograd and of the ops themselves. Forward and
backward both count (a CPU backward runs on the calling thread)::

    python -m benchmarks.python_work [--size tiny|full] [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.memory_curve import DEFAULT_LEVEL, PRECISIONS, CurvePoint, apply_point, build_step

ROOT = str(Path(__file__).resolve().parents[1]) + "/"


@dataclass
class PythonWork:
    """What one step executed in Python: ``bytecodes`` and ``calls`` in all, and bytecodes per source file."""

    bytecodes: int = 0
    calls: int = 0
    by_file: collections.Counter = field(default_factory=collections.Counter, repr=False)


def count_python_work(fn) -> PythonWork:
    """Run ``fn()`` under a tracer that counts every bytecode and every Python call it executes."""
    work = PythonWork()
    per_code: collections.Counter = collections.Counter()

    def tracer(frame, event, _arg):
        if event == "call":
            frame.f_trace_opcodes = True
            work.calls += 1
        elif event == "opcode":
            per_code[frame.f_code] += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    for code, n in per_code.items():
        work.bytecodes += n
        work.by_file[code.co_filename.removeprefix(ROOT).split("site-packages/")[-1]] += n
    return work


def step_work(size: str, precision: str, device: torch.device) -> dict[str, PythonWork]:
    """``{"stock": ..., "ours": ...}``: one LoRA step of ``size`` each, on the same model after two warm steps."""
    step = build_step(size, precision, device)
    result = {}
    for name, point in (("stock", CurvePoint(None)), ("ours", CurvePoint(DEFAULT_LEVEL))):
        apply_point(step.unet, point)
        step.step()
        step.step()  # caches (backend decisions, optimizer state) filled: the steady state is counted
        result[name] = count_python_work(step.step)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--files", type=int, default=12, help="source files to list by the bytecodes ours adds")
    options = parser.parse_args(argv)
    work = step_work(options.size, options.precision, torch.device("cpu"))
    stock, ours = work["stock"], work["ours"]
    print(f"one LoRA step, {options.size} UNet, {options.precision}: Python work, exact")
    print(f"  {'':8}{'bytecodes':>12}{'calls':>10}")
    for name, w in work.items():
        print(f"  {name:8}{w.bytecodes:>12,}{w.calls:>10,}")
    print(f"  {'ratio':8}{ours.bytecodes / stock.bytecodes:>12.3f}{ours.calls / stock.calls:>10.3f}")
    print("  bytecodes by file, ours minus stock:")
    files = set(stock.by_file) | set(ours.by_file)
    for path in sorted(files, key=lambda f: stock.by_file[f] - ours.by_file[f])[:options.files]:
        print(f"    {ours.by_file[path] - stock.by_file[path]:+9,}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
