"""What the two attention ops share: the custom-op registration, the checks, the mask conversion.

Both ops share the maths, the checks and the autograd; they differ in the kernel a backend runs:
``cross_attention`` is for key/value sequences of at most 256 tokens (SDXL's 77 text tokens), which
a kernel can hold in one block without an online-softmax loop.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from npu_kernels import backends
from npu_kernels.ops._dispatch import compiled_plain_maths, direct, kernel, needs_grad, tracing

Tensor = torch.Tensor
CROSS_ATTENTION_MAX_KV = 256


def _out_like_sdpa(q: Tensor, v: Tensor) -> Tensor:
    """``[B, H, Sq, Dv]`` stored as ``[B, Sq, H, Dv]``: what diffusers reshapes to next, for free."""
    batch, heads, seq_q, _ = q.shape
    return q.new_empty((batch, seq_q, heads, v.shape[-1])).transpose(1, 2)


def _lse_dtype(q: Tensor) -> torch.dtype:
    """The logsumexp is float32 (float64 for float64 inputs, the reference)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32  # promote_types would dispatch an op


def register(op: str) -> tuple:
    """Define ``npu_kernels::{op}`` and its backward as custom ops with autograd; return both."""

    @torch.library.custom_op(f"npu_kernels::{op}", mutates_args=())
    def forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor]:
        out, lse = kernel(backend, f"{op}_forward")(q, k, v, attn_mask, scale)
        # One fixed output layout for every backend, so the fake impl can describe it.
        expected = _out_like_sdpa(q, v)
        if out.stride() != expected.stride():
            out = expected.copy_(out)
        return out, lse.to(_lse_dtype(q)).contiguous()

    @forward.register_fake
    def _(q, k, v, attn_mask, scale, backend):
        return _out_like_sdpa(q, v), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))

    @torch.library.custom_op(f"npu_kernels::{op}_backward", mutates_args=())
    def backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        attn_mask: Optional[Tensor], scale: float, backend: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        grads = kernel(backend, f"{op}_backward")(grad_out, q, k, v, out, lse, attn_mask, scale)
        # Custom-op outputs must be fresh tensors with the fake impl's layout (that of the inputs).
        return tuple(torch.empty_like(t).copy_(g) if g.stride() != t.stride() else g for g, t in zip(grads, (q, k, v)))

    @backward.register_fake
    def _(grad_out, q, k, v, out, lse, attn_mask, scale, backend):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, attn_mask, ctx.scale, ctx.backend = inputs
        out, lse = output
        # Output and logsumexp: the probabilities are recomputed blockwise in the backward.
        ctx.save_for_backward(q, k, v, attn_mask, out, lse)
        ctx.mark_non_differentiable(lse)

    def grad(ctx, grad_out: Tensor, _grad_lse):
        q, k, v, attn_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, attn_mask, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None  # masks get no gradient

    forward.register_autograd(grad, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        """The custom op's maths and saved tensors, for eager calls (see ``_dispatch.tracing``)."""

        @staticmethod
        def forward(ctx, q, k, v, attn_mask, scale, backend):
            # ctx-style forward: a separate setup_context makes apply() bind arguments with inspect.
            output = kernel(backend, f"{op}_forward")(q, k, v, attn_mask, scale)
            setup_context(ctx, (q, k, v, attn_mask, scale, backend), output)
            ctx.set_materialize_grads(False)  # the logsumexp gets no gradient: no zeros tensor for it
            return output

        @staticmethod
        def backward(ctx, grad_out: Tensor | None, _grad_lse):
            if grad_out is None:  # unmaterialised: the output did not reach the loss
                return None, None, None, None, None, None
            q, k, v, attn_mask, out, lse = ctx.saved_tensors
            dq, dk, dv = kernel(ctx.backend, f"{op}_backward")(
                grad_out, q, k, v, out, lse, attn_mask, ctx.scale
            )
            return dq, dk, dv, None, None, None

    return forward, backward, Eager


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


def _additive_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """SDPA's masks as kernels take them: additive, 4-D (boolean True = attend)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf")
        )
    else:
        attn_mask = attn_mask.to(dtype)
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def run(op: str, registered: tuple, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    """Check, pick the backend, and run ``op`` through its custom op (tracing) or eager Function."""
    _check(op, q, k, v, attn_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if tracing() and (plain := compiled_plain_maths(op, q, k, v, attn_mask)) is not None:
        return plain(q, k, v, attn_mask, scale)
    backend = backends.select(op, q, k, v, attn_mask)
    fused = direct(backend, op)
    if fused is not None:
        return fused(q, k, v, attn_mask, scale)
    custom_op, _backward, eager = registered
    mask = _additive_mask(attn_mask, q.dtype)
    if tracing():
        return custom_op(q, k, v, mask, scale, backend)[0]
    if not needs_grad(q, k, v):
        return kernel(backend, f"{op}_forward")(q, k, v, mask, scale)[0]
    return eager.apply(q, k, v, mask, scale, backend)[0]
