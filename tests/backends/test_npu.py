"""The Ascend NPU backend (``npu_kernels.backends.npu``) against a stand-in ``torch_npu``, on CPU tensors.

``tests/torch_npu_standin/torch_npu`` implements torch_npu's four fused ops in reference maths with
the documented signatures and input checks, and records every call. These tests check that the
adapters call torch_npu the documented way (layout, head_num, scale, keep_prob=1, mask polarity,
GELU index, affine parameters) and that forward and backward match float64 reference maths. They
say nothing about the real kernels' numerics or speed: that needs an NPU (see docs/ascend_npu.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import npu_kernels
from npu_kernels import backends, registry
from npu_kernels.backends import pytorch as torch_path
from tests import reference

RELEASES = tuple(json.loads((Path(__file__).resolve().parents[1] / "torch_npu_standin" / "torch_npu_schemas.json").read_text(encoding="utf-8"))["releases"])

STANDIN_DIR = Path(__file__).resolve().parent.parent / "torch_npu_standin"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def env(npu_standin):
    """The stand-in ``torch_npu`` and the adapters (tests/conftest.py's ``npu_standin``)."""
    assert Path(npu_standin.torch_npu.__file__).resolve().parent.parent == STANDIN_DIR
    return npu_standin


@pytest.fixture(autouse=True)
def fresh(env, monkeypatch):
    """Each test starts with an empty call log and a float32-capable emulated release, probed once
    *before* the test (so the probe's own calls are not in the log)."""
    monkeypatch.delenv(env.npu.FP32_ATTENTION_ENV, raising=False)
    env.npu.reset_capability_cache()
    assert env.npu.float32_attention_problem(torch.device("cpu")) is None
    env.torch_npu.reset()
    yield
    env.npu.reset_capability_cache()
    env.torch_npu.reset()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def randn(*shape, dtype, scale=1.0) -> torch.Tensor:
    return leaf(torch.randn(*shape, dtype=torch.float64).mul_(scale).to(dtype))


def only_call(env, name: str) -> dict:
    found = env.torch_npu.calls(name)
    assert len(found) == 1, f"expected one {name} call, got {len(found)}: {[c['name'] for c in env.torch_npu.CALLS]}"
    return found[0]


def test_the_stand_in_is_what_the_adapters_import(env):
    assert env.torch_npu.IS_STANDIN
    assert "torch_npu_standin" in env.torch_npu.__file__
    assert env.npu.torch_npu is env.torch_npu


def test_configure_npu_for_training_disables_internal_format(env, monkeypatch):
    monkeypatch.setattr(env.torch_npu.npu.config, "allow_internal_format", True)
    env.npu.configure_npu_for_training()
    assert env.torch_npu.npu.config.allow_internal_format is False


# ----------------------------------------------------------------------------------------- GEGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate,index", [("none", 0), ("tanh", 1)])
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 5, 14), (2, 7, 2 * 33)])
def test_geglu_adapter(env, shape, approximate, index, dtype):
    x = randn(*shape, dtype=dtype, scale=2.0)
    reference.check_against_reference(
        lambda t: env.npu.geglu(t, approximate), lambda t: reference.geglu(t, approximate), [x], dtype, "npu geglu"
    )
    call = only_call(env, "npu_geglu")["kwargs"]
    assert (call["dim"], call["approximate"], call["activate_left"]) == (-1, index, False)
    grad_call = only_call(env, "npu_geglu_grad")["kwargs"]  # torch_npu's own backward ran
    assert (grad_call["dim"], grad_call["approximate"]) == (-1, index)


def test_geglu_non_contiguous_input(env):
    x = leaf(torch.randn(4, 2 * 10, 3).transpose(1, 2))
    assert not x.is_contiguous()
    reference.check_against_reference(lambda t: env.npu.geglu(t, "none"), reference.geglu, [x], torch.float32, "strided")


def test_geglu_refuses_unknown_approximation(env):
    with pytest.raises(ValueError, match="approximate"):
        env.npu.geglu(torch.randn(2, 4), "fast")


# ------------------------------------------------------------------------------ GroupNorm + SiLU
GN_CASES = [
    ((1, 9, 5, 7), 3),  # N 1, odd channel count, odd spatial sizes
    ((2, 6, 3), 3),  # 1-D spatial
    ((2, 4, 1, 1), 1),  # one spatial element (4 values a group: with 2, grad x is all cancellation)
    ((1, 6, 3, 2, 3), 1),  # 3-D spatial, one group
    ((3, 16), 2),  # no spatial dims
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_silu_forward_adapter(env, shape, groups, affine, dtype):
    x = leaf(randn(*shape, dtype=dtype, scale=3.0).detach() + 0.5)
    weight = randn(shape[1], dtype=dtype) if affine else None
    bias = randn(shape[1], dtype=dtype) if affine else None
    out, mean, rstd = env.npu.group_norm_silu_forward(x, groups, weight, bias, 1e-5)

    # One kernel call, with the documented arguments; ones/zeros stand in for absent affine params.
    call = only_call(env, "npu_group_norm_silu")["kwargs"]
    assert (call["group"], call["eps"]) == (groups, 1e-5)
    if affine:
        assert torch.equal(call["weight"], weight.detach()) and torch.equal(call["bias"], bias.detach())
    else:
        assert torch.equal(call["weight"], torch.ones(shape[1], dtype=dtype))
        assert torch.equal(call["bias"], torch.zeros(shape[1], dtype=dtype))
    # torch_npu registers no backward for it: nothing may differentiate through these outputs.
    assert not (out.requires_grad or mean.requires_grad or rstd.requires_grad)

    x64 = x.detach().double()
    grouped = x64.reshape(shape[0], groups, -1)
    var64, mean64 = torch.var_mean(grouped, dim=-1, unbiased=False)
    # In x's dtype, as torch_npu returns them and as aclnnGroupNormBackward needs them.
    assert mean.dtype == rstd.dtype == dtype and mean.shape == rstd.shape == (shape[0], groups)
    stat_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # torch_npu returns stats in x's dtype
    torch.testing.assert_close(mean.double(), mean64, rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var64 + 1e-5), rtol=stat_tol, atol=stat_tol)

    # The dispatcher's backward, run from these statistics, against float64 autograd.
    params = [x] + ([weight, bias] if affine else [])
    ref_inputs = reference.as_float64_leaves(params)
    ref_out = reference.group_norm_silu(ref_inputs[0], groups, *ref_inputs[1:], eps=1e-5)
    reference.assert_close(out, ref_out, dtype, "npu group_norm_silu forward")
    grad_out = torch.randn(shape, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)
    with env.torch_npu.emulated_device():
        grads = env.npu.group_norm_silu_backward(grad_out.to(dtype), x.detach(), weight, bias, mean, rstd, groups)
    for got, want, what in zip(grads, ref_grads, ("x", "weight", "bias")):
        reference.assert_close(got, want, dtype, f"npu group_norm_silu grad {what}")


