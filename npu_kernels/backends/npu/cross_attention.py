"""Cross-attention on Ascend: the same ``npu_fusion_attention`` call as flash attention (one
torch_npu kernel serves every key/value length)."""
from __future__ import annotations

import torch

from npu_kernels.backends.npu.flash_attention import fusion_attention

Tensor = torch.Tensor


def cross_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """:func:`~npu_kernels.backends.npu.flash_attention.flash_attention` for short key/value sequences."""
    return fusion_attention(q, k, v, attn_mask, scale)
