"""dora_linear: float64 reference maths, PEFT's own DoRA layer (fp32 and bf16 autocast), the row norms
without ``B A`` and their cache, the custom op (opcheck, eager path equal to it, compiled), the checks,
its launch count against PEFT's, and PEFT DoRA layers routed to it by ``npu_kernels.optimize``."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

import npu_kernels
from benchmarks.dispatch_counts import count_dispatches
from npu_kernels import peft_lora
from npu_kernels.ops.dora_linear import _DORA_LINEAR, _dora_linear, dora_weight_norm
from tests import reference
from tests.ops._op_checks import check_compiled, check_eager_matches_custom_op
from tests.ops.test_lora_linear import IN, OUT, lora_reference, make_inputs


def dora_reference(x, weight, bias, lora_A, lora_B, magnitude, scale):
    """PEFT's DoRA as the paper writes it: the row norms of ``W + s·B A`` formed in full, detached."""
    norm = torch.linalg.norm(weight + scale * lora_B @ lora_A, dim=1).detach()
    out = (magnitude / norm) * lora_reference(x, weight, None, lora_A, lora_B, scale)
    return out + bias if bias is not None else out


def make_dora_inputs(shape, rank, bias=True, dtype=torch.float32, noncontiguous=False, frozen=True):
    """lora_linear's inputs plus a magnitude away from the row norms (as after some training)."""
    x, weight, b, lora_A, lora_B = make_inputs(shape, rank, bias, dtype, noncontiguous, frozen)
    magnitude = (torch.rand(OUT, dtype=dtype) + 0.5).requires_grad_(True)
    return x, weight, b, lora_A, lora_B, magnitude


@pytest.mark.parametrize("rank", [1, 4, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(7, IN), (2, 9, IN), (1, 1, IN)], ids=["2d", "3d", "one-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(rank, bias, shape, dtype):
    inputs = make_dora_inputs(shape, rank, bias, dtype)
    op = lambda *a: npu_kernels.dora_linear(*a, 0.75)  # noqa: E731
    ref = lambda *a: dora_reference(*a, 0.75)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, dtype, f"dora_linear r{rank} {shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_without_autocast_matches_float64_reference(dtype):
    """Every operand fp16 (or bf16), no autocast: values and gradients in that dtype, against float64."""
    inputs = make_dora_inputs((2, 9, IN), 4, True, dtype)
    op = lambda *a: npu_kernels.dora_linear(*a, 0.75)  # noqa: E731
    ref = lambda *a: dora_reference(*a, 0.75)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, dtype, f"dora_linear {dtype}")


@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_noncontiguous_input_zero_scale_and_unfrozen_base(scale):
    """Gradients for the base weight and bias too (they are not frozen here)."""
    inputs = make_dora_inputs((3, 5, IN), 4, noncontiguous=True, frozen=False)
    assert not inputs[0].is_contiguous()
    op = lambda *a: npu_kernels.dora_linear(*a, scale)  # noqa: E731
    ref = lambda *a: dora_reference(*a, scale)  # noqa: E731
    reference.check_against_reference(op, ref, inputs, torch.float32, f"dora_linear scale {scale}")


# ------------------------------------------------------------------------- the row norms
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weight", "bf16-weight"])
def test_weight_norm_without_forming_BA_matches_float64(weight_dtype):
    _x, weight, _b, lora_A, lora_B = make_inputs((1, IN), 6)
    weight = weight.to(weight_dtype)
    norm = dora_weight_norm(weight, lora_A, lora_B, 1.5)
    exact = torch.linalg.norm(weight.double() + 1.5 * lora_B.double() @ lora_A.double(), dim=1)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    # W Aᵀ runs in the weight's dtype: the bf16 weight's cross term carries bf16 rounding.
    reference.assert_close(norm, exact, torch.float32 if weight_dtype == torch.float32 else torch.bfloat16, "norm")


def test_squared_weight_norm_is_cached_until_the_weight_changes():
    _x, weight, _b, lora_A, lora_B = make_inputs((1, IN), 4)

    def exact():
        return torch.linalg.norm(weight.double() + 0.5 * lora_B.double() @ lora_A.double(), dim=1)

    norm_calls = []
    original = torch.linalg.vector_norm

    def counting_norm(*args, **kwargs):
        norm_calls.append(1)
        return original(*args, **kwargs)

    torch.linalg.vector_norm = counting_norm
    try:
        first = dora_weight_norm(weight, lora_A, lora_B, 0.5)
        with torch.no_grad():
            lora_B.mul_(2)  # A and B change at every step: never cached
        reference.assert_close(dora_weight_norm(weight, lora_A, lora_B, 0.5), exact(), torch.float32, "new B")
        assert len(norm_calls) == 1, "‖W‖² was computed again for an unchanged weight"
        with torch.no_grad():
            weight.mul_(3)  # in place: the version counter changes
        reference.assert_close(dora_weight_norm(weight, lora_A, lora_B, 0.5), exact(), torch.float32, "in place")
        weight.data = torch.randn_like(weight)  # replaced storage (PEFT's merge, diffusers' fuse_lora)
        reference.assert_close(dora_weight_norm(weight, lora_A, lora_B, 0.5), exact(), torch.float32, "replaced")
        assert len(norm_calls) == 3
    finally:
        torch.linalg.vector_norm = original
    assert not torch.equal(first, dora_weight_norm(weight, lora_A, lora_B, 0.5))


# ------------------------------------------------------------------------------- PEFT's DoRA
def peft_dora_layer(rank: int, bias: bool, base_dtype=torch.float32, dropout=0.0):
    """A PEFT DoRA lora.Linear as diffusers' DreamBooth script builds it (frozen base, gaussian init),
    then trained a little: B random and the magnitude away from the row norms."""
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=bias))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, init_lora_weights="gaussian",
                        lora_dropout=dropout, target_modules=["0"])
    layer = inject_adapter_in_model(config, model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(OUT) + 0.5)
        if bias:
            layer.base_layer.bias.normal_()
    layer.base_layer.to(base_dtype).requires_grad_(False)
    return layer


