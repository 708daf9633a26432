"""Ascend NPU backend: thin adapters over torch_npu's fused operators.

Importing this module imports ``torch_npu`` (which needs the CANN toolkit); the dispatcher in
``npu_kernels.backends`` does that inside ``try/except`` and reports the error when it fails.

What each op runs (each rule with its release and doc block: ``docs/ascend_npu.md``; the chip lists
per op: ``_common.CHIP_RULES``):

* ``geglu`` -> ``torch_npu.npu_geglu(x, dim=-1, approximate=0|1, activate_left=False)[0]``, GELU
  assumed on the second half (diffusers' layout; the docs do not say which half is gated, the
  device check is in docs/ascend_npu.md); torch_npu registers the backward. ``approximate``: 0 = erf
  ("none"), 1 = tanh, always passed explicitly.
* ``group_norm_silu`` -> ``torch_npu.npu_group_norm_swish`` (its own backward) where the release
  and chip have it, else ``torch_npu.npu_group_norm_silu`` + our backward from its mean/rstd, kept
  in the gradient's dtype (aclnnGroupNormBackward's rule).
* ``flash_attention`` / ``cross_attention``: training calls ``torch_npu.npu_fusion_attention``
  (``_v3`` with its grad under ``torch.compile``, the docs' graph-mode op), inference calls
  ``npu_fused_infer_attention_score`` where its documented limits allow, else SDPA. Masks reach
  torch_npu only as boolean ``atten_mask`` (True = masked out; SDPA's booleans inverted, 0/-inf
  float masks converted); any other additive mask takes the PyTorch path, never ``pse``. Fully
  masked rows ask for ``inner_precise=2`` and are zeroed, as on the PyTorch and Triton paths.
* Each op only on the chips its doc block lists (e.g. fused attention: Atlas A2 training series);
  elsewhere ``not_supported_reasons`` names the block and ``auto`` falls back.

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
