"""GEGLU: ``x[..., :H] * gelu(x[..., H:])``, the layout and erf GELU of diffusers' ``GEGLU``."""
from __future__ import annotations

import torch

from npu_kernels import backends
from npu_kernels.ops._dispatch import compiled_plain_maths, direct, kernel, needs_grad, tracing

Tensor = torch.Tensor
_APPROXIMATIONS = ("none", "tanh")


@torch.library.custom_op("npu_kernels::geglu", mutates_args=())
def _geglu(x: Tensor, approximate: str, backend: str) -> Tensor:
    return kernel(backend, "geglu_forward")(x, approximate)


@_geglu.register_fake
def _(x: Tensor, approximate: str, backend: str) -> Tensor:
    return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))


@torch.library.custom_op("npu_kernels::geglu_backward", mutates_args=())
def _geglu_backward(grad_out: Tensor, x: Tensor, approximate: str, backend: str) -> Tensor:
    return kernel(backend, "geglu_backward")(grad_out, x, approximate)


@_geglu_backward.register_fake
def _(grad_out: Tensor, x: Tensor, approximate: str, backend: str) -> Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, ctx.approximate, ctx.backend = inputs
    ctx.save_for_backward(x)  # the input is all the backward needs: GELU is recomputed


def _backward(ctx, grad_out: Tensor):
    (x,) = ctx.saved_tensors
    return _geglu_backward(grad_out, x, ctx.approximate, ctx.backend), None, None


_geglu.register_autograd(_backward, setup_context=_setup_context)


class _EagerGeglu(torch.autograd.Function):
    """The custom op's maths and saved tensors, for eager calls (see ``_dispatch.tracing``)."""

    @staticmethod
    def forward(ctx, x: Tensor, approximate: str, backend: str) -> Tensor:
        # ctx-style forward: a separate setup_context makes apply() bind arguments with inspect.
        out = kernel(backend, "geglu_forward")(x, approximate)
        _setup_context(ctx, (x, approximate, backend), out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return kernel(ctx.backend, "geglu_backward")(grad_out, x, ctx.approximate), None, None


def geglu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gated GELU of a projection output ``x[..., 2H]``: ``x[..., :H] * gelu(x[..., H:])``.

    Args:
        x: ``[..., 2H]`` floating tensor, e.g. the output of diffusers' ``GEGLU.proj``.
        approximate: ``"none"`` (erf GELU, what diffusers uses) or ``"tanh"``.

    Returns:
        ``[..., H]`` tensor of ``x``'s dtype.
    """
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension must be even (2*H), got shape {tuple(x.shape)}")
    if tracing():
        if (plain := compiled_plain_maths("geglu", x)) is not None:
            return plain(x, approximate)
        backend = backends.select("geglu", x)
        fused = direct(backend, "geglu")
        return fused(x, approximate) if fused is not None else _geglu(x, approximate, backend)
    backend = backends.select("geglu", x)
    if (fused := direct(backend, "geglu")) is not None:
        return fused(x, approximate)
    if not needs_grad(x):
        return kernel(backend, "geglu_forward")(x, approximate)
    return _EagerGeglu.apply(x, approximate, backend)
