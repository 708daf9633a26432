"""The PyTorch path: every op's forward and backward kernel in plain PyTorch.

It runs on any device and any floating dtype (float64 included), so it is also the reference the
other backends are tested against. Every backend module exports this same contract:

* ``geglu_forward(x, approximate) -> out`` / ``geglu_backward(grad_out, x, approximate) -> grad_x``
* ``group_norm_silu_forward(x, num_groups, weight, bias, eps) -> (out, mean, rstd)`` with float32
  ``mean``/``rstd`` of shape ``[N, num_groups]``, and
  ``group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, num_groups) -> (gx, gw, gb)``
* ``attention_forward(q, k, v, attn_mask, scale) -> (out, lse)`` with float32 ``lse`` ``[B, H, Sq]``
  and ``attention_backward(grad_out, q, k, v, out, lse, attn_mask, scale) -> (dq, dk, dv)``; the
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
    """The PyTorch path serves every op on every device and floating dtype."""
    return [
        f"dtype {t.dtype} is not a floating point type"
        for t in tensors
        if t is not None and not t.is_floating_point()
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
def _grouped(x: Tensor, num_groups: int) -> Tensor:
    """View ``[N, C, *spatial]`` as ``[N, G, C/G, *spatial]`` (a view for any memory format)."""
    return x.unflatten(1, (num_groups, x.shape[1] // num_groups))


def _per_group(stat: Tensor, ndim: int) -> Tensor:
    """Broadcast a ``[N, G]`` statistic against a grouped ``[N, G, C/G, *spatial]`` tensor."""
    return stat.reshape(stat.shape + (1,) * (ndim - 2))


def _per_channel(param: Tensor, grouped: Tensor) -> Tensor:
    """Broadcast a ``[C]`` affine parameter against a grouped ``[N, G, C/G, *spatial]`` tensor."""
    n_spatial = grouped.dim() - 3
    return param.to(grouped.dtype).reshape((1,) + tuple(grouped.shape[1:3]) + (1,) * n_spatial)


def _reduce_dims(grouped: Tensor) -> tuple[int, ...]:
    return tuple(range(2, grouped.dim()))


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    grouped = _grouped(x, num_groups)
    # Statistics in float32 (float64 stays float64) whatever the input dtype.
    acc = grouped.to(torch.promote_types(x.dtype, torch.float32))
    var, mean = torch.var_mean(acc, dim=_reduce_dims(acc), unbiased=False)
    rstd = torch.rsqrt(var + eps)
    y = (acc - _per_group(mean, acc.dim())) * _per_group(rstd, acc.dim())
    if weight is not None:
        y = y * _per_channel(weight, acc)
    if bias is not None:
        y = y + _per_channel(bias, acc)
    return F.silu(y).to(x.dtype).flatten(1, 2), mean, rstd


def group_norm_silu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward from the saved statistics: recompute x̂ and y = x̂·w + b, never the mean/rstd."""
    grouped = _grouped(x, num_groups)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    acc = grouped.to(acc_dtype)
    dims = _reduce_dims(acc)
    mean = _per_group(mean.to(acc_dtype), acc.dim())
    rstd = _per_group(rstd.to(acc_dtype), acc.dim())
    x_hat = (acc - mean) * rstd
    y = x_hat * _per_channel(weight, acc) if weight is not None else x_hat
    if bias is not None:
        y = y + _per_channel(bias, acc)
    sig = torch.sigmoid(y)
    grad_y = _grouped(grad_out, num_groups).to(acc_dtype) * sig * (1 + y * (1 - sig))

    channel_dims = (0,) + tuple(range(3, acc.dim()))  # reduce over N and spatial, keep (G, C/G)
    grad_weight = (grad_y * x_hat).sum(channel_dims).flatten().to(weight.dtype) if weight is not None else None
    grad_bias = grad_y.sum(channel_dims).flatten().to(bias.dtype) if bias is not None else None

    grad_x_hat = grad_y * _per_channel(weight, acc) if weight is not None else grad_y
    mean_grad = grad_x_hat.mean(dim=dims, keepdim=True)
    mean_grad_x_hat = (grad_x_hat * x_hat).mean(dim=dims, keepdim=True)
    grad_x = (grad_x_hat - mean_grad - x_hat * mean_grad_x_hat) * rstd
    return grad_x.to(x.dtype).flatten(1, 2), grad_weight, grad_bias


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


def attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
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


def attention_backward(
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
cross_attention_forward = attention_forward
cross_attention_backward = attention_backward
