"""GroupNorm+SiLU on Ascend.

Two torch_npu operators can serve it; which one is decided once, when this module is imported:

* ``torch_npu.npu_group_norm_swish(input, num_groups, weight, bias, eps=1e-5, swish_scale=1.0)
  -> (out, mean, rstd)`` (documented for Atlas A2 only, input 2..8-D), whose backward torch_npu
  registers itself (aclnnGroupNormSwishGrad). :func:`group_norm_silu` calls it with
  ``swish_scale=1.0`` (SiLU); its weight and bias are required and must have the input's dtype.
* otherwise ``torch_npu.npu_group_norm_silu(input, weight, bias, group, eps=1e-5) -> (out, mean,
  rstd)``, which has no registered backward: :func:`group_norm_silu` wraps it in an autograd
  Function whose backward is the PyTorch path's maths, run from the returned mean/rstd **in the
  gradient's dtype**. That backward ends in ATen's ``native_group_norm_backward``, which on an NPU
  is aclnnGroupNormBackward: its CANN 8.0 page requires mean and rstd of gradOut's dtype, so
  float32 statistics with a bfloat16 gradient would fail on the device.
"""
from __future__ import annotations

import torch
import torch_npu

from npu_kernels.backends import pytorch
from npu_kernels.backends.npu._common import chip_reasons, dtype_reasons

Tensor = torch.Tensor

#: npu_group_norm_swish: "input只支持2-8维" (2..8-D). npu_group_norm_silu: "维度需大于一维" (more than
#: one dimension, no upper limit), in every release 2.5.1..2.14.0.
SWISH_MAX_DIMS = 8

#: Whether the installed torch_npu has ``npu_group_norm_swish`` (checked once, at import).
HAS_GROUP_NORM_SWISH: bool = hasattr(torch_npu, "npu_group_norm_swish")


def _at_least_as_precise(param_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    return param_dtype == x_dtype or param_dtype == torch.float32


def _affine_for_kernel(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight and bias as npu_group_norm_silu takes them: both present (ones/zeros when absent:
    every schema 2.5.1..2.14.0 has ``Tensor? weight, Tensor? bias``, but the docs call them
    "必选输入", required), of one dtype, and not less precise than ``x``."""
    given = [t.dtype for t in (weight, bias) if t is not None]
    dtype = x.dtype
    if given:
        dtype = given[0] if len(given) == 1 else torch.promote_types(*given)
    if not _at_least_as_precise(dtype, x.dtype):
        dtype = torch.float32
    channels = x.shape[1]
    weight = torch.ones(channels, dtype=dtype, device=x.device) if weight is None else weight.to(dtype)
    bias = torch.zeros(channels, dtype=dtype, device=x.device) if bias is None else bias.to(dtype)
    return weight, bias


def _affine_for_swish(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight and bias as npu_group_norm_swish takes them: present and of the input's dtype. The
    casts are differentiable, so float32 parameters still get float32 gradients."""
    channels = x.shape[1]
    weight = torch.ones(channels, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    bias = torch.zeros(channels, dtype=x.dtype, device=x.device) if bias is None else bias.to(x.dtype)
    return weight, bias


def group_norm_silu_stat_dtype(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> torch.dtype:
    """torch_npu returns mean/rstd in the input's dtype, the dtype aclnnGroupNormBackward wants."""
    return x.dtype


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(silu(group_norm(x)), mean, rstd)`` from ``torch_npu.npu_group_norm_silu``; mean/rstd
    ``[N, G]`` in ``x``'s dtype, as torch_npu returns them (and as the backward needs them)."""
    weight, bias = _affine_for_kernel(x, weight, bias)
    return torch_npu.npu_group_norm_silu(x, weight, bias, group=num_groups, eps=eps)


def group_norm_silu_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, num_groups: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The PyTorch path's backward with every operand of ``native_group_norm_backward`` in the
    gradient's dtype (aclnnGroupNormBackward's rule), whatever dtype the statistics came in."""
    dtype = grad_out.dtype
    return pytorch.group_norm_silu_backward_in(
        dtype, grad_out, x, weight, bias, mean.to(dtype), rstd.to(dtype), num_groups
    )


class _GroupNormSilu(torch.autograd.Function):
    """npu_group_norm_silu forward; backward from its mean/rstd (saved: x, weight, bias, mean, rstd)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        out, mean, rstd = group_norm_silu_forward(x, num_groups, weight, bias, eps)
        ctx.num_groups = num_groups
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, ctx.num_groups)
        return grad_x, None, grad_weight, grad_bias, None


def _swish_serves(x: Tensor) -> bool:
    return HAS_GROUP_NORM_SWISH and x.dim() <= SWISH_MAX_DIMS and not chip_reasons("npu_group_norm_swish", x)


def group_norm_silu(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))``, autograd-complete.

    ``npu_group_norm_swish`` (torch_npu's backward) where the installed torch_npu has it and the
    chip supports it, else ``npu_group_norm_silu`` with our backward (see the module docstring).
    """
    if _swish_serves(x):
        weight, bias = _affine_for_swish(x, weight, bias)
        return torch_npu.npu_group_norm_swish(x, num_groups, weight, bias, eps=eps, swish_scale=1.0)[0]
    return _GroupNormSilu.apply(x, num_groups, weight, bias, eps)


def not_supported_reasons(x: Tensor, *affine: Tensor | None) -> list[str]:
    params = [t for t in affine if t is not None]
    reasons = dtype_reasons("group_norm_silu input", [x]) + dtype_reasons("group_norm_silu weight/bias", params)
    reasons += chip_reasons("npu_group_norm_silu", x)
    if x.dim() < 2:
        reasons.append(f"npu_group_norm_silu takes input of more than one dimension, got {x.dim()}-D")
    elif any(size == 0 for size in x.shape):
        reasons.append(f"npu_group_norm_silu needs every dimension > 0, got shape {tuple(x.shape)}")
    return reasons
