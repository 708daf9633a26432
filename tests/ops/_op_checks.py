"""Checks every op file runs the same way: torch.library's opcheck, torch.compile(fullgraph=True),
and eager calls (autograd.Function) against the custom op that torch.compile sees."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from tests import reference


def check_compiled(fn: Callable, reference_fn: Callable, inputs: Sequence, dtype: torch.dtype, what: str) -> None:
    """``torch.compile(fn, fullgraph=True)`` (any graph break fails) against float64 reference maths,
    forward and backward. Call it inside ``use_backend``: the compiled graph then holds our custom
    op running that backend's kernels."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    try:
        reference.check_against_reference(compiled, reference_fn, list(inputs), dtype, f"{what} compiled")
    finally:
        torch._dynamo.reset()


def check_eager_matches_custom_op(public_call: Callable, custom_op, args: Sequence) -> None:
    """An eager public call runs the kernels through an autograd.Function (cheaper per call) and must
    not dispatch the custom op; values and gradients must equal the custom op's bit for bit."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.profiler.profile() as prof:
        eager_out = public_call(*args)
    assert not any(e.name.startswith("npu_kernels::") for e in prof.events()), "eager call dispatched the custom op"
    custom_out = custom_op(*args)
    custom_out = custom_out[0] if isinstance(custom_out, (tuple, list)) else custom_out
    cotangent = torch.randn_like(eager_out)
    torch.testing.assert_close(eager_out, custom_out, rtol=0, atol=0)
    for eager_grad, custom_grad in zip(torch.autograd.grad(eager_out, leaves, cotangent),
                                       torch.autograd.grad(custom_out, leaves, cotangent)):
        torch.testing.assert_close(eager_grad, custom_grad, rtol=0, atol=0)


def serves_through_custom_op(backend: str, op: str) -> bool:
    """False when the backend serves ``op`` with its own autograd-complete function (the NPU
    backend's geglu and cross_attention): our custom op is then not what runs."""
    from npu_kernels import backends

    return backends.provided(backend, op) is None
