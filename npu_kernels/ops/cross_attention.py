"""Cross-attention for short key/value sequences (``Skv <= 256``: SDXL's 77 text tokens)."""
from __future__ import annotations

import torch

from npu_kernels.ops._attention import CROSS_ATTENTION_MAX_KV, attention_op

Tensor = torch.Tensor

_CROSS_ATTENTION = attention_op("cross_attention", max_kv=CROSS_ATTENTION_MAX_KV)


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """:func:`~npu_kernels.flash_attention` for short key/value sequences (``Skv <= 256``).

    Same arguments, maths and result; backends may hold all of K/V in one block (no online-softmax
    loop). No rotary embeddings.
    """
    return _CROSS_ATTENTION(q, k, v, attn_mask, scale)
