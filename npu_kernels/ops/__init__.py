"""The four fused ops: each a ``torch.library`` custom op with a fake impl and autograd."""
from npu_kernels.ops.attention import cross_attention, flash_attention
from npu_kernels.ops.geglu import geglu
from npu_kernels.ops.group_norm_silu import group_norm_silu

__all__ = ["cross_attention", "flash_attention", "geglu", "group_norm_silu"]
