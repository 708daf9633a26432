"""What the two attention ops share: their spec (kernels, saved tensors, checks, mask conversion).

Both ops share the maths, the checks and the autograd; they differ in the kernel a backend runs:
``cross_attention`` is for key/value sequences of at most 256 tokens (SDXL's 77 text tokens), which
a kernel can hold in one block without an online-softmax loop.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from npu_kernels.backends import sdpa
from npu_kernels.ops._build import BuiltOp, build
from npu_kernels.registry import AttentionInputs, OpSpec

Tensor = torch.Tensor
CROSS_ATTENTION_MAX_KV = 256


def _out_like_sdpa(q: Tensor, v: Tensor) -> Tensor:
    """``[B, H, Sq, Dv]`` stored as ``[B, Sq, H, Dv]``: what diffusers reshapes to next, for free."""
    batch, heads, seq_q, _ = q.shape
    return q.new_empty((batch, seq_q, heads, v.shape[-1])).transpose(1, 2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    """The logsumexp is float32 (float64 for float64 inputs, the reference)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32  # promote_types would dispatch an op


def _finish(outputs: tuple, args: tuple, backend: str) -> tuple:
    """One output layout and logsumexp dtype for every backend, the ones the fake impl describes."""
    out, lse = outputs
    q, _k, v = args[:3]
    if out.stride() != _sdpa_strides(q, v):
        out = _out_like_sdpa(q, v).copy_(out)
    if lse.dtype != _lse_dtype(q) or not lse.is_contiguous():
        lse = lse.to(_lse_dtype(q)).contiguous()
    return out, lse


def _sdpa_strides(q: Tensor, v: Tensor) -> tuple[int, ...]:
    """The strides of :func:`_out_like_sdpa`, without allocating it."""
    _batch, heads, seq_q, _ = q.shape
    dv = v.shape[-1]
    return (seq_q * heads * dv, dv, heads * dv, 1)


def _fake(q, k, v, attn_mask, scale, backend):
    return _out_like_sdpa(q, v), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _kernel_args(args: tuple) -> tuple:
    """SDPA's masks as kernels take them: additive, 4-D, of q's dtype (boolean True = attend)."""
    q, k, v, attn_mask, scale = args
    if attn_mask is None:
        return args
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    else:
        attn_mask = attn_mask.to(q.dtype)
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return q, k, v, attn_mask, scale


def _validator(op: str, max_kv: int | None) -> Callable[..., tuple]:
    def validate(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None) -> tuple:
        if max_kv is not None and k.dim() == 4 and k.shape[2] > max_kv:
            raise ValueError(f"{op}: key/value length {k.shape[2]} exceeds {max_kv}; use flash_attention")
        _check(op, q, k, v, attn_mask)
        return q, k, v, attn_mask, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    return validate


def attention_op(op: str, max_kv: int | None = None) -> BuiltOp:
    """Declare and build the attention op ``op`` (``flash_attention`` or ``cross_attention``)."""
    return build(OpSpec(
        name=op,
        inputs=AttentionInputs,
        schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> (Tensor out, Tensor lse)",
        forward_kernel=f"{op}_forward",
        backward_kernel=f"{op}_backward",
        backward_schema=(
            "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, float scale)"
            " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)"
        ),
        # Output and logsumexp: the probabilities are recomputed blockwise in the backward.
        saves=("q", "k", "v", "attn_mask", "out", "lse"),
        validate=_validator(op, max_kv),
        fake=_fake,
        plain_maths=sdpa.flash_attention,  # masks get no gradient there either
        finish=_finish,
        kernel_args=_kernel_args,
    ))


def _check(op: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be [B, H, S, D]; got {_shapes(q, k, v)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: incompatible shapes {_shapes(q, k, v)} (need q [B,H,Sq,D], k [B,H,Skv,D], v [B,H,Skv,Dv])")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if attn_mask is not None:
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), full)
        except RuntimeError:
            raise ValueError(f"{op}: attn_mask {tuple(attn_mask.shape)} does not broadcast to {full}") from None
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}")


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
