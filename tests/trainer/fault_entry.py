"""Test-only entry point: ``python -m tests.trainer.fault_entry [fault options] -- <trainer flags>``.

Runs ``trainer.sdxl_lora.cli`` with a :class:`~trainer.hooks.TrainingHooks` that injects the faults the
options ask for, so the fault tests can kill or disturb a training subprocess at an exact point. Every
fault prints one line starting with :data:`MARKER` to stderr when it fires; the tests wait for it.

``--pause_before_models_load``
    Sleep where the models are about to load, up to :data:`PAUSE_SECONDS` (a Ctrl-C there interrupts it as
    it would interrupt the loading).
``--pause_at_step N``
    Sleep inside optimizer step N (after backward, before ``optimizer.step()``), up to
    :data:`PAUSE_SECONDS`; a SIGINT/SIGTERM ends the pause early so the graceful stop can be tested.
``--pause_in_checkpoint_write N``
    Sleep while checkpoint N is being written (main process): the LoRA weights are in the staging
    directory, the optimizer, scheduler and RNG states are not yet.
``--nan_loss_at_steps N[,M...]``
    Turn the loss of those optimizer steps into NaN (a numerical fault, without tuning a learning rate).
``--stop_after_step N``
    Send this process a SIGTERM in optimizer step N (before its update): the run stops after step N.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from trainer.hooks import TrainingHooks
from trainer.sdxl_lora import cli

MARKER = "[npu_kernels test hook]"
PAUSE_SECONDS = 120.0


def _announce(message: str) -> None:
    print(f"{MARKER} {message}", file=sys.stderr, flush=True)


def _pause(what: str, wake: Callable[[], bool]) -> None:
    _announce(f"paused {what} (pid {os.getpid()})")
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline and not wake():
        time.sleep(0.02)


class FaultHooks(TrainingHooks):
    """The faults of the module docstring; each None/empty option injects nothing."""

    def __init__(
        self,
        pause_at_step: int | None = None,
        pause_in_checkpoint_write: int | None = None,
        nan_loss_at_steps: Sequence[int] = (),
        stop_after_step: int | None = None,
        pause_before_models_load: bool = False,
    ) -> None:
        self.pause_before_models_load = pause_before_models_load
        self.pause_at_step = pause_at_step
        self.pause_in_checkpoint_write = pause_in_checkpoint_write
        self.nan_loss_at_steps = set(nan_loss_at_steps)
        self.stop_after_step = stop_after_step

    def before_models_load(self) -> None:
        if self.pause_before_models_load:
            _pause("before the models load", lambda: False)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step not in self.nan_loss_at_steps:
            return loss
        _announce(f"made the loss of step {step} NaN")
        return loss * float("nan")

    def before_optimizer_step(self, step: int, stop_requested: Callable[[], bool]) -> None:
        if step == self.stop_after_step:
            _announce(f"sending SIGTERM to myself in step {step}")
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.pause_at_step:
            _pause(f"in optimizer step {step}", stop_requested)

    def inside_checkpoint_write(self, step: int, directory: Path) -> None:
        from accelerate import PartialState

        if step == self.pause_in_checkpoint_write and PartialState().is_main_process:
            _pause(f"writing checkpoint {step}", lambda: False)


def parse(argv: Sequence[str]) -> tuple[FaultHooks, list[str]]:
    """(hooks, the trainer's flags) from ``[fault options] [--] <trainer flags>``."""
    parser = argparse.ArgumentParser(prog="python -m tests.trainer.fault_entry")
    parser.add_argument("--pause_before_models_load", action="store_true")
    parser.add_argument("--pause_at_step", type=int)
    parser.add_argument("--pause_in_checkpoint_write", type=int)
    parser.add_argument("--nan_loss_at_steps", type=lambda text: [int(x) for x in text.split(",")], default=[])
    parser.add_argument("--stop_after_step", type=int)
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    hooks = FaultHooks(options.pause_at_step, options.pause_in_checkpoint_write, options.nan_loss_at_steps, options.stop_after_step,
                       options.pause_before_models_load)
    return hooks, argv[split + 1 :]


if __name__ == "__main__":
    fault_hooks, trainer_argv = parse(sys.argv[1:])
    sys.exit(cli(trainer_argv, hooks=fault_hooks))