def _dora_params(layer):
    return (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
            layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight, layer.scaling["default"])


@pytest.mark.parametrize("rank", [1, 4, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(6, IN), (2, 7, IN), (1, 1, IN)], ids=["2d", "3d", "one-row"])
def test_matches_peft_fp32(rank, bias, shape):
    """Ours and PEFT's DoRA, values and gradients (x, A, B, magnitude), each against float64 maths and
    against each other."""
    layer = peft_dora_layer(rank, bias)
    params = _dora_params(layer)
    x = torch.randn(shape, requires_grad=True)
    leaves = (x, params[2], params[3], params[4])
    cotangent = torch.randn(*shape[:-1], OUT)
    peft = layer(x)
    peft_grads = torch.autograd.grad(peft, leaves, cotangent)
    ours = npu_kernels.dora_linear(x, *params)
    ours_grads = torch.autograd.grad(ours, leaves, cotangent)
    exact_leaves = reference.as_float64_leaves(leaves)
    exact = dora_reference(exact_leaves[0], params[0].double(), None if params[1] is None else params[1].double(),
                           *exact_leaves[1:], params[5])
    exact_grads = torch.autograd.grad(exact, exact_leaves, cotangent.double())
    reference.assert_close(ours, peft, torch.float32, "forward vs PEFT")
    for what, out in (("ours", ours), ("peft", peft)):
        reference.assert_close(out, exact, torch.float32, f"{what} forward")
    for name, got, want, ref_grad in zip(("x", "lora_A", "lora_B", "magnitude"), ours_grads, peft_grads, exact_grads):
        reference.assert_close(got, want, torch.float32, f"grad {name} vs PEFT")
        reference.assert_close(got, ref_grad, torch.float32, f"ours grad {name}")
        reference.assert_close(want, ref_grad, torch.float32, f"peft grad {name}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 64])
def test_bf16_autocast_matches_peft_and_float64(x_dtype, rank):
    """The recipe's mixed precision: bf16 base, fp32 LoRA and magnitude, bf16 autocast. Ours and PEFT's
    values and gradients are judged against float64 maths on the bf16-rounded GEMM operands (the norm
    from the fp32 LoRA weights, as PEFT computes it), at the bf16 tolerance; gradients come back in each
    parameter's dtype."""
    layer = peft_dora_layer(rank, True, base_dtype=torch.bfloat16)
    weight, b, lora_A, lora_B, magnitude, scale = _dora_params(layer)
    x = torch.randn(3, 11, IN, dtype=x_dtype, requires_grad=True)
    cotangent = torch.randn(3, 11, OUT, dtype=torch.bfloat16)
    leaves = (x, lora_A, lora_B, magnitude)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        return out, torch.autograd.grad(out, leaves, cotangent)

    ours, ours_grads = run(lambda: npu_kernels.dora_linear(x, weight, b, lora_A, lora_B, magnitude, scale))
    peft, peft_grads = run(lambda: layer(x))
    rounded = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (x, weight, b, lora_A, lora_B)]
    exact_magnitude = magnitude.detach().double().requires_grad_(True)
    norm = torch.linalg.norm(weight.double() + scale * lora_B.detach().double() @ lora_A.detach().double(), dim=1)
    exact = (exact_magnitude / norm) * lora_reference(rounded[0], rounded[1], None, *rounded[3:], scale) + rounded[2]
    exact_grads = torch.autograd.grad(exact, [rounded[0], rounded[3], rounded[4], exact_magnitude], cotangent.double())
    assert ours.dtype == peft.dtype == torch.bfloat16
    for what, got in (("ours", ours), ("peft", peft)):
        reference.assert_close(got, exact, torch.bfloat16, f"{what} forward")
    names = ("x", "lora_A", "lora_B", "magnitude")
    for name, got, want, leaf in zip(names, ours_grads, peft_grads, leaves):
        assert got.dtype == want.dtype == leaf.dtype, name
    for name, got, want, ref_grad in zip(names, ours_grads, peft_grads, exact_grads):
        reference.assert_close(got, ref_grad, torch.bfloat16, f"ours grad {name}")
        reference.assert_close(want, ref_grad, torch.bfloat16, f"peft grad {name}")


