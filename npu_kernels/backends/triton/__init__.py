"""The Triton backend: fused GEGLU, GroupNorm+SiLU, FlashAttention-2 and short-KV cross-attention.

``npu_kernels.backends`` imports this package only when ``import triton`` works, and calls the
module-level contract functions below (forward/backward pairs without autograd; the ops layer wraps
them in ``torch.library`` custom ops). One file per op:

* :mod:`.geglu`            -- ``geglu_forward`` / ``geglu_backward``
* :mod:`.group_norm_silu`  -- ``group_norm_silu_forward`` / ``group_norm_silu_backward``
* :mod:`.flash_attention`  -- ``flash_attention_forward`` / ``flash_attention_backward`` (FlashAttention-2)
* :mod:`.cross_attention`  -- ``cross_attention_forward`` / ``cross_attention_backward`` (Skv <= 256)

The kernels target CUDA GPUs. On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``,
set before ``triton`` is imported): slow, fp32/fp16 only, but it is how CI checks them without a GPU.
"""
from __future__ import annotations

import os

import torch

from npu_kernels import registry
from npu_kernels.backends.triton import cross_attention as _cross_attention
from npu_kernels.backends.triton import flash_attention as _flash_attention
from npu_kernels.backends.triton import geglu as _geglu
from npu_kernels.backends.triton import group_norm_silu as _group_norm_silu
from npu_kernels.backends.triton.cross_attention import cross_attention_backward, cross_attention_forward
from npu_kernels.backends.triton.flash_attention import flash_attention_backward, flash_attention_forward
from npu_kernels.backends.triton.geglu import geglu_backward, geglu_forward
from npu_kernels.backends.triton.group_norm_silu import group_norm_silu_backward, group_norm_silu_forward

Tensor = torch.Tensor

__all__ = [
    "geglu_forward", "geglu_backward",
    "group_norm_silu_forward", "group_norm_silu_backward",
    "flash_attention_forward", "flash_attention_backward",
    "cross_attention_forward", "cross_attention_backward",
    "not_supported_reasons", "interpreting",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _common_reasons(data: tuple[Tensor, ...], others: tuple[Tensor, ...]) -> list[str]:
    """Dtype checks on the data tensors; device checks on every tensor.

    ``others`` (affine parameters, attention masks) only need to be on the same device: the kernels
    read parameters in any floating dtype, and the ops layer turns boolean / lower-rank masks into
    the additive 4-D masks of q's dtype that the attention kernels take.
    """
    reasons: list[str] = []
    interp = interpreting()
    for dtype in dict.fromkeys(t.dtype for t in data):  # unique, in order
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {dtype} not supported (float16, bfloat16, float32 only)")
        elif dtype == torch.bfloat16 and interp:
            reasons.append("bf16 not supported by the Triton interpreter (TRITON_INTERPRET=1)")
    for t in others:
        if t.dtype != torch.bool and not t.is_floating_point():
            reasons.append(f"dtype {t.dtype} not supported for parameters / masks")
    everything = (*data, *others)
    for device in dict.fromkeys(t.device.type for t in everything):
        if device not in ("cuda", "meta") and not interp:  # meta: a report describing a CUDA device
            reasons.append(f"device {device}: the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")
    if len({t.device for t in everything}) > 1:
        reasons.append("tensors are on different devices")
    return reasons


def not_supported_reasons(op: str, inputs: registry.Inputs) -> list[str]:
    """Why this backend cannot serve ``op`` for these inputs; an empty list means it can."""
    if op == "geglu":
        return _common_reasons(inputs.data, inputs.others) + _geglu.not_supported_reasons(inputs.x)
    if op == "group_norm_silu":
        return _common_reasons(inputs.data, inputs.others) + _group_norm_silu.not_supported_reasons(inputs.x)
    if op in ("flash_attention", "cross_attention"):
        q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.attn_mask
        reasons = _common_reasons(inputs.data, inputs.others) + _flash_attention.not_supported_reasons(q, k, v, mask)
        if op == "cross_attention":
            reasons += _cross_attention.not_supported_reasons(q, k)
        return reasons
    return [f"unknown op {op!r} for the Triton backend"]
