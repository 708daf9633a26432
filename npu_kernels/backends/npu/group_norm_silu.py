"""GroupNorm+SiLU on Ascend: ``torch_npu.npu_group_norm_silu`` forward; the backward is the
reference path's, run from the statistics this forward returns (torch_npu registers none)."""
from __future__ import annotations

import torch
import torch_npu

from npu_kernels.backends.npu._common import dtype_reasons

Tensor = torch.Tensor

GROUP_NORM_MAX_DIMS = 8


def _at_least_as_precise(param_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    return param_dtype == x_dtype or param_dtype == torch.float32


def _affine_for_kernel(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight and bias as npu_group_norm_silu takes them: both present (ones/zeros when absent,
    as older schemas require them), of one dtype, and not less precise than ``x``."""
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


def group_norm_silu_forward(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(silu(group_norm(x)), mean, rstd)`` from ``torch_npu.npu_group_norm_silu``.

    torch_npu returns mean/rstd ``[N, G]`` in ``x``'s dtype; they are returned as float32 (for
    float16/bfloat16 inputs they carry the input dtype's rounding). No backward here: torch_npu
    registers none, the dispatcher's autograd runs one from these statistics.
    """
    weight, bias = _affine_for_kernel(x, weight, bias)
    out, mean, rstd = torch_npu.npu_group_norm_silu(x, weight, bias, group=num_groups, eps=eps)
    return out, mean.float(), rstd.float()


def not_supported_reasons(x: Tensor, *affine: Tensor | None) -> list[str]:
    params = [t for t in affine if t is not None]
    reasons = dtype_reasons("group_norm_silu input", [x]) + dtype_reasons("group_norm_silu weight/bias", params)
    if not 2 <= x.dim() <= GROUP_NORM_MAX_DIMS:
        reasons.append(f"npu_group_norm_silu takes 2..{GROUP_NORM_MAX_DIMS}-D input, got {x.dim()}-D")
    elif any(size == 0 for size in x.shape):
        reasons.append(f"npu_group_norm_silu needs every dimension > 0, got shape {tuple(x.shape)}")
    return reasons