# ------------------------------------------------------------------- custom op and counts
def test_opcheck_and_eager_path_equal_custom_op():
    for bias in (True, False):
        x, weight, b, lora_A, lora_B, magnitude = make_dora_inputs((2, 5, IN), 4, bias)
        args = (x, weight, b, lora_A, lora_B, magnitude, dora_weight_norm(weight, lora_A, lora_B, 0.5), 0.5)
        torch.library.opcheck(_dora_linear, args)
        check_eager_matches_custom_op(_DORA_LINEAR, _dora_linear, args)


def test_compiled_matches_reference():
    inputs = make_dora_inputs((2, 5, IN), 4)
    check_compiled(lambda *a: npu_kernels.dora_linear(*a, 0.5), lambda *a: dora_reference(*a, 0.5),
                   inputs, torch.float32, "dora_linear")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dispatches_fewer_ops_than_peft(autocast):
    """Forward+backward of our op against PEFT's DoRA layer it replaces: fewer ATen ops, fewer launches."""
    layer = peft_dora_layer(4, True)
    x = torch.randn(2, 9, IN, requires_grad=True)
    params = _dora_params(layer)

    def step(fn):
        def run():
            for t in (x, *params[2:5]):
                t.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn()
            out.backward(torch.ones_like(out))
        return run

    peft = count_dispatches(step(lambda: layer(x)))
    ours = count_dispatches(step(lambda: npu_kernels.dora_linear(x, *params)))
    assert ours.dispatched < peft.dispatched
    assert ours.launching < peft.launching


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: (a[0][..., :-1],) + a[1:], "incompatible shapes"),
        (lambda a: a[:3] + (a[3][:, :-1],) + a[4:], "incompatible shapes"),
        (lambda a: (a[0].double(),) + a[1:], "dtypes differ"),
        (lambda a: a[:5] + (a[5][:-1],), "magnitude must be"),
    ],
    ids=["x", "lora_A", "dtype", "magnitude"],
)
def test_errors_name_op_and_shapes(change, message):
    args = tuple(t.detach() for t in make_dora_inputs((3, IN), 4))
    with pytest.raises(ValueError, match=f"dora_linear: .*{message}"):
        npu_kernels.dora_linear(*change(args), 1.0)


# ------------------------------------------------------------ PEFT layers routed by optimize()
@pytest.fixture
def dora_calls(monkeypatch):
    """How many times the optimized PEFT layers ran npu_kernels.dora_linear."""
    calls = []
    original = peft_lora.dora_linear
    monkeypatch.setattr(peft_lora, "dora_linear", lambda *a: calls.append(1) or original(*a))
    return calls


def test_optimize_routes_dora_layers_to_dora_linear(dora_calls):
    layer = peft_dora_layer(4, True)
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 5, IN, requires_grad=True)
    expected = model(x)
    report = npu_kernels.optimize(model)
    assert report.lora_layers == 1 and report.lora_fallbacks == []
    actual = model(x)
    assert len(dora_calls) == 1
    reference.assert_close(actual, expected, torch.float32, "optimized DoRA layer")
    npu_kernels.restore(model)


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda layer: None, "LoRA dropout"),  # dropout active in training mode
        (lambda layer: layer.merge(), "merged"),
        (lambda layer: layer.enable_adapters(False), "adapters disabled"),
    ],
    ids=["dropout", "merged", "disabled"],
)
def test_states_our_op_does_not_cover_run_peft_forward(dora_calls, setup, reason):
    """PEFT's DoRA with dropout in training takes the base output from the undropped x and the DoRA
    terms from the dropped x; merged and disabled adapters are PEFT's business: PEFT's forward runs."""
    layer = peft_dora_layer(4, True, dropout=0.5 if reason == "LoRA dropout" else 0.0)
    setup(layer)
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 5, IN)
    torch.manual_seed(0)
    expected = model(x)
    report = npu_kernels.optimize(model)
    assert len(report.lora_fallbacks) == 1 and reason in report.lora_fallbacks[0]
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert dora_calls == []
    npu_kernels.restore(model)
