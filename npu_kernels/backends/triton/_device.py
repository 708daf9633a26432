"""Where the Triton kernels launch: on the tensors' own device, and how many programs fill it.

A Triton launch goes to the *current* CUDA device, not to the device of its tensor arguments: a
tensor on ``cuda:1`` while ``cuda:0`` is current would be read by a kernel on the wrong GPU. Every
contract function therefore runs its launches inside :func:`device_guard` of its first tensor.
"""
from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

# Streaming multiprocessors assumed where there is no CUDA device to ask (the CPU interpreter, a
# "meta" tensor describing a GPU): an H100 SXM / H200.
DEFAULT_SM_COUNT = 132


def device_guard(t: torch.Tensor) -> ContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op context for anything else."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_SM_COUNT`` off CUDA)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT
