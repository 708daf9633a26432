"""PyTorch's ``scaled_dot_product_attention`` as an attention backend.

On CUDA it dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels whose autograd
(registered by PyTorch) also saves only the output and the logsumexp. ``auto`` routes attention on
CUDA here unless a GPU benchmark showed our Triton kernel faster for that shape class (see
``backends._AUTO_PRIORITY``). It serves the two attention ops only, and cannot be forced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ATTENTION_OPS = ("flash_attention", "cross_attention")


def not_supported_reasons(op: str, *tensors: torch.Tensor | None) -> list[str]:
    if op not in _ATTENTION_OPS:
        return [f"sdpa serves attention only, not {op}"]
    return [f"dtype {t.dtype} is not floating point" for t in tensors[:3] if t is not None and not t.is_floating_point()]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Autograd-complete attention (the mask exactly as SDPA takes it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


cross_attention = flash_attention
