"""lora_linear: float64 reference maths, PEFT's own LoRA layer (fp32 and bf16 autocast), the custom
op (opcheck, eager path equal to it, compiled), the checks, and its launch count against PEFT's."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

import npu_kernels
from benchmarks.dispatch_counts import count_dispatches
from npu_kernels.ops.lora_linear import _lora_linear
from tests import reference
from tests.ops._op_checks import check_compiled, check_eager_matches_custom_op

IN, OUT = 24, 20


def lora_reference(x, weight, bias, lora_A, lora_B, scale):
    out = x @ weight.transpose(0, 1) + scale * (x @ lora_A.transpose(0, 1)) @ lora_B.transpose(0, 1)
    return out + bias if bias is not None else out


def make_inputs(shape, rank, bias=True, dtype=torch.float32, noncontiguous=False, frozen=True):
    x = torch.randn(*shape[:-1], shape[-1] * 2 if noncontiguous else shape[-1], dtype=dtype)
    x = (x[..., ::2] if noncontiguous else x).requires_grad_(True)
    weight = (torch.randn(OUT, IN, dtype=dtype) / IN**0.5).requires_grad_(not frozen)
    b = (torch.randn(OUT, dtype=dtype)).requires_grad_(not frozen) if bias else None
    lora_A = (torch.randn(rank, IN, dtype=dtype) / IN**0.5).requires_grad_(True)
    lora_B = (torch.randn(OUT, rank, dtype=dtype) / rank**0.5).requires_grad_(True)
    return x, weight, b, lora_A, lora_B


@pytest.mark.parametrize("rank", [1, 4, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(7, IN), (2, 9, IN), (1, 1, IN)], ids=["2d", "3d", "one-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(rank, bias, shape, dtype):
    inputs = make_inputs(shape, rank, bias, dtype)
    op = lambda *a: npu_kernels.lora_linear(*a, 0.75)  # noqa: E731
    ref = lambda *a: lora_reference(*a, 0.75)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, dtype, f"lora_linear r{rank} {shape}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_without_autocast_matches_float64_reference(dtype, bias):
    """Every operand fp16 (or bf16), no autocast: values and gradients in that dtype, against float64."""
    inputs = make_inputs((2, 9, IN), 4, bias, dtype)
    op = lambda *a: npu_kernels.lora_linear(*a, 0.75)  # noqa: E731
    ref = lambda *a: lora_reference(*a, 0.75)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, dtype, f"lora_linear {dtype}")


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_noncontiguous_input_zero_scale_and_unfrozen_base(scale):
    inputs = make_inputs((3, 5, IN), 4, noncontiguous=True, frozen=False)
    assert not inputs[0].is_contiguous()
    op = lambda *a: npu_kernels.lora_linear(*a, scale)  # noqa: E731
    ref = lambda *a: lora_reference(*a, scale)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, torch.float32, f"lora_linear scale {scale}")


def peft_layer(rank: int, bias: bool, lora_dtype=torch.float32, base_dtype=torch.float32):
    """A PEFT lora.Linear as diffusers' recipe builds it: frozen base, trainable A and B (B random)."""
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=bias))
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]), model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        if bias:
            layer.base_layer.bias.normal_()
    layer.base_layer.to(base_dtype).requires_grad_(False)
    layer.lora_A.to(lora_dtype)
    layer.lora_B.to(lora_dtype)
    return layer


def _params(layer):
    return (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
            layer.lora_B["default"].weight, layer.scaling["default"])


