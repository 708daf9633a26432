"""The PyTorch path of GroupNorm+SiLU dispatches no more ATen ops than stock
``F.silu(F.group_norm(...))`` forward + backward, except the one recompute that buys its memory
saving: the pre-SiLU activation ``y`` is recomputed in the backward from x, mean and rstd (three
ops: ``x - mean``, ``rstd * w`` on ``[N, G, C/G]``, one ``addcmul``), where stock autograd keeps
``y``, a full-size tensor. On the CPU with half-precision input the mixed-type path adds casts of
small ``[C]`` parameters (and, for y, one cast to x's dtype); counted exactly below."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import npu_kernels

RECOMPUTE = ("sub", "mul", "addcmul")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.views: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.ops).append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _count(fn, x, weight, bias):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_, rest = leaves[0], iter(leaves[1:])
    w_ = next(rest) if weight is not None else None
    b_ = next(rest) if bias is not None else None
    grad = torch.randn_like(x)
    with _Count() as counter:
        out = fn(x_, w_, b_)
        torch.autograd.grad(out, leaves, grad)
    return counter


@pytest.mark.parametrize(
    "x_dtype,param_dtype,extra",
    [
        (torch.float32, torch.float32, ()),
        (torch.float32, None, ()),
        (torch.bfloat16, torch.float32, ("_to_copy",)),  # autocast's case: y back to bf16 for SiLU's backward
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_path_dispatches_stock_ops_plus_the_recompute(x_dtype, param_dtype, extra, channels_last):
    x = torch.randn(2, 64, 6, 5, dtype=x_dtype) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(64, dtype=param_dtype) if param_dtype is not None else None
    bias = torch.randn(64, dtype=param_dtype) if param_dtype is not None else None
    stock = _count(lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)), x, weight, bias)
    with npu_kernels.use_backend("torch"):
        ours = _count(lambda x, w, b: npu_kernels.group_norm_silu(x, 32, w, b), x, weight, bias)
    recompute = list(RECOMPUTE) if weight is not None else ["sub", "mul_"]
    expected = sorted(op.replace("silu", "silu_") if op == "silu" else op for op in stock.ops) + recompute + list(extra)
    assert sorted(ours.ops) == sorted(expected), (stock.ops, ours.ops)
    assert "repeat_interleave" not in ours.ops + ours.views and "promote_types" not in ours.ops
