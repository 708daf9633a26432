"""The public ops, one file each, each declared once as a spec (:class:`npu_kernels.registry.OpSpec`)
from which ``_build.py`` generates its ``torch.library`` custom op (fake impl + autograd), its eager
path and its dispatch. Which kernel runs is decided in :mod:`npu_kernels.backends`."""
from npu_kernels.ops.cross_attention import cross_attention
from npu_kernels.ops.flash_attention import flash_attention
from npu_kernels.ops.geglu import geglu, geglu_projection
from npu_kernels.ops.group_norm_silu import group_norm_silu
from npu_kernels.ops.lora_linear import lora_linear

# isort: split
# Reports list the ops in the order they register: DoRA after the LoRA projection it builds on.
from npu_kernels.ops.dora_linear import dora_linear

__all__ = [
    "cross_attention", "dora_linear", "flash_attention", "geglu", "geglu_projection", "group_norm_silu", "lora_linear",
]
