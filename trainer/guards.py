"""Numerical faults stop the run instead of being trained on or saved.

A NaN/inf loss means this step's gradients (and, after ``optimizer.step()``, the LoRA weights) would be
garbage. The loop checks the loss averaged over all processes *before* backward, so every process stops
at the same step, nothing is updated, and nothing is saved: the last good checkpoint and LoRA file stay
as they were. Before anything is written the weights are checked too (finite losses can still come with
overflowing updates).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class TrainingAborted(RuntimeError):
    """The run cannot continue; the message says why and what was (not) saved. Exit status 1."""


class NonFiniteLossError(TrainingAborted):
    def __init__(self, step: int, epoch: int, loss: float) -> None:
        self.step, self.epoch, self.loss = step, epoch, loss
        super().__init__(
            f"Non-finite training loss ({loss}) at step {step} (epoch {epoch}): stopping before the optimizer"
            " update. Nothing from this step was saved; earlier checkpoints and the LoRA file are untouched."
            " Common causes: a learning rate too high, fp16 overflow (try --mixed_precision bf16 or an fp16-fix VAE"
            " via --vae_name), corrupt images. Resume with --resume_from_checkpoint latest after fixing it."
        )


class NonFiniteWeightsError(TrainingAborted):
    def __init__(self, step: int, what: str) -> None:
        self.step = step
        super().__init__(
            f"Non-finite LoRA weights after step {step}: refusing to write {what}. Earlier checkpoints and the"
            " LoRA file are untouched. Lower the learning rate or --max_grad_norm and resume from the last checkpoint."
        )


def check_loss(loss: float, step: int, epoch: int) -> None:
    """Raise :class:`NonFiniteLossError` unless ``loss`` is finite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, epoch, loss)


def check_weights(parameters: Iterable[torch.Tensor], step: int, what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` if any parameter holds NaN or inf."""
    for parameter in parameters:
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise NonFiniteWeightsError(step, what)