def test_bfloat16_statistics_cost_little_gradient_accuracy_at_sdxl_group_sizes(env):
    """torch_npu returns mean/rstd in the input dtype, so for bfloat16 inputs the backward runs
    from bfloat16-rounded statistics. At SDXL-like group sizes (here 2x16x16 values per group,
    |mean| ~ std) the gradient error stays close to that of float32 statistics (the PyTorch path)."""
    shape, groups = (2, 64, 16, 16), 32
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 0.5).to(torch.bfloat16)
    grad_out = torch.randn(shape, dtype=torch.float64)
    x64 = x.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.group_norm_silu(x64, groups), x64, grad_out)

    def grad_error(backward, mean, rstd):
        got = backward(grad_out.bfloat16(), x, None, None, mean, rstd, groups)[0]
        return (got.double() - want).abs().max().item()

    npu_error = grad_error(env.npu.group_norm_silu_backward, *env.npu.group_norm_silu_forward(x, groups, None, None, 1e-5)[1:])
    torch_error = grad_error(torch_path.group_norm_silu_backward, *torch_path.group_norm_silu_forward(x, groups, None, None, 1e-5)[1:])
    assert npu_error <= 2 * torch_error + 1e-3, (npu_error, torch_error)


@pytest.mark.parametrize(
    "x_dtype,w_dtype,b_dtype,kernel_dtype",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),  # less precise than x: upcast
        (torch.bfloat16, torch.float32, torch.float32, torch.float32),  # more precise: kept
        (torch.bfloat16, torch.float16, torch.float16, torch.float32),  # neither: float32
        (torch.float16, torch.float16, None, torch.float16),  # bias absent: zeros of weight's dtype
        (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),  # one dtype for both
    ],
)
def test_group_norm_silu_affine_follows_the_documented_dtype_rules(env, x_dtype, w_dtype, b_dtype, kernel_dtype):
    x = torch.randn(2, 4, 3, dtype=x_dtype)
    weight = torch.randn(4, dtype=w_dtype)
    bias = torch.randn(4, dtype=b_dtype) if b_dtype is not None else None
    env.npu.group_norm_silu_forward(x, 2, weight, bias, 1e-6)
    call = only_call(env, "npu_group_norm_silu")["kwargs"]
    assert call["weight"].dtype == call["bias"].dtype == kernel_dtype
    if bias is None:
        assert not call["bias"].any()


# ------------------------------------------------------------------------------------- attention
ATTENTION_CASES = [  # B, H, Sq, Skv, D
    (2, 3, 16, 16, 8),
    (1, 2, 1, 77, 16),  # one query token, SDXL's 77 text tokens, batch 1
    (2, 1, 5, 77, 8),
]
MASK_KINDS = ["none", "bool_b1ss", "bool_key", "bool_bnss", "bool_1nss"]


