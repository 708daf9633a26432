"""What every numeric and choice flag of ``python -m trainer.sdxl_lora`` allows, checked before anything loads.

argparse only checks types (``--train_batch_size 0`` parses); a value outside what the run can use would
otherwise reach a library error, or worse, train nothing and exit 0 (``--max_train_steps -3``). Each rule
is one row of :data:`NUMBER_RULES` / :data:`CHOICE_RULES`; :func:`check` raises
:class:`~trainer.errors.InputError` with one line naming the flag, the value and what is allowed.
Zero is never a silent "off": ``--checkpointing_steps 0`` and ``--checkpoints_total_limit 0`` are refused
with what to pass instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from trainer.errors import InputError


@dataclass(frozen=True)
class NumberRule:
    """``flag`` must be finite and ``>= minimum`` (``> minimum`` when ``strict``), ``< below`` when given;
    ``None`` is allowed only for flags whose default is None."""

    flag: str
    minimum: float
    strict: bool = False
    below: float | None = None
    hint: str = ""

    def allowed(self) -> str:
        text = f"{'greater than' if self.strict else 'at least'} {_number(self.minimum)}"
        if self.below is not None:
            text += f" and below {_number(self.below)}"
        return text + (f" ({self.hint})" if self.hint else "")

    def check(self, value: Any) -> None:
        if value is None:
            return
        ok = math.isfinite(value) and (value > self.minimum if self.strict else value >= self.minimum)
        if ok and self.below is not None:
            ok = value < self.below
        if not ok:
            raise InputError(f"--{self.flag} {_number(value)}: expected {self.allowed()}")


NUMBER_RULES: tuple[NumberRule, ...] = (
    NumberRule("train_batch_size", 1),
    NumberRule("num_train_epochs", 1),
    NumberRule("max_train_steps", 1),
    NumberRule("gradient_accumulation_steps", 1),
    NumberRule("learning_rate", 0, strict=True),
    NumberRule("lr_warmup_steps", 0),
    NumberRule("rank", 1, hint="the LoRA dimension"),
    NumberRule("checkpointing_steps", 1, hint="to save no intermediate checkpoint, pass a value above --max_train_steps"),
    NumberRule("checkpoints_total_limit", 1, hint="leave the flag out to keep every checkpoint"),
    NumberRule("dataloader_num_workers", 0),
    NumberRule("num_validation_images", 0),
    NumberRule("validation_epochs", 1),
    NumberRule("validation_inference_steps", 1),
    NumberRule("max_grad_norm", 0, strict=True),
    NumberRule("adam_beta1", 0, below=1),
    NumberRule("adam_beta2", 0, below=1),
    NumberRule("adam_weight_decay", 0),
    NumberRule("adam_epsilon", 0, strict=True),
    NumberRule("snr_gamma", 0, strict=True),
    NumberRule("noise_offset", 0),
    NumberRule("max_train_samples", 1, hint="0 leaves no rows to train on"),
    NumberRule("max_nonfinite_steps", 1),
    NumberRule("logging_steps", 1),
    NumberRule("min_bucket_reso", 1),
    NumberRule("max_bucket_reso", 1),
    NumberRule("bucket_reso_steps", 1),
)

# diffusers.optimization.SchedulerType's values for get_scheduler (written out: importing diffusers takes seconds).
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant",
)  # fmt: skip
PREDICTION_TYPES = ("epsilon", "v_prediction")
# --report_to value -> the library accelerate needs for it (None: nothing to report to).
TRACKERS: dict[str, str | None] = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "none": None}

CHOICE_RULES: dict[str, tuple[str, ...]] = {
    "lr_scheduler": LR_SCHEDULERS,
    "prediction_type": PREDICTION_TYPES,
    "report_to": (*TRACKERS, "all"),
}


def check(args: argparse.Namespace) -> None:
    """Every rule of this module against ``args`` (flags a caller's namespace lacks are skipped)."""
    for rule in NUMBER_RULES:
        rule.check(getattr(args, rule.flag, None))
    for flag, allowed in CHOICE_RULES.items():
        value = getattr(args, flag, None)
        if value is not None and value not in allowed:
            raise InputError(f"--{flag} {value!r}: expected one of {', '.join(allowed)}")
    check_trackers(getattr(args, "report_to", None))


def check_trackers(report_to: str | None) -> None:
    """A tracker that is not installed would log nothing, with only a library warning: refused instead."""
    wanted = [name for name, lib in TRACKERS.items() if lib] if report_to == "all" else [report_to]
    for name in wanted:
        library = TRACKERS.get(name or "none")
        if library is not None and not _installed(library):
            if report_to == "all":
                continue  # "all": accelerate reports to those that are installed
            raise InputError(f"--report_to {name}: the {library} library is not installed (pip install {library}, or --report_to none)")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _number(value: float) -> str:
    """1.0 as ``1``, as a user types it; nan and inf as themselves."""
    return str(int(value)) if math.isfinite(value) and float(value).is_integer() else str(value)
