"""Flash attention: non-causal ``softmax(q kᵀ·scale + mask) v`` for any sequence length."""
from __future__ import annotations

import torch

from npu_kernels.ops._attention import attention_op

Tensor = torch.Tensor

_FLASH_ATTENTION = attention_op("flash_attention")


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Memory-efficient non-causal attention, ``softmax(q kᵀ·scale + mask) v``.

    Args:
        q: ``[B, H, Sq, D]``; k: ``[B, H, Skv, D]``; v: ``[B, H, Skv, Dv]``.
        attn_mask: optional, broadcastable to ``[B, H, Sq, Skv]``: boolean (True = attend) or
            additive, as ``torch.nn.functional.scaled_dot_product_attention`` takes it. It gets no
            gradient.
        scale: defaults to ``1/sqrt(D)``.

    Returns:
        ``[B, H, Sq, Dv]`` of q's dtype. The backward saves only the output and the logsumexp.
    """
    return _FLASH_ATTENTION(q, k, v, attn_mask, scale)
