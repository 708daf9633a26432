"""Conv2d layers whose weights are frozen (LoRA training) keep no input for backward.

Autograd's ``convolution`` saves its input whatever ``requires_grad`` says of the weight, yet with a
frozen weight the backward needs only the weight: the input is dead weight. In SDXL LoRA training
every convolution is frozen, and their inputs (the GroupNorm+SiLU outputs) are among the largest
activations. :func:`conv2d_forward` computes the same forward and the same input gradient, saving
only the weight (already resident).

Eager calls keep autograd's own C++ convolution node and only change what it saves, through a
saved-tensor hook around the call: the input is stored as its shape and handed back as a placeholder
(the backward reads its shape, not its values). A Python ``autograd.Function`` there cost 40-60 µs more
host time per call on a 2-core CPU (benchmarks/results/cpu-2026-12-03-python-work). Traced calls
(``torch.compile``) keep :class:`_FrozenConv2d`, which dynamo captures whole.

``nn.Linear`` needs no such help: autograd's ``mm``/``addmm`` save the input only when the weight
requires a gradient (tests/test_diffusers_integration.py checks that a frozen Linear keeps nothing),
so a Python autograd Function there would only add host time per call.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from npu_kernels.ops._build import autocast_operands, tracing


@functools.lru_cache(maxsize=256)
def _shape_placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``: all ``convolution_backward`` reads of the input
    it does not differentiate. Cached per shape, so the backward dispatches no allocation for it."""
    return torch.empty(1, dtype=dtype, device=device).expand(shape)


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, cacheable: bool) -> torch.Tensor:
    """:func:`_shape_placeholder`, from its cache only for real tensors outside tracing."""
    return (_shape_placeholder if cacheable else _shape_placeholder.__wrapped__)(shape, dtype, device)


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups):
        ctx.input_dtype = x.dtype
        x, weight, bias = autocast_operands(x, weight, bias)
        ctx.save_for_backward(weight)
        ctx.conv = (tuple(x.shape), x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        input_shape, dtype, stride, padding, dilation, groups = ctx.conv
        # Traced (torch.compile), the cache saves nothing and dynamo >= 2.14 warns about it: call the plain function.
        # Traced or fake tensors (torch.compile, a FakeTensorMode memory plan) must not fill the cache that real
        # calls read: a cached fake placeholder would silently change every later real gradient.
        placeholder = _placeholder(input_shape, dtype, grad_out.device, type(grad_out) is torch.Tensor and not tracing())
        grad_x = _convolution_backward(
            _as_dtype(grad_out, weight.dtype), placeholder, weight, None,
            stride, padding, dilation, False, _NO_OUTPUT_PADDING, groups, _INPUT_GRAD_ONLY,
        )[0]
        return _as_dtype(grad_x, ctx.input_dtype), None, None, None, None, None, None


# The overload itself: calling the packet resolves it in Python at every call.
_convolution_backward = torch.ops.aten.convolution_backward.default
_NO_OUTPUT_PADDING = (0, 0)
_INPUT_GRAD_ONLY = (True, False, False)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without dispatching anything when it already is (the usual case)."""
    return t if t.dtype == dtype else t.to(dtype)


class _DroppedInput:
    """What the convolution node saves instead of its input: enough to hand back a placeholder."""

    __slots__ = ("shape", "dtype", "device", "cacheable")

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tuple(t.shape), t.dtype, t.device
        self.cacheable = type(t) is torch.Tensor  # fake tensors (a memory plan) must not fill the cache


def conv2d_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.Conv2d.forward`` that keeps no input for the backward while the layer is frozen. Frozen is
    checked at every call (attribute reads only), so unfreezing a layer later just works; an input
    without a gradient needs nothing else either."""
    weight, bias = self.weight, self.bias
    if not (x.requires_grad and not weight.requires_grad and (bias is None or not bias.requires_grad) and torch.is_grad_enabled()):
        return self._conv_forward(x, weight, bias)
    if tracing():
        return _FrozenConv2d.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():  # noqa: SLF001 - e.g. under torch.func: stock's way
        return self._conv_forward(x, weight, bias)
    # The operands autocast would hand the convolution, cast here: so the tensor the node saves is the
    # very one the hook below recognises (and a rebuildable input's cast is marked as such).
    x, weight, bias = autocast_operands(x, weight, bias)
    # The hooks outlive the call (autograd keeps them with what they packed): they must not hold x itself,
    # or it stays alive until the backward. Its id is unambiguous while the call runs, when packing happens.
    input_id = id(x)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001 - no public query
    outer_pack, outer_unpack = outer if outer is not None else (_same, _same)

    def pack(t: torch.Tensor) -> object:  # the weight still goes through the hooks outside (a memory counter's)
        return _DroppedInput(t) if id(t) == input_id else (outer_pack(t),)

    def unpack(packed: object) -> torch.Tensor:
        if type(packed) is _DroppedInput:
            return _placeholder(packed.shape, packed.dtype, packed.device, packed.cacheable)
        return outer_unpack(packed[0])

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def patchable(module: nn.Module) -> bool:
    """A zero-padded, integer-padded ``nn.Conv2d`` (the exact type, not a subclass)."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
