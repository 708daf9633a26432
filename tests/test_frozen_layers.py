"""Frozen Linear/Conv2d layers after ``optimize()``: what they cache must never leak between kinds of tensors."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import npu_kernels
from tests import reference


def _frozen_conv() -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)


def test_a_fake_tensor_step_leaves_real_conv_gradients_unchanged():
    """The trainer's memory plan runs one step on fake tensors before training. The frozen Conv2d backward
    caches a shape placeholder per shape: a fake one cached there changed every later real input gradient."""
    conv = _frozen_conv()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(conv.double()(x).square().sum(), x)
    conv = conv.float()
    npu_kernels.optimize(conv)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        fake_x = fake_mode.from_tensor(x.detach().float()).requires_grad_()
        torch.autograd.grad(conv(fake_x).square().sum(), fake_x)
    real_x = x.detach().float().requires_grad_()
    (grad,) = torch.autograd.grad(conv(real_x).square().sum(), real_x)
    reference.assert_close(grad, expected, torch.float32, "frozen Conv2d input gradient after a fake-tensor step")
