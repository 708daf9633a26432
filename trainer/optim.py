"""The optimizer the flags ask for, and the learning rate ``--scale_lr`` makes of ``--learning_rate``.

* default: ``torch.optim.AdamW`` (diffusers' choice);
* ``--use_8bit_adam``: bitsandbytes' ``AdamW8bit`` (diffusers' flag; preflight refuses it when
  bitsandbytes is not installed);
* ``--use_npu_fused_adamw``: torch_npu's ``NpuFusedAdamW`` (one fused kernel over all parameters,
  what Ascend's recipes use; preflight refuses it off an NPU).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from trainer.errors import InputError


def scaled_learning_rate(args: argparse.Namespace, num_processes: int) -> float:
    """``--learning_rate``, times accumulation steps x per-device batch x processes with ``--scale_lr``."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def optimizer_class(args: argparse.Namespace) -> type:
    """The optimizer class for the flags (imports the optional library it needs)."""
    if args.use_8bit_adam and getattr(args, "use_npu_fused_adamw", False):
        raise InputError("--use_8bit_adam and --use_npu_fused_adamw exclude each other; choose one")
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional dependency, only for this flag
        except ImportError:
            raise InputError("--use_8bit_adam needs the bitsandbytes library: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit
    if getattr(args, "use_npu_fused_adamw", False):
        try:
            import torch_npu  # optional dependency: Ascend only
        except ImportError:
            raise InputError("--use_npu_fused_adamw needs an Ascend NPU with torch_npu installed") from None
        fused = getattr(getattr(torch_npu, "optim", None), "NpuFusedAdamW", None)
        if fused is None:
            raise InputError("--use_npu_fused_adamw: this torch_npu has no torch_npu.optim.NpuFusedAdamW")
        return fused
    return torch.optim.AdamW


# Devices where torch.optim.AdamW has a fused implementation the trainer uses.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter], learning_rate: float) -> Any:
    """The optimizer over ``params`` with diffusers' AdamW hyper-parameters.

    ``torch.optim.AdamW`` runs its fused implementation where every parameter is on a CUDA or CPU
    device: one kernel for all of SDXL's 1,120 LoRA tensors instead of a dozen small ops each (measured in
    benchmarks/results/cpu-2026-11-30/README.md), the same update up to rounding.
    """
    cls = optimizer_class(args)
    options: dict[str, Any] = {}
    if cls is torch.optim.AdamW and params and all(p.device.type in FUSED_ADAMW_DEVICES for p in params):
        options["fused"] = True
    return cls(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **options,
    )


def describe(optimizer: Any) -> str:
    """The optimizer's class name, with " (fused)" when it runs a fused implementation (summary.json)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    fused = any(group.get("fused") for group in getattr(inner, "param_groups", []))
    return type(inner).__name__ + (" (fused)" if fused else "")
