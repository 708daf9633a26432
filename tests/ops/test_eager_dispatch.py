"""The eager calls' host-time shortcuts change no result: where autograd records nothing (no_grad,
inference, inputs without gradients) every op runs its forward kernel without an autograd
Function, and gives exactly what the recorded call gives."""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests import reference
from tests.ops._backends import cases, device, randn


def _inputs(op: str, dtype: torch.dtype, dev: str) -> tuple:
    if op == "geglu":
        return (randn(2, 5, 2 * 7, dtype=dtype, device=dev),)
    if op == "group_norm_silu":
        return randn(2, 6, 3, 5, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev)
    kv = 9 if op == "flash_attention" else 3
    q = randn(1, 2, 5, 8, dtype=dtype, device=dev)
    return q, randn(1, 2, kv, 8, dtype=dtype, device=dev), randn(1, 2, kv, 8, dtype=dtype, device=dev)


def _call(op: str, inputs: tuple) -> torch.Tensor:
    if op == "group_norm_silu":
        x, weight, bias = inputs
        return npu_kernels.group_norm_silu(x, 3, weight, bias)
    return getattr(npu_kernels, op)(*inputs)


@pytest.mark.parametrize("op", ["geglu", "group_norm_silu", "flash_attention", "cross_attention"])
@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32, torch.float16]), indirect=["backend"])
def test_unrecorded_calls_give_the_recorded_result(backend, dtype, op):
    inputs = _inputs(op, dtype, device(backend))
    recorded = _call(op, inputs)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        no_grad = _call(op, inputs)
    frozen = _call(op, tuple(t.detach() for t in inputs))
    with torch.inference_mode():
        inference = _call(op, inputs)
    for result in (no_grad, frozen, inference):
        assert result.grad_fn is None
        assert result.shape == recorded.shape and result.dtype == recorded.dtype
        if backend == "npu" and op.endswith("attention"):
            # torch_npu's docs name another op for inference (npu_fused_infer_attention_score; the
            # PyTorch path where it cannot serve): the same maths, not the same rounding.
            reference.assert_close(result, recorded.detach(), dtype, f"npu {op} without autograd")
        else:
            torch.testing.assert_close(result, recorded.detach(), rtol=0, atol=0)


def test_only_a_parameter_needing_grad_still_records():
    """GroupNorm's weight alone requiring grad must still get its gradient."""
    x = randn(2, 6, 3, 5, dtype=torch.float32).detach()
    weight = randn(6, dtype=torch.float32)
    out = npu_kernels.group_norm_silu(x, 3, weight, None)
    (grad,) = torch.autograd.grad(out.square().sum(), weight)
    expected = torch.autograd.grad(torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, weight)).square().sum(), weight)[0]
    torch.testing.assert_close(grad, expected)


def test_lora_linear_unrecorded_calls_give_the_recorded_result():
    x = randn(2, 3, 8, dtype=torch.float32)
    weight, bias = randn(6, 8, dtype=torch.float32).detach(), randn(6, dtype=torch.float32).detach()
    lora_A, lora_B = randn(4, 8, dtype=torch.float32), randn(6, 4, dtype=torch.float32)
    recorded = npu_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        no_grad = npu_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
    assert no_grad.grad_fn is None
    torch.testing.assert_close(no_grad, recorded.detach(), rtol=0, atol=0)
