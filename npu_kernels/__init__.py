"""npu_kernels: fused GroupNorm+SiLU, GEGLU, attention and LoRA projection for diffusers on NPU, CUDA and CPU.

Quick start::

    import npu_kernels
    report = npu_kernels.optimize(unet)      # fused attention, GroupNorm+SiLU, GEGLU, PEFT LoRA layers
    # or only the attention processor:
    unet.set_attn_processor(npu_kernels.FusedAttnProcessor())
"""
from npu_kernels.backends import BackendUnavailableError, use_backend
from npu_kernels.diffusers_integration import RECOMPUTE_LEVELS, FusedAttnProcessor, OptimizeReport, optimize, restore
from npu_kernels.ops import cross_attention, dora_linear, flash_attention, geglu, geglu_projection, group_norm_silu, lora_linear
from npu_kernels.report import backend_report

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedAttnProcessor",
    "OptimizeReport",
    "RECOMPUTE_LEVELS",
    "backend_report",
    "cross_attention",
    "dora_linear",
    "flash_attention",
    "geglu",
    "geglu_projection",
    "group_norm_silu",
    "lora_linear",
    "optimize",
    "restore",
    "use_backend",
]
