"""GEGLU on Ascend: ``torch_npu.npu_geglu`` (autograd registered by torch_npu).

Which half ``npu_geglu`` passes through GELU is not stated in its shipped docs (2.5.1..2.14.0): the
block says "对输入Tensor完成GeGlu运算" and its example is not self-consistent (printed values only).
Every schema 2.5.1..2.14.0 has ``bool activate_left=False``; the adapter passes ``activate_left=False``
explicitly and assumes it means GELU on the *right* (second) half, ``out = A * gelu(B)``: diffusers'
GEGLU layout. docs/ascend_npu.md names the one device check that settles it.
"""
from __future__ import annotations

import torch
import torch_npu

from npu_kernels.backends.npu._common import chip_reasons, dtype_reasons

Tensor = torch.Tensor

#: torch_npu's GELU index for ``npu_geglu``: 0 = erf ("none"), 1 = tanh.
GELU_APPROXIMATE = {"none": 0, "tanh": 1}


def geglu(x: Tensor, approximate: str) -> Tensor:
    """``x[..., :H] * gelu(x[..., H:])`` with torch_npu's fused GeGLU (autograd by torch_npu)."""
    try:
        index = GELU_APPROXIMATE[approximate]
    except KeyError:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}") from None
    return torch_npu.npu_geglu(x, dim=-1, approximate=index, activate_left=False)[0]


def not_supported_reasons(x: Tensor) -> list[str]:
    reasons = dtype_reasons("geglu input", [x]) + chip_reasons("npu_geglu", x)
    if x.dim() == 0 or x.shape[-1] % 2:
        reasons.append(f"geglu needs an even last dimension, got shape {tuple(x.shape)}")
    return reasons
