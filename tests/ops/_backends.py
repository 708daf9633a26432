"""Which backends the op tests run the public ops on here, in which dtypes, on which device.

* ``torch``  -- the PyTorch path, on CPU tensors, every dtype;
* ``triton`` -- our Triton kernels: on a CUDA GPU when there is one, else on CPU tensors in Triton's
  interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), which has no bfloat16;
* ``npu``    -- the NPU adapters over the stand-in ``torch_npu`` (``tests/torch_npu_standin``), on
  CPU tensors, inside its emulated device rules (``conftest.backend``): it checks the adapters, the
  dispatch and the documented rules, not the real kernels' numerics.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

ON_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("torch", "triton", "npu")
DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "torch": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ()),
    "npu": (torch.float32, torch.float16, torch.bfloat16),
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device(backend: str) -> str:
    """Where ``backend``'s inputs live in these tests."""
    return "cuda" if backend == "triton" and ON_GPU else "cpu"


def cases(backends=BACKENDS, dtypes=None) -> list:
    """``(backend, dtype)`` parameters, ``dtypes`` limited to what each backend takes here."""
    out = []
    for backend in backends:
        for dtype in DTYPES[backend]:
            if dtypes is None or dtype in dtypes:
                out.append(pytest.param(backend, dtype, id=f"{backend}-{_SHORT[dtype]}"))
    return out


def randn(*shape, dtype, device="cpu", scale=1.0, offset=0.0) -> torch.Tensor:
    """A leaf drawn in float64 (so every dtype sees the same values), then rounded to ``dtype``."""
    t = torch.randn(*shape, dtype=torch.float64).mul_(scale).add_(offset)
    return t.to(device=device, dtype=dtype).requires_grad_()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()
