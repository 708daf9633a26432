"""Shared plumbing of the ops: find a backend's kernel, falling back to the PyTorch path."""
from __future__ import annotations

from typing import Callable

import torch

from npu_kernels import backends
from npu_kernels.backends import reference


def tracing() -> bool:
    """True under ``torch.compile``/``torch.export``: the ops then go through their torch.library
    custom ops, opaque to the tracer and described by fake impls. Eager calls run the same kernels
    through a plain ``torch.autograd.Function`` instead: the custom-op dispatch costs tens of
    microseconds of host time per call, more than many GPU kernels at SDXL's batch 1 take."""
    return torch.compiler.is_compiling()


def kernel(backend: str, name: str) -> Callable:
    """``name`` from the backend's kernel module, or the PyTorch path's when the backend lacks it.

    The fallback is how e.g. the NPU backend gets GroupNorm+SiLU's backward: torch_npu has a fused
    forward but no registered backward, so ours runs from the statistics the NPU forward saved.
    """
    fn = getattr(backends.kernels(backend), name, None)
    return fn if fn is not None else getattr(reference, name)


def direct(backend: str, op: str) -> Callable | None:
    """A backend's autograd-complete implementation of ``op`` (used as is), if it has one.

    Only functions count: a backend package may well have a submodule named after the op.
    """
    fn = getattr(backends.kernels(backend), op, None)
    return fn if callable(fn) else None
