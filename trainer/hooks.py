"""Extension points of the training loop: a hooks object whose methods the loop calls at fixed points.

The default, :class:`TrainingHooks`, does nothing. Tests (``tests/trainer/fault_entry.py``) subclass it to
pause a run at an exact point, turn a loss into NaN or ask for a stop, and hand it to
``trainer.sdxl_lora.main(argv, hooks=...)``; the shipped trainer never builds anything else. A stop is
asked for as a user asks for it, with SIGINT/SIGTERM (:mod:`trainer.interrupts`): the loop has one stop
question, ``LoopCallbacks.stop_requested``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch


class TrainingHooks:
    """No-op hooks. ``step`` is always the optimizer step being made (1-based, as in checkpoint names)."""

    def before_models_load(self) -> None:
        """The output folder is this run's; the models are about to load (nothing trained yet)."""

    def on_batch(self, step: int, batch: dict[str, Any]) -> None:
        """A batch arrived from the dataloader (before its forward pass)."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-step's loss, before it is logged, checked and back-propagated; returns the loss to use."""
        return loss

    def before_optimizer_step(self, step: int, stop_requested: Callable[[], bool]) -> None:
        """After backward of the step's last micro-step, before clipping and ``optimizer.step()``.
        ``stop_requested()`` says whether a SIGINT/SIGTERM reached this process."""

    def inside_checkpoint_write(self, step: int, directory: Path) -> None:
        """In the middle of writing checkpoint ``step``: the LoRA layers are in the staging ``directory``,
        the optimizer, scheduler and RNG states are not yet."""
