"""Cross-attention for short key/value sequences (``Skv <= 256``: SDXL's 77 text tokens)."""
from __future__ import annotations

import torch

from npu_kernels.ops._attention import CROSS_ATTENTION_MAX_KV, register, run

Tensor = torch.Tensor

_REGISTERED = register("cross_attention")


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """:func:`~npu_kernels.flash_attention` for short key/value sequences (``Skv <= 256``).

    Same arguments, maths and result; backends may hold all of K/V in one block (no online-softmax
    loop). No rotary embeddings.
    """
    if k.dim() == 4 and k.shape[2] > CROSS_ATTENTION_MAX_KV:
        raise ValueError(
            f"cross_attention: key/value length {k.shape[2]} exceeds {CROSS_ATTENTION_MAX_KV}; use flash_attention"
        )
    return run("cross_attention", _REGISTERED, q, k, v, attn_mask, scale)
