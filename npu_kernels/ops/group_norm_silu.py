"""GroupNorm fused with SiLU: ``silu(group_norm(x, num_groups, weight, bias, eps))``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_kernels import backends
from npu_kernels.ops._build import build
from npu_kernels.registry import GroupNormSiluInputs, OpSpec

Tensor = torch.Tensor


def _validate(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple:
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
    return x, num_groups, weight, bias, eps


def _stat_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None, backend: str) -> torch.dtype:
    """The dtype the backend's forward returns mean/rstd in, which is the one its backward takes:
    the backend's ``group_norm_silu_stat_dtype`` where it has one (the PyTorch path: float32 only on
    the CPU's mixed-type path, the input's dtype elsewhere, as ATen's GroupNorm backward requires on
    CUDA and Ascend), else float32 (float64 for float64 inputs). Never a float32 cast that a
    half-precision backward on a non-CPU device would then refuse."""
    rule = backends.provided(backend, "group_norm_silu_stat_dtype")
    if rule is not None:
        return rule(x, weight, bias)
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # promote_types would dispatch an op


def _finish(outputs: tuple, args: tuple, backend: str) -> tuple:
    """The statistics in the dtype the fake impl announces (a no-op for every backend we ship)."""
    out, mean, rstd = outputs
    x, _num_groups, weight, bias, _eps = args
    dtype = _stat_dtype(x, weight, bias, backend)
    if mean.dtype == dtype and rstd.dtype == dtype:
        return outputs
    return out, mean.to(dtype), rstd.to(dtype)


def _fake(x, num_groups, weight, bias, eps, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x, weight, bias, backend))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _plain_maths(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
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


_GROUP_NORM_SILU = build(OpSpec(
    name="group_norm_silu",
    inputs=GroupNormSiluInputs,
    schema="(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)",
    forward_kernel="group_norm_silu_forward",
    backward_kernel="group_norm_silu_backward",
    backward_schema=(
        "(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int num_groups)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
    # Input and statistics only: x̂, y and SiLU are recomputed in the backward.
    saves=("x", "weight", "bias", "mean", "rstd"),
    validate=_validate,
    fake=_fake,
    plain_maths=_plain_maths,
    finish=_finish,
))


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
    return _GROUP_NORM_SILU(x, num_groups, weight, bias, eps)
