"""GroupNorm fused with SiLU: ``silu(group_norm(x, num_groups, weight, bias, eps))``."""
from __future__ import annotations

from typing import Optional

import torch

from npu_kernels import backends
from npu_kernels.ops._dispatch import compiled_plain_maths, direct, kernel, needs_grad, tracing

Tensor = torch.Tensor


@torch.library.custom_op("npu_kernels::group_norm_silu", mutates_args=())
def _group_norm_silu(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    out, mean, rstd = kernel(backend, "group_norm_silu_forward")(x, num_groups, weight, bias, eps)
    stat_dtype = _stat_dtype(x, weight, bias, backend)
    return out, mean.to(stat_dtype), rstd.to(stat_dtype)


def _stat_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None, backend: str) -> torch.dtype:
    """The dtype the backend's forward returns mean/rstd in, which is the one its backward takes:
    the backend's ``group_norm_silu_stat_dtype`` where it has one (the PyTorch path: float32 only on
    the CPU's mixed-type path, the input's dtype elsewhere, as ATen's GroupNorm backward requires on
    CUDA and Ascend), else float32 (float64 for float64 inputs). Never a float32 cast that a
    half-precision backward on a non-CPU device would then refuse."""
    rule = getattr(backends.kernels(backend), "group_norm_silu_stat_dtype", None)
    return rule(x, weight, bias) if rule is not None else torch.promote_types(x.dtype, torch.float32)


@_group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x, weight, bias, backend))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("npu_kernels::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_weight, grad_bias = kernel(backend, "group_norm_silu_backward")(
        grad_out, x, weight, bias, mean, rstd, num_groups
    )
    # Custom ops cannot return None: an empty tensor stands for "no affine parameter".
    return (
        grad_x,
        grad_weight if grad_weight is not None else x.new_empty(0),
        grad_bias if grad_bias is not None else x.new_empty(0),
    )


@_group_norm_silu_backward.register_fake
def _(grad_out, x, weight, bias, mean, rstd, num_groups, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if weight is not None else x.new_empty(0),
        torch.empty_like(bias) if bias is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, ctx.num_groups, weight, bias, _eps, ctx.backend = inputs
    _out, mean, rstd = output
    # Input and statistics only: x̂, y and SiLU are recomputed in the backward.
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _group_norm_silu_backward(
        grad_out, x, weight, bias, mean, rstd, ctx.num_groups, ctx.backend
    )
    return (
        grad_x,
        None,
        grad_weight if weight is not None else None,
        grad_bias if bias is not None else None,
        None,
        None,
    )


_group_norm_silu.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupNormSilu(torch.autograd.Function):
    """The custom op's maths and saved tensors, for eager calls (see ``_dispatch.tracing``)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, backend):
        # ctx-style forward: a separate setup_context makes apply() bind arguments with inspect.
        output = kernel(backend, "group_norm_silu_forward")(x, num_groups, weight, bias, eps)
        _setup_context(ctx, (x, num_groups, weight, bias, eps, backend), output)
        ctx.set_materialize_grads(False)  # mean/rstd get no gradient: no zeros tensors for them
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = kernel(ctx.backend, "group_norm_silu_backward")(
            grad_out, x, weight, bias, mean, rstd, ctx.num_groups
        )
        return grad_x, None, grad_weight, grad_bias, None, None


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` in one kernel.

    Args:
        x: ``[N, C, *spatial]``, contiguous or channels_last; ``C`` divisible by ``num_groups``.
        num_groups: number of groups (32 in SDXL).
        weight, bias: optional ``[C]`` affine parameters.
        eps: added to the variance.

    Returns:
        A tensor shaped and laid out like ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be [N, C, *], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels are not divisible by num_groups={num_groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.shape != (channels,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({channels},), got {tuple(param.shape)}")
        if param.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {param.device} but x is on {x.device}")
    if tracing() and (plain := compiled_plain_maths("group_norm_silu", x, weight, bias)) is not None:
        return plain(x, num_groups, weight, bias, eps)
    backend = backends.select("group_norm_silu", x, weight, bias)
    fused = direct(backend, "group_norm_silu")  # e.g. torch_npu's npu_group_norm_swish, autograd included
    if fused is not None:
        return fused(x, num_groups, weight, bias, eps)
    if tracing():
        return _group_norm_silu(x, num_groups, weight, bias, eps, backend)[0]
    if not needs_grad(x, weight, bias):
        return kernel(backend, "group_norm_silu_forward")(x, num_groups, weight, bias, eps)[0]
    return _EagerGroupNormSilu.apply(x, num_groups, weight, bias, eps, backend)[0]
