"""Stock vs the default optimize() on the tiny UNet, one process, interleaved rounds of 3 steps, one thread:
wall and thread CPU time, median per point. The code under test is the checkout named as TREE (default: this
one), so two commits can be compared process by process (``git worktree add /tmp/old <rev>``)::

    python benchmarks/results/cpu-2026-12-03-python-work/step_ab.py {fp32,bf16} ROUNDS [TREE]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

TREE = sys.argv[3] if len(sys.argv) > 3 else str(Path(__file__).resolve().parents[3])
sys.path.insert(0, TREE)
import torch  # noqa: E402

from benchmarks.memory_curve import CurvePoint, apply_point, build_step  # noqa: E402

NAMES = ["stock", "none"]


def main(precision: str, rounds: int) -> None:
    torch.set_num_threads(1)
    step = build_step("tiny", precision, torch.device("cpu"))
    for name in NAMES:
        apply_point(step.unet, CurvePoint(None if name == "stock" else "none"))
        step.step()
    wall: dict[str, list[float]] = {n: [] for n in NAMES}
    cpu: dict[str, list[float]] = {n: [] for n in NAMES}
    for r in range(rounds):
        for name in NAMES if r % 2 == 0 else NAMES[::-1]:
            apply_point(step.unet, CurvePoint(None if name == "stock" else "none"))
            step.step()
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(3):
                step.step()
            wall[name].append((time.perf_counter() - start) / 3)
            cpu[name].append((time.thread_time() - start_cpu) / 3)
    w = {n: statistics.median(v) for n, v in wall.items()}
    c = {n: statistics.median(v) for n, v in cpu.items()}
    print(f"{TREE} {precision} wall stock {w['stock'] * 1e3:.2f} ours {w['none'] * 1e3:.2f} speed {w['stock'] / w['none']:.3f}"
          f" | cpu stock {c['stock'] * 1e3:.2f} ours {c['none'] * 1e3:.2f} speed {c['stock'] / c['none']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
