"""What a compiled graph should see of each op on this machine: our custom op or its plain maths.

    python -m benchmarks.compiled_routing [--dtype bf16] [--iterations 20] [--json out.json]

For every op, at small SDXL-like shapes, forward + backward timed three ways: eager (our op),
``torch.compile`` (inductor, ``fullgraph=True``) with the op as our custom op, and compiled with its
plain PyTorch maths (``backends.use_compiled``). Prints compile time (the first call's time beyond a
steady call's), the median and least time per call after that (the three timed in interleaved
rounds), and the graph breaks dynamo counted (must be 0).
The numbers feed ``backends._COMPILED_ROUTES``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters

import npu_kernels
from npu_kernels import backends, registry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    if op == "geglu":
        return (leaf(1, 1024, 2 * 640),)
    if op == "group_norm_silu":
        return leaf(1, 320, 32, 32), leaf(320), leaf(320)
    if op == "flash_attention":
        return leaf(1, 10, 1024, 64), leaf(1, 10, 1024, 64), leaf(1, 10, 1024, 64)
    return leaf(1, 10, 1024, 64), leaf(1, 10, 77, 64), leaf(1, 10, 77, 64)


def _call(op: str):
    if op == "group_norm_silu":
        return lambda x, w, b: npu_kernels.group_norm_silu(x, 32, w, b)
    return getattr(npu_kernels, op)


def _step(fn, inputs, device: torch.device) -> float:
    """Wall seconds of one forward + backward."""
    start = time.perf_counter()
    fn(*inputs).float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(op: str, device: torch.device, dtype: torch.dtype, iterations: int) -> list[dict]:
    """Eager, custom op and plain maths of one op, timed in interleaved rounds (a busy machine then
    slows all three alike); ``min_s`` is the least disturbed call, ``step_s`` the median."""
    inputs = _inputs(op, device, dtype)
    modes = ("eager",) + backends.COMPILED_CHOICES
    torch._dynamo.reset()
    fns, first, breaks = {}, {}, {}
    for mode in modes:
        counters.clear()
        fns[mode] = torch.compile(_call(op), fullgraph=True) if mode != "eager" else _call(op)
        # The choice is read while tracing and guarded on: every call runs inside its mode.
        with backends.use_compiled("auto" if mode == "eager" else mode):
            first[mode] = _step(fns[mode], inputs, device)  # compiles
            _step(fns[mode], inputs, device)  # anything built lazily on the first call
        breaks[mode] = sum(counters["graph_break"].values())
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(iterations):
        for mode in modes:
            with backends.use_compiled("auto" if mode == "eager" else mode):
                times[mode].append(_step(fns[mode], inputs, device))
    return [
        dict(
            op=op, mode=mode, dtype=str(dtype).replace("torch.", ""), device=device.type,
            compile_s=max(first[mode] - statistics.median(times[mode]), 0.0) if mode != "eager" else 0.0,
            step_s=statistics.median(times[mode]), min_s=min(times[mode]), graph_breaks=breaks[mode],
        )
        for mode in modes
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--op", choices=registry.decomposable_ops(), action="append")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(f"{'op':<16} {'dtype':<9} {'mode':<10} {'compile s':>9} {'median ms':>9} {'min ms':>9} {'min vs eager':>12} breaks")
    for dtype_name in args.dtype or ("fp32", "bf16"):
        for op in args.op or registry.decomposable_ops():
            op_rows = measure(op, device, DTYPES[dtype_name], args.iterations)
            eager = op_rows[0]["min_s"]
            for row in op_rows:
                row["speedup_vs_eager"] = eager / row["min_s"]
                print(f"{op:<16} {dtype_name:<9} {row['mode']:<10} {row['compile_s']:>9.2f} {row['step_s'] * 1e3:>9.3f} "
                      f"{row['min_s'] * 1e3:>9.3f} {row['speedup_vs_eager']:>11.2f}x {row['graph_breaks']}")
            rows += op_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
