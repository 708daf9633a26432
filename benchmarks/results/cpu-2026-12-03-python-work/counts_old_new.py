"""ATen dispatches (all / kernel-launching) and saved-for-backward bytes of one tiny-UNet LoRA step, stock vs
the default, for the checkout named as TREE: run it on two commits (``git worktree add /tmp/old <rev>``) to see
that a host-work change leaves both exactly as they were::

    python benchmarks/results/cpu-2026-12-03-python-work/counts_old_new.py TREE
"""
from __future__ import annotations

import sys

TREE = sys.argv[1]
sys.path.insert(0, TREE)
import torch  # noqa: E402

from benchmarks.dispatch_counts import count_dispatches  # noqa: E402
from benchmarks.memory import saved_bytes  # noqa: E402
from benchmarks.memory_curve import CurvePoint, apply_point, build_step  # noqa: E402

for precision in ("fp32", "bf16"):
    step = build_step("tiny", precision, torch.device("cpu"))
    for name, level in (("stock", None), ("default", "none")):
        apply_point(step.unet, CurvePoint(level))
        step.step()
        step.step()
        counts = count_dispatches(step.step)
        saved = saved_bytes(step.loss, exclude=list(step.unet.parameters()))
        print(f"{TREE} {precision} {name}: dispatched {counts.dispatched}, launching {counts.launching}, saved {saved} bytes")
