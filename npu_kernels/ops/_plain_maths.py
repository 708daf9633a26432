"""Each op's maths in plain, differentiable PyTorch: what a compiled graph gets instead of our custom
op where :func:`npu_kernels.backends.compiled_choice` says ``"decompose"``, so inductor can fuse it
with its neighbours. Same results as the ops (dtype, shapes, no gradient for attention masks); the
memory layout of the outputs is inductor's to choose."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def geglu(x: Tensor, approximate: str) -> Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    # Statistics and affine in float32 (float64 for float64 input), the result in x's dtype: the
    # op's contract, whatever autocast or the parameters' dtype would make of F.group_norm.
    acc = torch.promote_types(x.dtype, torch.float32)
    out = F.group_norm(
        x.to(acc), num_groups,
        weight.to(acc) if weight is not None else None,
        bias.to(acc) if bias is not None else None,
        eps,
    )
    return F.silu(out).to(x.dtype)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    mask = attn_mask.detach() if attn_mask is not None else None  # masks get no gradient
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


cross_attention = flash_attention
