"""PyTorch's ``scaled_dot_product_attention`` as an attention backend.

On CUDA it dispatches to FlashAttention-2 / cuDNN / memory-efficient kernels whose autograd
(registered by PyTorch) also saves only the output and the logsumexp. ``auto`` routes attention on
CUDA here unless a GPU benchmark showed our Triton kernel faster for that shape class (see
``backends._AUTO_PRIORITY``). It serves the two attention ops only, and cannot be forced. Under
``torch.compile`` it is also what the attention ops decompose into.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_kernels import registry


def not_supported_reasons(op: str, inputs: registry.Inputs) -> list[str]:
    if not isinstance(inputs, registry.AttentionInputs):
        return [f"sdpa serves attention only, not {op}"]
    return [f"dtype {t.dtype} is not floating point" for t in inputs.data if not t.is_floating_point()]


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Autograd-complete attention, the mask exactly as SDPA takes it (and given no gradient, as
    the ops promise). Also the attention ops' plain maths for compiled graphs."""
    if attn_mask is not None and attn_mask.requires_grad:
        attn_mask = attn_mask.detach()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


cross_attention = flash_attention