def _make_mask(kind: str, b: int, h: int, sq: int, skv: int, dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    shape = {"bool_b1ss": (b, 1, sq, skv), "bool_key": (skv,), "bool_bnss": (b, h, sq, skv), "bool_1nss": (1, h, sq, skv)}[kind]
    keep = torch.rand(shape) > 0.4
    keep[..., 0] = True  # never a fully masked row
    return keep


def _qkv(b, h, sq, skv, d, dtype, layout):
    """q, k, v as [B, H, S, D]; ``"bsnd"`` gives diffusers' transposed views of [B, S, H, D] memory."""
    if layout == "bnsd":
        return tuple(randn(b, h, s, d, dtype=dtype) for s in (sq, skv, skv))
    return tuple(leaf(torch.randn(b, s, h, d, dtype=torch.float64).to(dtype)).transpose(1, 2) for s in (sq, skv, skv))


def _expected_atten_mask(mask, full):
    """What torch_npu must receive: atten_mask True = masked out (SDPA's boolean mask inverted)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return ~mask.expand(full)


# Both layouts, both dtypes, every mask kind and shape, without the full cross product.
DTYPE_LAYOUTS = [(torch.float32, "bnsd"), (torch.bfloat16, "bsnd")]


@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS + [(torch.float32, "bsnd")])
@pytest.mark.parametrize("op", ["flash_attention", "cross_attention"])
def test_attention_adapter_both_ops(env, op, dtype, layout):
    test_attention_adapter(env, 1, 2, 3, 77, 16, "bool_b1ss", dtype, layout, op=op)


@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("b,h,sq,skv,d", ATTENTION_CASES)
def test_attention_adapter(env, b, h, sq, skv, d, kind, dtype, layout, op="flash_attention"):
    q, k, v = _qkv(b, h, sq, skv, d, dtype, layout)
    mask = _make_mask(kind, b, h, sq, skv, dtype)
    scale = 0.37
    fn = getattr(env.npu, op)
    reference.check_against_reference(
        lambda q, k, v: fn(q, k, v, mask, scale),
        lambda q, k, v: reference.attention(q, k, v, mask, scale),
        [q, k, v], dtype, f"npu {op} {kind}",
    )

    call = only_call(env, "npu_fusion_attention")
    kw = call["kwargs"]
    full = (b, h, sq, skv)
    expected_layout = "BSND" if layout == "bsnd" and not q.is_contiguous() else "BNSD"
    assert kw["input_layout"] == expected_layout
    assert kw["head_num"] == h and kw["scale"] == scale and kw["keep_prob"] == 1.0
    assert (kw["sparse_mode"], kw["padding_mask"], kw["pse"], kw["inner_precise"]) == (0, None, None, 0)
    assert call["shapes"]["query"] == ((b, sq, h, d) if expected_layout == "BSND" else (b, h, sq, d))
    want = _expected_atten_mask(mask, full)
    if want is None:
        assert kw["atten_mask"] is None
    else:  # SDPA's "True = attend" must arrive inverted: torch_npu's True = masked out
        got = kw["atten_mask"]
        assert got.dtype == torch.bool and got.is_contiguous()
        assert got.shape in {full, (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv)}
        assert torch.equal(got.expand(full), want)

    grad = only_call(env, "npu_fusion_attention_grad")["kwargs"]  # torch_npu's registered backward ran
    assert grad["scale_value"] == scale and grad["input_layout"] == expected_layout and grad["head_num"] == h
    assert grad["softmax_max"] is not None and grad["softmax_sum"] is not None and grad["attention_in"] is not None


def test_bool_mask_polarity_reaches_torch_npu_inverted(env):
    q, k = randn(1, 1, 3, 8, dtype=torch.float32), randn(1, 1, 4, 8, dtype=torch.float32)
    v = leaf(torch.arange(4.0).reshape(1, 1, 4, 1).expand(1, 1, 4, 8).contiguous())
    keep = torch.tensor([False, False, True, False])  # attend to key 2 only
    out = env.npu.flash_attention(q, k, v, keep, 0.5)
    torch.testing.assert_close(out, torch.full((1, 1, 3, 8), 2.0))
    sent = only_call(env, "npu_fusion_attention")["kwargs"]["atten_mask"]
    assert sent.shape == (1, 1, 3, 4)
    assert torch.equal(sent[0, 0, 0], torch.tensor([True, True, False, True]))


@pytest.mark.parametrize("training", [True, False])
def test_bsnd_views_are_read_in_place(env, training):
    base = [leaf(torch.randn(2, s, 3, 8, dtype=torch.float16)).requires_grad_(training) for s in (5, 77, 77)]
    q, k, v = (t.transpose(1, 2) for t in base)
    out = env.npu.cross_attention(q, k, v, None, 0.3)
    op = "npu_fusion_attention" if training else "npu_fused_infer_attention_score"
    sent = only_call(env, op)["kwargs"]
    assert sent["input_layout"] == "BSND"
    for name, t in zip(("query", "key", "value"), base):
        assert sent[name].data_ptr() == t.data_ptr(), f"{name} was copied"
    assert out.shape == (2, 3, 5, 8) and out.transpose(1, 2).is_contiguous()  # [B,S,H,D] memory, as diffusers wants


def test_mixed_layouts_are_made_consistent(env):
    q = leaf(torch.randn(2, 5, 3, 8)).transpose(1, 2)  # BSND memory
    k, v = randn(2, 3, 7, 8, dtype=torch.float32), randn(2, 3, 7, 8, dtype=torch.float32)  # BNSD memory
    reference.check_against_reference(
        lambda q, k, v: env.npu.flash_attention(q, k, v, None, 0.3),
        lambda q, k, v: reference.attention(q, k, v, None, 0.3),
        [q, k, v], torch.float32, "mixed layouts",
    )
    assert only_call(env, "npu_fusion_attention")["kwargs"]["input_layout"] == "BSND"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_zero_and_minus_inf_float_mask_reaches_torch_npu_as_a_boolean_mask(env, dtype):
    q, k, v = _qkv(2, 3, 5, 7, 8, dtype, "bnsd")
    keep = _make_mask("bool_b1ss", 2, 3, 5, 7, dtype)
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    reference.check_against_reference(
        lambda q, k, v: env.npu.flash_attention(q, k, v, mask, 0.3),
        lambda q, k, v: reference.attention(q, k, v, keep, 0.3), [q, k, v], dtype, "0/-inf mask",
    )
    kw = only_call(env, "npu_fusion_attention")["kwargs"]
    assert kw["pse"] is None and torch.equal(kw["atten_mask"], ~keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_additive_masks_never_reach_torch_npu_as_pse(env, dtype):
    """Where npu_fusion_attention adds pse (inside the scale by its formula, outside by its 2.7.1+
    example) is a device check: such masks take the PyTorch path, gradients included."""
    q, k, v = _qkv(2, 2, 4, 6, 8, dtype, "bnsd")
    mask = randn(2, 1, 4, 6, dtype=dtype)
    reference.check_against_reference(
        lambda q, k, v, m: env.npu.flash_attention(q, k, v, m, 0.35),
        lambda q, k, v, m: reference.attention(q, k, v, m, 0.35), [q, k, v, mask], dtype, "additive mask",
    )
    assert env.torch_npu.CALLS == []


def test_float_masks_under_torch_compile_say_why(env, monkeypatch):
    q = randn(1, 2, 3, 8, dtype=torch.float16)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reasons = _reasons(env, "flash_attention", q, q, q, torch.zeros(3, dtype=torch.float16))
    assert any("only boolean masks" in r for r in reasons)


# ------------------------------------------------- issue 25: the op each call gets, by the shipped docs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inference_runs_the_inference_op(env, dtype):
    """npu_fusion_attention: "该接口仅在训练场景下使用" (training only); no-grad calls go to
    npu_fused_infer_attention_score ("该接口支持推理场景下使用")."""
    q, k, v = (torch.randn(2, 3, s, 16, dtype=dtype) for s in (5, 9, 9))
    mask = _make_mask("bool_b1ss", 2, 3, 5, 9, dtype)
    with torch.no_grad():
        out = env.npu.flash_attention(q, k, v, mask, 0.25)
    reference.assert_close(out, reference.attention(q.double(), k.double(), v.double(), mask, 0.25), dtype, "inference")
    assert [c["name"] for c in env.torch_npu.CALLS] == ["npu_fused_infer_attention_score"]
    kw = env.torch_npu.CALLS[0]["kwargs"]
    assert (kw["num_heads"], kw["scale"], kw["input_layout"], kw["pse_shift"]) == (3, 0.25, "BNSD", None)
    assert torch.equal(kw["atten_mask"], ~mask)


def test_float32_inference_takes_the_pytorch_path(env):
    q, k, v = (torch.randn(1, 2, s, 8) for s in (3, 4, 4))
    with torch.no_grad():
        out = env.npu.flash_attention(q, k, v, None, 0.3)
    reference.assert_close(out, reference.attention(q.double(), k.double(), v.double(), None, 0.3), torch.float32, "fp32")
    assert env.torch_npu.CALLS == []


def test_the_stand_in_refuses_the_training_op_for_inference(env):
    q = torch.randn(1, 1, 2, 8, dtype=torch.float16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="仅在训练场景下使用.*2.14.0.*npu_fusion_attention block"):
        env.torch_npu.npu_fusion_attention(q, q, q, 1, "BNSD")


@pytest.fixture
def compiling(monkeypatch):
    """An emulated "compiled on NPU" call: ``torch.compiler.is_compiling()`` is True."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_the_stand_in_refuses_npu_fusion_attention_in_graph_mode(env, compiling):
    q = leaf(torch.randn(1, 1, 2, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="暂不支持图模式.*npu_fusion_attention block"):
        env.torch_npu.npu_fusion_attention(q, q, q, 1, "BNSD")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_training_runs_the_graph_mode_op(env, compiling, dtype):
    """Under torch.compile: npu_fusion_attention_v3, "npu_fusion_attention支持图模式的版本" (BNSD for
    aclgraph), its backward npu_fusion_attention_grad_v3 called by the adapter."""
    q, k, v = _qkv(2, 3, 5, 7, 8, dtype, "bsnd")
    mask = _make_mask("bool_b1ss", 2, 3, 5, 7, dtype)
    reference.check_against_reference(
        lambda q, k, v: env.npu.flash_attention(q, k, v, mask, 0.3),
        lambda q, k, v: reference.attention(q, k, v, mask, 0.3),
        [q, k, v], dtype, "compiled",
    )
    assert [c["name"] for c in env.torch_npu.CALLS] == ["npu_fusion_attention_v3", "npu_fusion_attention_grad_v3"]
    assert env.torch_npu.CALLS[0]["kwargs"]["input_layout"] == "BNSD"


def test_compiled_attention_on_a_release_without_the_graph_mode_op_says_why(env, compiling):
    q = randn(1, 2, 3, 8, dtype=torch.float16)
    with env.torch_npu.use_release("2.6.0.post5"):
        assert any("npu_fusion_attention_v3" in r for r in _reasons(env, "flash_attention", q, q, q, None))
    assert _reasons(env, "flash_attention", q, q, q, None) == []


def test_a_fully_masked_row_asks_for_the_invalid_row_computation(env):
    """inner_precise=2: "使能无效行计算, 避免在计算过程中存在整行mask进而导致精度有损失"."""
    q, k, v = (randn(1, 2, s, 8, dtype=torch.float16) for s in (3, 4, 4))
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    env.npu.flash_attention(q, k, v, keep, 0.3)
    keep[0, 0, 1] = False
    env.npu.flash_attention(q, k, v, keep, 0.3)
    assert [c["kwargs"]["inner_precise"] for c in env.torch_npu.calls("npu_fusion_attention")] == [0, 2]


# ---------------------------------------------------------------------------- not_supported_reasons
def _reasons(env, op, *tensors):
    """The NPU backend's reasons for ``op`` on these tensors (the op's typed inputs; GEGLU's for an unknown op)."""
    inputs = registry.OPS[op].inputs if op in registry.OPS else registry.GegluInputs
    return env.npu.not_supported_reasons(op, inputs(*tensors))


def _attention_inputs(dtype=torch.bfloat16, d=64, mask=None):
    q = torch.randn(1, 2, 8, d, dtype=dtype)
    return q, torch.randn(1, 2, 77, d, dtype=dtype), torch.randn(1, 2, 77, d, dtype=dtype), mask


@pytest.mark.parametrize(
    "op,inputs",
    [
        ("geglu", (torch.randn(2, 8, dtype=torch.bfloat16),)),
        ("group_norm_silu", (torch.randn(1, 32, 4, 4), torch.randn(32), None)),
        ("flash_attention", _attention_inputs()),
        ("cross_attention", _attention_inputs(torch.float16, mask=torch.ones(77, dtype=torch.bool))),
        ("flash_attention", _attention_inputs(torch.float32)),  # the emulated release takes float32
    ],
)
def test_supported_inputs_have_no_reasons(env, op, inputs):
    assert _reasons(env, op, *inputs) == []


@pytest.mark.parametrize(
    "op,inputs,needle",
    [
        ("geglu", (torch.randn(2, 8, dtype=torch.float64),), "float64"),
        ("geglu", (torch.randn(2, 7),), "even last dimension"),
        ("group_norm_silu", (torch.randn(1, 4, 2, dtype=torch.float64), None, None), "float64"),
        ("group_norm_silu", (torch.randn(8), None, None), "more than one dimension"),
        ("group_norm_silu", (torch.randn(0, 4, 3), None, None), "every dimension > 0"),
        ("flash_attention", _attention_inputs(torch.float64), "float64"),
        ("flash_attention", _attention_inputs(d=800), "head dim 800"),
        ("cross_attention", _attention_inputs(mask=torch.ones(77, dtype=torch.int64)), "only bool or additive"),
        ("flash_attention", (torch.randn(2, 8, 64),) * 3 + (None,), "4-D"),
        ("layer_norm", (torch.randn(2, 2),), "no op"),
    ],
)
def test_unsupported_inputs_say_why(env, op, inputs, needle):
    reasons = _reasons(env, op, *inputs)
    assert any(needle in r for r in reasons), reasons


def test_float32_attention_on_a_release_without_it_falls_back_with_a_reason(env, monkeypatch):
    monkeypatch.setattr(env.torch_npu, "SUPPORTS_FP32_ATTENTION", False)
    env.npu.reset_capability_cache()
    reasons = _reasons(env, "flash_attention", *_attention_inputs(torch.float32))
    assert len(reasons) == 1 and "float32 attention is not supported" in reasons[0], reasons
    assert _reasons(env, "flash_attention", *_attention_inputs(torch.bfloat16)) == []
    probes = len(env.torch_npu.calls("npu_fusion_attention"))
    _reasons(env, "cross_attention", *_attention_inputs(torch.float32))
    assert len(env.torch_npu.calls("npu_fusion_attention")) == probes, "the probe result is cached"
    monkeypatch.setenv(env.npu.FP32_ATTENTION_ENV, "1")
    assert _reasons(env, "flash_attention", *_attention_inputs(torch.float32)) == []


def test_float32_attention_can_be_switched_off(env, monkeypatch):
    monkeypatch.setenv(env.npu.FP32_ATTENTION_ENV, "0")
    reasons = _reasons(env, "flash_attention", *_attention_inputs(torch.float32))
    assert any(env.npu.FP32_ATTENTION_ENV in r for r in reasons), reasons


def test_meta_tensors_are_not_probed(env):
    env.npu.reset_capability_cache()
    meta = tuple(t.to("meta") for t in _attention_inputs(torch.float32)[:3]) + (None,)
    assert _reasons(env, "flash_attention", *meta) == []
    assert env.torch_npu.CALLS == []


# ------------------------------------------------------------------------ through the public API
def test_public_ops_use_torch_npu_when_forced(env):
    x = randn(3, 5, 12, dtype=torch.bfloat16)
    with npu_kernels.use_backend("npu"):
        reference.check_against_reference(
            lambda t: npu_kernels.geglu(t, "tanh"), lambda t: reference.geglu(t, "tanh"), [x], torch.bfloat16, "api geglu"
        )
    assert only_call(env, "npu_geglu")["kwargs"]["approximate"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["flash_attention", "cross_attention"])
def test_public_attention_through_npu(env, op, dtype):
    q, k, v = _qkv(2, 3, 9, 77, 16, dtype, "bsnd")  # diffusers' layout
    keep = torch.rand(2, 1, 1, 77) > 0.3
    keep[..., 0] = True
    fn = getattr(npu_kernels, op)
    with npu_kernels.use_backend("npu"):
        reference.check_against_reference(
            lambda q, k, v: fn(q, k, v, attn_mask=keep),
            lambda q, k, v: reference.attention(q, k, v, keep),
            [q, k, v], dtype, f"api {op}",
        )
    kw = only_call(env, "npu_fusion_attention")["kwargs"]
    assert kw["input_layout"] == "BSND" and kw["head_num"] == 3 and kw["scale"] == pytest.approx(16 ** -0.5)
    assert torch.equal(kw["atten_mask"], ~keep.expand(2, 1, 9, 77))
    assert len(env.torch_npu.calls("npu_fusion_attention_grad")) == 1


def _gn_module():
    return sys.modules["npu_kernels.backends.npu.group_norm_silu"]


@pytest.fixture(params=["swish", "silu"])
def gn_release(request, env, monkeypatch):
    """A torch_npu with npu_group_norm_swish (current) or without it (older releases)."""
    monkeypatch.setattr(_gn_module(), "HAS_GROUP_NORM_SWISH", request.param == "swish", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_public_group_norm_silu_through_npu(env, gn_release, affine, dtype):
    x = leaf(randn(1, 9, 5, 3, dtype=dtype, scale=2.0).detach() + 0.5)
    params = [randn(9, dtype=dtype), randn(9, dtype=dtype)] if affine else []
    with npu_kernels.use_backend("npu"), env.torch_npu.emulated_device():
        reference.check_against_reference(
            lambda x, *p: npu_kernels.group_norm_silu(x, 3, *p),
            lambda x, *p: reference.group_norm_silu(x, 3, *p),
            [x, *params], dtype, "api group_norm_silu",
        )
    if gn_release == "swish":  # torch_npu's forward and its registered backward; no ATen GroupNorm backward
        only_call(env, "npu_group_norm_swish")
        assert env.torch_npu.calls("npu_group_norm_swish_grad")
        assert not env.torch_npu.calls("aclnnGroupNormBackward")
    else:  # one forward; the backward ran ATen's (aclnnGroupNormBackward) with statistics in the gradient's dtype
        only_call(env, "npu_group_norm_silu")
        (rule,) = env.torch_npu.calls("aclnnGroupNormBackward")
        assert rule["dtypes"]["mean"] == rule["dtypes"]["rstd"] == rule["dtypes"]["gradOut"] == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backward_never_gets_float32_statistics(env, gn_release, dtype):
    """Issue 15's bug: the NPU forward's mean/rstd were cast to float32 and handed, with a half
    gradient, to ATen's GroupNorm backward, which on an NPU is aclnnGroupNormBackward (CANN 8.0:
    mean/rstd must have gradOut's dtype). float32 parameters (a model kept in float32 under
    autocast) must not change that either."""
    x = leaf(randn(2, 64, 4, 4, dtype=dtype, scale=2.0).detach() + 0.5)
    weight, bias = randn(64, dtype=torch.float32), randn(64, dtype=torch.float32)
    with npu_kernels.use_backend("npu"), env.torch_npu.emulated_device():
        out = npu_kernels.group_norm_silu(x, 32, weight, bias)
        grads = torch.autograd.grad(out, (x, weight, bias), torch.randn_like(out))
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    ref_inputs = reference.as_float64_leaves([x, weight, bias])
    ref_out = reference.group_norm_silu(ref_inputs[0], 32, *ref_inputs[1:])
    reference.assert_close(out, ref_out, dtype, "group_norm_silu fp32 params forward")


def test_the_device_rule_refuses_float32_statistics_with_a_half_gradient(env):
    """The emulated rule itself: what the old adapter did raises, as aclnnGroupNormBackward would."""
    x = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    _, mean, rstd = env.npu.group_norm_silu_forward(x, 2, None, None, 1e-5)
    with env.torch_npu.emulated_device(), pytest.raises(RuntimeError, match="aclnnGroupNormBackward.*gradOut"):
        torch_path.group_norm_silu_backward_in(torch.float32, torch.randn_like(x), x, None, None, mean.float(), rstd.float(), 2)


def test_group_norm_swish_adapter_passes_input_dtype_affine(env, monkeypatch):
    monkeypatch.setattr(_gn_module(), "HAS_GROUP_NORM_SWISH", True)
    x = randn(2, 6, 5, dtype=torch.bfloat16)
    weight = randn(6, dtype=torch.float32)
    out = env.npu.group_norm_silu(x, 3, weight, None, 1e-6)
    kw = only_call(env, "npu_group_norm_swish")["kwargs"]
    assert (kw["num_groups"], kw["eps"], kw["swish_scale"]) == (3, 1e-6, 1.0)
    assert kw["weight"].dtype == kw["bias"].dtype == torch.bfloat16 and not kw["bias"].any()
    (grad_w,) = torch.autograd.grad(out, weight, torch.randn_like(out))
    assert grad_w.dtype == torch.float32


def test_public_group_norm_silu_backward_uses_the_saved_npu_statistics(env, monkeypatch):
    """Perturb the mean/rstd the stand-in returns (its output stays right): the gradient must be
    the one computed from the perturbed statistics, i.e. the backward used what the NPU forward
    returned and did not recompute the statistics."""
    real_op = env.torch_npu.npu_group_norm_silu
    sent = {}

    def perturbed(*args, **kwargs):
        out, mean, rstd = real_op(*args, **kwargs)
        sent["mean"], sent["rstd"] = mean + 0.25, rstd * 1.5
        return out, sent["mean"], sent["rstd"]

    monkeypatch.setattr(env.torch_npu, "npu_group_norm_silu", perturbed)
    monkeypatch.setattr(_gn_module(), "HAS_GROUP_NORM_SWISH", False)
    x = leaf(torch.randn(2, 6, 4, 3) + 0.5)
    weight, bias = randn(6, dtype=torch.float32), randn(6, dtype=torch.float32)
    grad_out = torch.randn(2, 6, 4, 3)
    with npu_kernels.use_backend("npu"):
        out = npu_kernels.group_norm_silu(x, 3, weight, bias)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    assert len(env.torch_npu.calls("npu_group_norm_silu")) == 1
    expected = torch_path.group_norm_silu_backward(
        grad_out, x.detach(), weight.detach(), bias.detach(), sent["mean"], sent["rstd"], 3
    )
    true_grads = torch_path.group_norm_silu_backward(
        grad_out, x.detach(), weight.detach(), bias.detach(), *torch_path.group_norm_silu_forward(x.detach(), 3, weight, bias, 1e-5)[1:], 3
    )
    for got, want, true in zip(grads, expected, true_grads):
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, true), "the perturbation should have changed the gradient"


def test_forced_npu_backend_refuses_float64_with_the_reason(env):
    with npu_kernels.use_backend("npu"):
        with pytest.raises(npu_kernels.BackendUnavailableError, match="float64"):
            npu_kernels.geglu(torch.randn(2, 4, dtype=torch.float64))


def test_tiny_sdxl_unet_on_the_npu_backend_matches_stock_diffusers(env):
    """npu_kernels.optimize on a tiny SDXL UNet, every op forced onto the (stand-in) torch_npu:
    output and parameter gradients match stock diffusers, and all four torch_npu ops ran."""
    from tests.tiny_unet import tiny_sdxl_inputs, tiny_sdxl_unet

    def run(unet):
        unet.zero_grad(set_to_none=True)
        out = unet(**tiny_sdxl_inputs(batch=1, size=8, text_len=7)).sample
        (out.float() ** 2).mean().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}

    stock_out, stock_grads = run(tiny_sdxl_unet())
    unet = tiny_sdxl_unet()
    npu_kernels.optimize(unet)
    with npu_kernels.use_backend("npu"):
        out, grads = run(unet)
    torch.testing.assert_close(out, stock_out, atol=1e-4, rtol=1e-4)
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():
        scale = max(stock_grads[name].abs().max().item(), 1e-3)
        assert (grad - stock_grads[name]).abs().max().item() <= 1e-3 * scale, name
    for op in ("npu_geglu", "npu_geglu_grad", "npu_group_norm_swish", "npu_fusion_attention", "npu_fusion_attention_grad"):
        assert env.torch_npu.calls(op), f"{op} never ran"


# ----------------------------------------------------------- device rules: a whole LoRA step
def _lora_unet():
    from peft import LoraConfig

    from tests.tiny_unet import tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return unet


def _npu_autocast_policy_for_group_norm(model: torch.nn.Module) -> None:
    """CPU autocast leaves ``group_norm`` in the input's dtype; the NPU's autocast (torch_npu's op
    lists follow CUDA's, https://pytorch.org/docs/stable/amp.html#cuda-ops-that-can-autocast-to-float32)
    runs it in float32. The stock GroupNorm layers that ``optimize`` leaves alone (the
    Transformer2DModel norms) get that policy here, so the emulated device sees what an NPU would."""
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm and not getattr(module, "_npu_kernels_fused", False):
            module.register_forward_pre_hook(lambda _m, args: (args[0].float(),) + tuple(args[1:]))


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16"])
def test_lora_step_of_the_tiny_sdxl_unet_obeys_the_device_rules(env, gn_release, precision):
    """A whole LoRA training step (forward + backward) of the tiny SDXL UNet under
    ``npu_kernels.optimize``, every op forced onto the stand-in torch_npu, inside the emulated
    device (aclnnGroupNormBackward's dtype rule on every ATen GroupNorm backward): in bfloat16
    autocast with float32 weights, and in float16 weights. Before issue 15's fix the bfloat16 run
    raised at the first GroupNorm+SiLU backward (float32 statistics, bfloat16 gradient)."""
    from tests.tiny_unet import tiny_sdxl_inputs

    unet = _lora_unet()
    inputs = tiny_sdxl_inputs(batch=1, size=8, text_len=7)
    if precision == "fp16":
        unet.half()
        inputs = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
        inputs["added_cond_kwargs"] = {k: v.half() for k, v in inputs["added_cond_kwargs"].items()}
    npu_kernels.optimize(unet)
    if precision == "bf16-autocast":
        _npu_autocast_policy_for_group_norm(unet)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    with npu_kernels.use_backend("npu"), env.torch_npu.emulated_device(), autocast:
        loss = (unet(**inputs).sample.float() ** 2).mean()
        loss.backward()
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    expected = ["npu_geglu", "npu_fusion_attention", "npu_fusion_attention_grad"]
    expected += ["npu_group_norm_swish", "npu_group_norm_swish_grad"] if gn_release == "swish" else ["npu_group_norm_silu"]
    for op in expected:
        assert env.torch_npu.calls(op), f"{op} never ran"
    for rule in env.torch_npu.calls("aclnnGroupNormBackward"):  # every ATen GroupNorm backward that ran
        assert len(set(rule["dtypes"].values())) == 1, rule


# ------------------------------------------------------------------- chip generation (bf16)
@pytest.fixture
def older_chip(env, monkeypatch):
    """An Atlas training-series chip before A2: no bfloat16, no npu_group_norm_swish."""
    monkeypatch.setattr(env.torch_npu, "SOC_VERSION", "Ascend910A")
    env.npu.reset_capability_cache()
    yield
    env.npu.reset_capability_cache()


def test_bfloat16_is_refused_with_a_reason_on_a_chip_before_a2(env, older_chip):
    x = torch.randn(2, 8, 4, dtype=torch.bfloat16)
    reasons = _reasons(env, "geglu", x)
    assert any("Ascend910A" in r and "bfloat16" in r for r in reasons), reasons
    with npu_kernels.use_backend("npu"), pytest.raises(npu_kernels.BackendUnavailableError, match="Ascend910A"):
        npu_kernels.geglu(x)
    with pytest.raises(RuntimeError, match="bfloat16 is not documented for Ascend910A.*npu_geglu block"):
        env.torch_npu.npu_geglu(x, dim=-1, approximate=0)  # the stand-in raises as the device


@pytest.mark.parametrize("chip", ["Ascend910A", "Ascend910ProB", "Ascend910_9391"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ops_documented_for_a2_only_are_not_used_on_other_training_chips(env, monkeypatch, chip, dtype):
    """npu_fusion_attention: "支持的型号 Atlas A2 训练系列产品"; npu_group_norm_silu: Atlas A2 and the
    Atlas inference series, not the Atlas training series (910A/910ProB) nor A3 (2.5.1..2.14.0)."""
    monkeypatch.setattr(env.torch_npu, "SOC_VERSION", chip)
    env.npu.reset_capability_cache()
    x, q = torch.randn(2, 8, 4, dtype=dtype), torch.randn(1, 2, 4, 8, dtype=dtype)
    for op, tensors, torch_npu_op in (
        ("group_norm_silu", (x, None, None), "npu_group_norm_silu"),
        ("flash_attention", (q, q, q, None), "npu_fusion_attention"),
    ):
        reasons = _reasons(env, op, *tensors)
        assert any(chip in r and torch_npu_op in r for r in reasons), (op, reasons)
        with npu_kernels.use_backend("auto"):  # falls back (to the PyTorch path or SDPA)
            assert backends.select(op, *tensors) != "npu"
    with pytest.raises(RuntimeError, match=f"not documented for {chip}.*npu_fusion_attention block"):
        env.torch_npu.npu_fusion_attention(leaf(q), q, q, 2, "BNSD")
    with pytest.raises(RuntimeError, match=f"not documented for {chip}.*npu_group_norm_silu block"):
        env.torch_npu.npu_group_norm_silu(x, torch.ones(8, dtype=dtype), torch.zeros(8, dtype=dtype), 2)
    env.npu.reset_capability_cache()


def test_the_atlas_inference_series_runs_npu_group_norm_silu_not_swish(env, monkeypatch):
    monkeypatch.setattr(env.torch_npu, "SOC_VERSION", "Ascend310P3")
    monkeypatch.setattr(_gn_module(), "HAS_GROUP_NORM_SWISH", True)  # present in torch_npu, not on this chip
    env.npu.reset_capability_cache()
    x = randn(2, 8, 4, dtype=torch.float16)
    assert _reasons(env, "group_norm_silu", x, None, None) == []
    with npu_kernels.use_backend("npu"), env.torch_npu.emulated_device():
        npu_kernels.group_norm_silu(x, 2).sum().backward()
    assert env.torch_npu.calls("npu_group_norm_silu") and not env.torch_npu.calls("npu_group_norm_swish")
    env.npu.reset_capability_cache()


# ----------------------------------------------------------------- attention: shared semantics
@pytest.mark.parametrize("kind", ["bool", "neg_inf", "additive"])
@pytest.mark.parametrize("op", ["flash_attention", "cross_attention"])
def test_a_fully_masked_row_gives_zeros_and_zero_gradients_on_every_backend(env, op, kind):
    """Defined result of a query row that may attend to nothing: zeros, with zero gradients
    (ATen's CPU flash kernel and the Triton kernels already give that; SDPA's math path gives NaN)."""
    q, k, v = (randn(1, 2, 5, 8, dtype=torch.float32) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5) > 0.3
    keep[..., 0] = True
    keep[0, 0, 2] = False  # row 2 sees nothing
    if kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(1, 1, 5, 5).masked_fill(~keep, float("-inf"))
        if kind == "additive":  # not only 0/-inf: goes to torch_npu as pse
            mask = mask + 0.1 * torch.rand(1, 1, 5, 5)
    grad_out = torch.randn(1, 2, 5, 8)
    results = {}
    for backend in ("torch", "triton", "npu"):
        if backends.load(backend) is None:
            continue
        with npu_kernels.use_backend(backend):
            out = getattr(npu_kernels, op)(q, k, v, attn_mask=mask)
            results[backend] = (out,) + torch.autograd.grad(out, (q, k, v), grad_out)
    assert {"torch", "npu"} <= results.keys()
    for backend, (out, dq, dk, dv) in results.items():
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv)), backend
        assert not out[0, :, 2].any() and not dq[0, :, 2].any(), backend
        for got, want in zip((out, dq, dk, dv), results["torch"]):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=backend)