@pytest.mark.parametrize("rank", [1, 4, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(6, IN), (2, 7, IN)], ids=["2d", "3d"])
def test_matches_peft_fp32(rank, bias, shape):
    layer = peft_layer(rank, bias)
    x = torch.randn(shape, requires_grad=True)
    weight, b, lora_A, lora_B, scale = _params(layer)
    leaves = (x, lora_A, lora_B)
    cotangent = torch.randn(*shape[:-1], OUT)
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected, leaves, cotangent)
    actual = npu_kernels.lora_linear(x, weight, b, lora_A, lora_B, scale)
    actual_grads = torch.autograd.grad(actual, leaves, cotangent)
    reference.assert_close(actual, expected, torch.float32, "forward")
    for name, got, want in zip(("x", "lora_A", "lora_B"), actual_grads, expected_grads):
        reference.assert_close(got, want, torch.float32, f"grad {name}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 64])
def test_bf16_autocast_matches_peft_and_float64(x_dtype, rank):
    """The recipe's mixed precision: bf16 base, fp32 LoRA, bf16 autocast. Ours and PEFT's values and
    gradients are both judged against float64 maths on the bf16-rounded operands (what autocast
    computes with), at the bf16 tolerance; gradients come back in each parameter's dtype."""
    layer = peft_layer(rank, True, base_dtype=torch.bfloat16)
    weight, b, lora_A, lora_B, scale = _params(layer)
    x = torch.randn(3, 11, IN, dtype=x_dtype, requires_grad=True)
    cotangent = torch.randn(3, 11, OUT, dtype=torch.bfloat16)
    leaves = (x, lora_A, lora_B)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        return out, torch.autograd.grad(out, leaves, cotangent)

    ours, ours_grads = run(lambda: npu_kernels.lora_linear(x, weight, b, lora_A, lora_B, scale))
    peft, peft_grads = run(lambda: layer(x))
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (x, weight, b, lora_A, lora_B)]
    ref = lora_reference(*rounded, scale)
    ref_grads = torch.autograd.grad(ref, [rounded[0], rounded[3], rounded[4]], cotangent.double())
    assert ours.dtype == peft.dtype == torch.bfloat16
    for what, got in (("ours", ours), ("peft", peft)):
        reference.assert_close(got, ref, torch.bfloat16, f"{what} forward")
    for name, got, want, leaf in zip(("x", "lora_A", "lora_B"), ours_grads, peft_grads, leaves):
        assert got.dtype == want.dtype == leaf.dtype, name
    for name, got, want, ref_grad in zip(("x", "lora_A", "lora_B"), ours_grads, peft_grads, ref_grads):
        reference.assert_close(got, ref_grad, torch.bfloat16, f"ours grad {name}")
        reference.assert_close(want, ref_grad, torch.bfloat16, f"peft grad {name}")


def test_opcheck_and_eager_path_equal_custom_op():
    for bias in (True, False):
        args = (*make_inputs((2, 5, IN), 4, bias), 0.5)
        torch.library.opcheck(_lora_linear, args)
        check_eager_matches_custom_op(npu_kernels.lora_linear, _lora_linear, args)


def test_compiled_matches_reference():
    inputs = make_inputs((2, 5, IN), 4)
    check_compiled(lambda *a: npu_kernels.lora_linear(*a, 0.5), lambda *a: lora_reference(*a, 0.5),
                   inputs, torch.float32, "lora_linear")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dispatches_fewer_ops_than_peft(autocast):
    """Forward+backward of our op against PEFT's layer it replaces: fewer ATen ops, fewer launches."""
    layer = peft_layer(4, True)
    x = torch.randn(2, 9, IN, requires_grad=True)
    weight, b, lora_A, lora_B, scale = _params(layer)

    def step(fn):
        def run():
            for t in (x, lora_A, lora_B):
                t.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn()
            out.backward(torch.ones_like(out))
        return run

    peft = count_dispatches(step(lambda: layer(x)))
    ours = count_dispatches(step(lambda: npu_kernels.lora_linear(x, weight, b, lora_A, lora_B, scale)))
    assert ours.dispatched < peft.dispatched
    assert ours.launching < peft.launching


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][..., :-1],) + a[1:], "incompatible shapes"),
        (lambda a: a[:3] + (a[3][:, :-1],) + a[4:], "incompatible shapes"),
        (lambda a: a[:4] + (a[4][:, :-1],), "incompatible shapes"),
        (lambda a: a[:2] + (a[2][:-1],) + a[3:], "incompatible shapes"),
        (lambda a: (a[0].double(),) + a[1:], "dtypes differ"),
        (lambda a: a[:1] + (a[1][0],) + a[2:], "need x"),
    ],
    ids=["x", "lora_A", "lora_B", "bias", "dtype", "weight-1d"],
)
def test_errors_name_op_and_shapes(change, message):
    args = tuple(t.detach() for t in make_inputs((3, IN), 4))
    with pytest.raises(ValueError, match=f"lora_linear: .*{message}"):
        npu_kernels.lora_linear(*change(args), 1.0)
