"""The PyTorch path: every op's forward and backward kernel in plain PyTorch.

It runs on any device and any floating dtype (float64 included), so it is also the reference the
other backends are tested against. Every backend module exports this same contract:

* ``geglu_forward(x, approximate) -> out`` / ``geglu_backward(grad_out, x, approximate) -> grad_x``
* ``group_norm_silu_forward(x, num_groups, weight, bias, eps) -> (out, mean, rstd)`` with float32
  ``mean``/``rstd`` of shape ``[N, num_groups]``, and
  ``group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, num_groups) -> (gx, gw, gb)``
* ``flash_attention_forward(q, k, v, attn_mask, scale) -> (out, lse)`` with float32 ``lse`` ``[B, H, Sq]``
  and ``flash_attention_backward(grad_out, q, k, v, out, lse, attn_mask, scale) -> (dq, dk, dv)``; the
  mask is ``None`` or additive, 4-D and broadcastable to ``[B, H, Sq, Skv]``;
  ``cross_attention_forward`` / ``cross_attention_backward`` the same for short key/value sequences.
* ``not_supported_reasons(op, *tensors) -> list[str]``

A backend may instead export an op under its own name (``geglu``, ``flash_attention``, ...) as an
autograd-complete function; the op then calls it directly (torch_npu's fused attention, whose
backward torch_npu registers itself).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def not_supported_reasons(op: str, *tensors: Tensor | None) -> list[str]:
    """The PyTorch path serves every op on every device and floating dtype (bool attention masks too)."""
    return [
        f"dtype {t.dtype} is not a floating point type"
        for t in tensors
        if t is not None and not (t.is_floating_point() or t.dtype == torch.bool)
    ]


# ----------------------------------------------------------------------------------------- GEGLU
def geglu_forward(x: Tensor, approximate: str) -> Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate, approximate=approximate)


def geglu_backward(grad_out: Tensor, x: Tensor, approximate: str) -> Tensor:
    hidden, gate = x.chunk(2, dim=-1)
    grad_hidden = grad_out * F.gelu(gate, approximate=approximate)
    grad_gate = torch.ops.aten.gelu_backward(grad_out * hidden, gate, approximate=approximate)
    return torch.cat([grad_hidden, grad_gate], dim=-1)


# ------------------------------------------------------------------------------ GroupNorm + SiLU
def _affine_for_native(param: Tensor | None, x: Tensor, fill: float) -> Tensor:
    """Affine parameter in float32 (float64 for float64 input) on the CPU: ATen's CPU GroupNorm then
    keeps its statistics in float32 for half-precision inputs (its "mixed type" path) instead of
    rounding them to bfloat16. Other devices' kernels want the input's dtype (CUDA accumulates in
    float32 inside the kernel anyway)."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.device.type == "cpu" else x.dtype
    if param is None:
        return torch.full((x.shape[1],), fill, dtype=dtype, device=x.device)
    return param.to(dtype)


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _group_norm_sizes(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x.numel() // max(n * c, 1)


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # ATen's vectorised GroupNorm (any memory format), then SiLU in place on its fresh output.
    out, mean, rstd = torch.native_group_norm(
        x, _affine_for_native(weight, x, 1.0), _affine_for_native(bias, x, 0.0),
        *_group_norm_sizes(x), num_groups, eps,
    )
    return F.silu(out, inplace=True), mean, rstd


def group_norm_silu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward from the saved statistics: recompute y = (x - mean)·rstd·w + b, never the mean/rstd."""
    n, c, hw = _group_norm_sizes(x)
    acc = torch.promote_types(x.dtype, torch.float32)
    w = _affine_for_native(weight, x, 1.0)
    view = (n, c) + (1,) * (x.dim() - 2)
    per_channel = lambda stat: stat.to(acc).repeat_interleave(c // num_groups, dim=1).view(view)  # noqa: E731
    affine = lambda param: param.view((1, c) + view[2:])  # noqa: E731
    # Centre first, in float32: folding the mean into a shift (x·s + (b - mean·s)) cancels badly
    # when |mean|·rstd is large. y only feeds SiLU's derivative, so it may then drop to x's dtype.
    y = (x - per_channel(mean)).mul_(per_channel(rstd) * affine(w)).add_(affine(_affine_for_native(bias, x, 0.0)))
    # ATen's GroupNorm backward wants the gradient in the input's memory format.
    grad_y = torch.ops.aten.silu_backward(grad_out.to(x.dtype), y.to(x.dtype)).contiguous(memory_format=_memory_format(x))
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
        grad_y, x, mean, rstd, w, n, c, hw, num_groups, [True, weight is not None, bias is not None]
    )
    return (
        grad_x,
        grad_weight.to(weight.dtype) if weight is not None else None,
        grad_bias.to(bias.dtype) if bias is not None else None,
    )


# ------------------------------------------------------------------------------------- attention
def _use_cpu_flash(q: Tensor) -> bool:
    """ATen's CPU flash-attention kernel returns (out, logsumexp): exactly our forward contract."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    return scores


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    if _use_cpu_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
        )
        return out, lse.to(torch.promote_types(q.dtype, torch.float32))
    # Math path for other devices: materialises one [B, H, Sq, Skv] score block, saves nothing.
    scores = _scores(q, k, attn_mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)
    return out, lse


def flash_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _use_cpu_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=attn_mask, scale=scale
        )
    # FlashAttention's backward in matrix form: recompute P from the saved logsumexp.
    acc = torch.promote_types(q.dtype, torch.float32)
    probs = torch.exp(_scores(q, k, attn_mask, scale) - lse.to(acc).unsqueeze(-1))
    grad_out_acc = grad_out.to(acc)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out_acc)
    grad_probs = torch.matmul(grad_out_acc, v.to(acc).transpose(-1, -2))
    delta = (grad_out_acc * out.to(acc)).sum(-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = torch.matmul(grad_scores, k.to(acc))
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.to(acc))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


# Short key/value sequences need no special kernel in PyTorch: the same maths serves them.
cross_attention_forward = flash_attention_forward
cross_attention_backward = flash_attention_backward
