"""Shared plumbing of the ops: find a backend's kernel, falling back to the PyTorch path."""
from __future__ import annotations

from typing import Callable

import torch

from npu_kernels import backends
from npu_kernels.backends import reference
from npu_kernels.ops import _plain_maths


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
    fn = backends.function(backend, name)
    return fn if fn is not None else getattr(reference, name)


def direct(backend: str, op: str) -> Callable | None:
    """A backend's autograd-complete implementation of ``op`` (used as is), if it has one."""
    return backends.function(backend, op)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record a call on these inputs. When it would not (inference, no_grad,
    frozen inputs) the ops run the forward kernel alone: an autograd Function costs host time
    even when it records nothing."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any(<generator>): this runs at every call
            if t is not None and t.requires_grad:
                return True
    return False


def compiled_plain_maths(op: str, *tensors: torch.Tensor | None) -> Callable | None:
    """Under ``torch.compile``: ``op``'s plain PyTorch maths when the compiled graph should see those
    rather than our custom op (``backends.compiled_choice`` for the tensors' device); else ``None``.

    Inductor fuses plain maths with the ops around it; an opaque custom op stops that, so the custom
    op stays only where its kernel beats what inductor generates. Eager calls always get ``None``.
    """
    if not tracing():
        return None
    device_type = next(t for t in tensors if t is not None).device.type
    if backends.compiled_choice(op, device_type, backends.select(op, *tensors)) != "decompose":
        return None
    return getattr(_plain_maths, op)


def autocast_operands(x: torch.Tensor, *params: torch.Tensor | None) -> tuple:
    """The operands as autocast would hand them to a GEMM/convolution (unchanged outside autocast).

    Casting before the op rather than inside ``F.linear`` lets a backward save (and recompute with)
    the operands the forward actually multiplied, instead of casting them a second time.
    """
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *params)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(
        t if t is None or t.dtype in (dtype, torch.float64) or not t.is_floating_point() else t.to(dtype)
        for t in (x, *params)
    )
