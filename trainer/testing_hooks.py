"""Test-only fault injection, switched on by environment variables (never set them in real runs).

The fault tests (``tests/trainer/test_faults.py``) must kill or disturb a training subprocess at an exact
point; sleeping in the trainer at that point makes it deterministic. Every hook prints one line
starting with :data:`MARKER` to stderr when it fires, which is what the tests wait for.

``NPU_KERNELS_TEST_PAUSE_AT_STEP=N``
    Sleep inside optimizer step N (after backward, before ``optimizer.step()``), up to
    :data:`PAUSE_SECONDS`; a SIGINT/SIGTERM ends the pause early so the graceful stop can be tested.
``NPU_KERNELS_TEST_PAUSE_IN_CHECKPOINT_WRITE=N``
    Sleep while checkpoint N is being written: the LoRA weights are in the staging directory, the
    optimizer, scheduler and RNG states are not yet.
``NPU_KERNELS_TEST_NAN_LOSS_AT_STEP=N``
    Turn the loss of optimizer step N into NaN (a numerical fault, without tuning a learning rate).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

MARKER = "[npu_kernels test hook]"
PAUSE_SECONDS = 120.0

PAUSE_AT_STEP = "NPU_KERNELS_TEST_PAUSE_AT_STEP"
PAUSE_IN_CHECKPOINT_WRITE = "NPU_KERNELS_TEST_PAUSE_IN_CHECKPOINT_WRITE"
NAN_LOSS_AT_STEP = "NPU_KERNELS_TEST_NAN_LOSS_AT_STEP"


def _step_from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _announce(message: str) -> None:
    print(f"{MARKER} {message}", file=sys.stderr, flush=True)


def pause(variable: str, step: int, what: str, wake: Callable[[], bool] = lambda: False) -> None:
    """Sleep if ``$variable`` names ``step``; return early once ``wake()`` is true."""
    if _step_from_env(variable) != step:
        return
    _announce(f"paused {what} {step} (pid {os.getpid()})")
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline and not wake():
        time.sleep(0.02)


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """``loss * nan`` at the step ``$NPU_KERNELS_TEST_NAN_LOSS_AT_STEP`` names, else ``loss``."""
    if _step_from_env(NAN_LOSS_AT_STEP) != step:
        return loss
    _announce(f"made the loss of step {step} NaN")
    return loss * float("nan")


def checkpoint_write_pause_enabled() -> bool:
    return _step_from_env(PAUSE_IN_CHECKPOINT_WRITE) is not None