def test_head_dims_npu_fusion_attention_refuses_fall_back_under_auto(env, monkeypatch):
    """Dq == Dk and key/value of one shape (npu_fusion_attention's page): other inputs get a
    reason, so ``auto`` on an NPU takes the PyTorch path instead of failing in torch_npu."""
    monkeypatch.setitem(backends._AUTO_PRIORITY, "cpu", {"default": ("npu", "torch")})  # CPU tensors play the NPU
    q, k = randn(1, 2, 4, 16, dtype=torch.float16), randn(1, 2, 6, 16, dtype=torch.float16)
    v_narrow = randn(1, 2, 6, 8, dtype=torch.float16)
    assert backends.select("flash_attention", q, k, k, None) == "npu"
    assert backends.select("flash_attention", q, k, v_narrow, None) == "torch"
    assert any("key and value of one shape" in r for r in _reasons(env, "flash_attention", q, k, v_narrow, None))
    out = npu_kernels.flash_attention(q, k, v_narrow)
    assert out.shape == (1, 2, 4, 8) and not env.torch_npu.calls("npu_fusion_attention")


# ------------------------------------------- issue 21 item 5: every adapter call binds every release
@pytest.mark.parametrize("release", RELEASES)
def test_every_adapter_call_binds_the_schema_of_every_supported_release(env, monkeypatch, release):
    """The stand-in binds each call against the release's schema from the wheel
    (tests/torch_npu_standin/torch_npu_schemas.json): names, keyword-only and required arguments,
    argument types, number of outputs. Every torch_npu call the adapters make is made here."""
    with env.torch_npu.use_release(release):
        x = randn(2, 8, 4, dtype=torch.float16)
        env.npu.geglu(x, "none").sum().backward()
        for has_swish in (True, False):
            monkeypatch.setattr(_gn_module(), "HAS_GROUP_NORM_SWISH", has_swish)
            env.npu.group_norm_silu(leaf(x), 2, randn(8, dtype=torch.float16), randn(8, dtype=torch.float16), 1e-5).sum().backward()
        for layout in ("bnsd", "bsnd"):
            q, k, v = _qkv(2, 3, 5, 7, 8, torch.float16, layout)
            env.npu.flash_attention(q, k, v, _make_mask("bool_b1ss", 2, 3, 5, 7, None), 0.3).sum().backward()
            with torch.no_grad():
                env.npu.flash_attention(q, k, v, _make_mask("bool_b1ss", 2, 3, 5, 7, None), 0.3)
        with monkeypatch.context() as compiled:
            compiled.setattr(torch.compiler, "is_compiling", lambda: True)
            has_v3 = "npu_fusion_attention_v3" in env.torch_npu.SCHEMAS["releases"][release]["schemas"]
            assert (_reasons(env, "flash_attention", q, k, v, None) == []) == has_v3
            if has_v3:
                env.npu.flash_attention(q, k, v, None, 0.3).sum().backward()
    called = {c["name"] for c in env.torch_npu.CALLS}
    expected = {"npu_geglu", "npu_geglu_grad", "npu_group_norm_swish", "npu_group_norm_swish_grad", "npu_group_norm_silu",
                "npu_fusion_attention", "npu_fusion_attention_grad", "npu_fused_infer_attention_score"}
    assert called >= expected | ({"npu_fusion_attention_v3", "npu_fusion_attention_grad_v3"} if has_v3 else set())


