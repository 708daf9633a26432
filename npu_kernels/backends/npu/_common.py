"""What the NPU adapters share: the dtypes torch_npu's fused ops take, and the reason format."""
from __future__ import annotations

import torch

Tensor = torch.Tensor

#: Dtypes the fused ops take (bfloat16 on Atlas A2-class devices; float32 attention only on
#: torch_npu/CANN releases that document it, see :func:`float32_attention_problem`).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_reasons(what: str, tensors: list[Tensor]) -> list[str]:
    return [
        f"{what} dtype {t.dtype} is not supported by torch_npu's fused op (float16, bfloat16, float32)"
        for t in tensors
        if t.dtype not in FUSED_DTYPES
    ]
