"""Linear and Conv2d layers whose weights are frozen (LoRA training) keep no input for backward.

Autograd's ``linear``/``convolution`` save their input whatever ``requires_grad`` says of the
weight, yet with a frozen weight the backward needs only ``grad @ W``: the input is dead weight.
In SDXL LoRA training nearly every conv and feed-forward layer is frozen, and their inputs (the
GroupNorm+SiLU and GEGLU outputs) are the largest activations. These functions compute the same
forward and the same input gradient, saving only the weight (already resident).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # autocast, when active, applies here as in nn.Linear
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        # Autocast is off in backward: compute in the output's dtype, as autocast's forward did.
        grad_x = torch.matmul(grad_out, weight.to(grad_out.dtype))
        return grad_x.to(ctx.input_dtype), None, None


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.conv = (tuple(x.shape), stride, padding, dilation, groups)
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        input_shape, stride, padding, dilation, groups = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(input_shape, weight.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
        return grad_x.to(ctx.input_dtype), None, None, None, None, None, None


def _frozen(module: nn.Module) -> bool:
    """Frozen now: checked at every call, so unfreezing a layer later just works."""
    # Attribute reads, not ``parameters()``: this runs for every layer call and must stay cheap.
    bias = module.bias
    return torch.is_grad_enabled() and not module.weight.requires_grad and not (bias is not None and bias.requires_grad)


def linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _frozen(self) and x.requires_grad:
        return _FrozenLinear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def conv2d_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if _frozen(self) and x.requires_grad:
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    return self._conv_forward(x, self.weight, self.bias)


def patchable(module: nn.Module) -> bool:
    """Plain ``nn.Linear`` and zero-padded, integer-padded ``nn.Conv2d`` (exact types, not subclasses)."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