def test_the_stand_in_refuses_a_call_its_release_schema_does_not_bind(env):
    x = torch.randn(2, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="does not bind to the torch_npu 2.14.0 schema"):
        env.torch_npu.npu_geglu(x, -1, 0, False, "extra")
    with pytest.raises(RuntimeError, match="approximate must be int"):
        env.torch_npu.npu_geglu(x, approximate="none")
    with pytest.raises(RuntimeError, match="weight must be Tensor"):
        env.torch_npu.npu_group_norm_swish(x, 2, 1.0, torch.zeros(4, dtype=torch.float16))


def test_torch_compile_of_the_adapter_runs_the_graph_mode_op(env):
    """A real torch.compile (dynamo, eager back end) of the adapter: _v3 and its grad, not the eager op."""
    torch._dynamo.reset()
    q, k, v = (randn(2, 3, s, 8, dtype=torch.float32) for s in (5, 7, 7))
    compiled = torch.compile(lambda q, k, v: env.npu.flash_attention(q, k, v, None, 0.3), backend="eager")
    reference.check_against_reference(
        compiled, lambda q, k, v: reference.attention(q, k, v, None, 0.3), [q, k, v], torch.float32, "compiled"
    )
    assert [c["name"] for c in env.torch_npu.CALLS] == ["npu_fusion_attention_v3", "npu_fusion_attention_grad_v3"]
    torch._dynamo.reset()
