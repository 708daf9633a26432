"""Numerical faults: a non-finite loss is never trained on or saved.

fp32/bf16 (no gradient scaler): the first NaN/inf loss stops the run before its optimizer update, so
the last good checkpoint and LoRA file stay as they were.

fp16 (accelerate's gradient scaler, as diffusers users expect): a non-finite loss gives non-finite
gradients, the scaler skips that optimizer step (weights, optimizer and scheduler untouched, the loss
scale halves) and training goes on; only ``--max_nonfinite_steps`` such steps *in a row* stop it.

The loss is judged once per optimizer step, from the value the loop reads anyway for its per-step
logging (averaged over processes and accumulation micro-steps), so every process decides the same and
the check adds no device synchronisation of its own. Before anything is written the weights are checked
too (finite losses can still come with overflowing updates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from trainer.errors import NonFiniteLossError, NonFiniteWeightsError

DEFAULT_MAX_NONFINITE_STEPS = 5


@dataclass
class NonFiniteLossPolicy:
    """Decides, step by step, whether a non-finite loss is skipped (fp16 with a scaler) or stops the run.

    ``scaler_skips``: a gradient scaler skips steps with non-finite gradients (fp16). ``max_consecutive``:
    with a scaler, how many non-finite steps in a row stop the run.
    """

    scaler_skips: bool
    max_consecutive: int = DEFAULT_MAX_NONFINITE_STEPS
    consecutive: int = 0
    total: int = 0  # non-finite loss steps seen (all skipped by the scaler, or the one that stopped the run)

    def check(self, loss: float, step: int, epoch: int) -> bool:
        """True when ``loss`` is finite. A non-finite one returns False (the scaler skips the step) or raises
        :class:`~trainer.errors.NonFiniteLossError` (no scaler, or ``max_consecutive`` in a row)."""
        if math.isfinite(loss):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if not self.scaler_skips:
            raise NonFiniteLossError(step, epoch, loss)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(step, epoch, loss, consecutive=self.consecutive)
        return False


def check_loss(loss: float, step: int, epoch: int) -> None:
    """Raise :class:`~trainer.errors.NonFiniteLossError` unless ``loss`` is finite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, epoch, loss)


def check_weights(parameters: Iterable[torch.Tensor], step: int, what: str) -> None:
    """Raise :class:`~trainer.errors.NonFiniteWeightsError` if any parameter holds NaN or inf."""
    for parameter in parameters:
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise NonFiniteWeightsError(step, what)
