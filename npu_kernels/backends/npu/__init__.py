"""Ascend NPU backend: thin adapters over torch_npu's fused operators.

Importing this module imports ``torch_npu`` (which needs the CANN toolkit); the dispatcher in
``npu_kernels.backends`` does that inside ``try/except`` and reports the error when it fails.

What each op runs (signatures as Ascend documents them; see ``docs/ascend_npu.md`` for links):

* ``geglu`` -> ``torch_npu.npu_geglu(x, dim=-1, approximate=0|1)[0]``. torch_npu computes
  ``A * gelu(B)`` with A the first and B the second half (diffusers' GEGLU layout) and registers
  the backward itself (``npu_geglu_grad``), so this is autograd-complete. ``approximate`` is an
  index: 0 = erf ("none"), 1 = tanh; its default is 1, so it is always passed explicitly.
* ``group_norm_silu`` (autograd-complete) -> ``torch_npu.npu_group_norm_swish(x, G, weight, bias,
  eps=, swish_scale=1.0)[0]`` where the installed torch_npu has it (its backward is torch_npu's,
  aclnnGroupNormSwishGrad), else ``torch_npu.npu_group_norm_silu(x, weight, bias, group=, eps=)``
  with our backward from the returned mean/rstd, kept in the gradient's dtype because
  aclnnGroupNormBackward refuses anything else (see :mod:`.group_norm_silu`).
* ``flash_attention`` / ``cross_attention`` -> ``torch_npu.npu_fusion_attention`` with
  ``head_num=H``, ``scale=scale``, ``keep_prob=1.0`` (no dropout), whose backward
  (``npu_fusion_attention_grad``) torch_npu registers itself. Masks are translated from SDPA's
  conventions to torch_npu's: a boolean mask (True = attend) is inverted, because torch_npu's
  ``atten_mask`` is True/1 = *masked out*; an additive mask made only of 0 and -inf becomes such a
  boolean mask; any other additive mask goes in as ``pse`` divided by ``scale``, because torch_npu
  adds ``pse`` *before* scaling (``softmax(scale * (pse + q kᵀ))``). A query row the mask removes
  entirely gives zeros (and zero gradients), as on the PyTorch and Triton paths.
* bfloat16 only on Atlas A2/A3 chips (``torch_npu.npu.get_device_name()`` "Ascend910B*"/
  "Ascend910_93*"): on older Atlas training chips ``not_supported_reasons`` says so.

Nothing here knows about diffusers.
"""
from __future__ import annotations

import torch
import torch_npu  # noqa: F401  (needs CANN; the dispatcher reports an import failure)

from npu_kernels import backends, registry
from npu_kernels.backends.npu import flash_attention as _flash_attention_module
from npu_kernels.backends.npu import geglu as _geglu_module
from npu_kernels.backends.npu import group_norm_silu as _group_norm_silu_module
from npu_kernels.backends.npu._common import FUSED_DTYPES, reset_chip_cache
from npu_kernels.backends.npu.cross_attention import cross_attention
from npu_kernels.backends.npu.flash_attention import (
    FP32_ATTENTION_ENV,
    MAX_HEAD_DIM,
    flash_attention,
    float32_attention_problem,
)
from npu_kernels.backends.npu.flash_attention import reset_capability_cache as _reset_fp32_probe
from npu_kernels.backends.npu.geglu import GELU_APPROXIMATE, geglu
from npu_kernels.backends.npu.group_norm_silu import (
    HAS_GROUP_NORM_SWISH,
    group_norm_silu,
    group_norm_silu_backward,
    group_norm_silu_forward,
    group_norm_silu_stat_dtype,
)

Tensor = torch.Tensor

__all__ = [
    "FP32_ATTENTION_ENV", "FUSED_DTYPES", "GELU_APPROXIMATE", "HAS_GROUP_NORM_SWISH", "MAX_HEAD_DIM",
    "configure_npu_for_training", "cross_attention", "flash_attention", "float32_attention_problem",
    "geglu", "group_norm_silu", "group_norm_silu_backward", "group_norm_silu_forward",
    "group_norm_silu_stat_dtype", "not_supported_reasons", "reset_capability_cache",
]


def reset_capability_cache() -> None:
    """Forget the float32-attention probe results and the chip names (tests; or after changing
    the environment)."""
    _reset_fp32_probe()
    reset_chip_cache()
    backends.forget_decisions()  # auto's choices read these: make it ask again


def configure_npu_for_training() -> None:
    """Ascend's recommended setting for training: keep tensors in ND (no private formats).

    Sets ``torch.npu.config.allow_internal_format = False`` (``torch.npu`` is installed by
    importing torch_npu; ``torch_npu.npu`` is the same module).
    """
    npu = getattr(torch, "npu", None)
    if npu is None or not hasattr(npu, "config"):
        npu = torch_npu.npu
    npu.config.allow_internal_format = False


def not_supported_reasons(op: str, inputs: registry.Inputs) -> list[str]:
    """Why this backend cannot serve ``op`` for these inputs (empty when it can). The tensors'
    device is not checked: a forced backend runs on whatever device the tensors are on."""
    if op == "geglu":
        return _geglu_module.not_supported_reasons(inputs.x)
    if op == "group_norm_silu":
        return _group_norm_silu_module.not_supported_reasons(inputs.x, inputs.weight, inputs.bias)
    if op in ("flash_attention", "cross_attention"):
        return _flash_attention_module.not_supported_reasons(inputs.q, inputs.k, inputs.v, inputs.attn_mask)
    return [f"the npu backend has no op {op!r}"]
