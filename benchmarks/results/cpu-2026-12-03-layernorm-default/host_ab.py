"""A/B of the host-bound step in one process: stock, the default keeping its LayerNorm outputs (as before
2026-12-03) and the default rebuilding them; the tiny UNet, interleaved rounds of 3 timed steps each.

    python benchmarks/results/cpu-2026-12-03-layernorm-default/host_ab.py {fp32,bf16} ROUNDS
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import MethodType

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks.memory_curve import CurvePoint, apply_point, build_step  # noqa: E402

NAMES = ["stock", "none_keep_ln", "none"]


def main(precision: str, rounds: int) -> None:
    step = build_step("tiny", precision, torch.device("cpu"))

    def apply(name: str) -> None:
        apply_point(step.unet, CurvePoint(None if name == "stock" else "none"))
        if name == "none_keep_ln":  # the LayerNorms' own forward again: their outputs are kept, not rebuilt
            for module in step.unet.modules():
                if type(module) is nn.LayerNorm and "forward" in module.__dict__:
                    module.forward = MethodType(nn.LayerNorm.forward, module)

    for name in NAMES:
        apply(name)
        step.step()
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    for r in range(rounds):
        for name in NAMES[r % 3:] + NAMES[:r % 3]:
            apply(name)
            step.step()
            start = time.perf_counter()
            for _ in range(3):
                step.step()
            times[name].append((time.perf_counter() - start) / 3)
    m = {name: statistics.median(values) for name, values in times.items()}
    print(precision, " ".join(f"{n} {v * 1e3:.1f}ms" for n, v in m.items()), "| speed vs stock:",
          " ".join(f"{n} {m['stock'] / m[n]:.3f}" for n in NAMES[1:]), f"| new/old time {m['none'] / m['none_keep_ln']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
