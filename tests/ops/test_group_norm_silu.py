"""GroupNorm + SiLU (``npu_kernels.group_norm_silu``) on every backend that runs here, against
float64 reference maths, forward and backward; the kernel contract's statistics; its input checks,
torch.library registration and torch.compile support."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import npu_kernels
from npu_kernels import backends
from tests import reference
from tests.ops import _op_checks
from tests.ops._backends import cases, device, leaf, randn

CASES = [
    # (shape, groups, affine, channels-last too)   why
    ((1, 96, 5, 7), 32, "both", False),    # batch 1, 3 channels per group, odd spatial
    ((2, 6, 9, 11), 3, "none", True),      # no affine parameters, 2 channels per group
    ((2, 6, 9, 11), 3, "weight", False),   # weight only
    ((1, 16, 33, 33), 4, "both", True),    # 1089 positions: several spatial chunks per group
    ((1, 256, 3, 3), 1, "bias", True),     # 256 channels in one group: several channel blocks
    ((2, 40, 1, 1), 8, "both", False),     # a single spatial element, 5 channels per group
    ((2, 12, 50), 4, "both", True),        # 1-D spatial
    ((1, 10, 3, 4, 5), 2, "both", True),   # 3-D spatial, C and C/G not powers of two
    ((3, 24), 6, "both", False),           # no spatial dims
]
LAYOUT_CASES = [
    pytest.param(shape, groups, affine, layout, id=f"{shape}-G{groups}-{affine}-{layout}")
    for shape, groups, affine, channels_last in CASES
    for layout in (("contiguous", "channels_last") if channels_last else ("contiguous",))
]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels innermost in memory, whatever the rank (``channels_last`` for 4-D)."""
    return x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def _inputs(shape, affine, dtype, dev, layout="contiguous", param_dtype=None):
    # An offset of 4 against a spread of 3: catches a naive E[x^2] - E[x]^2 variance.
    x = randn(*shape, dtype=dtype, device=dev, scale=3.0, offset=4.0)
    if layout == "channels_last":
        x = leaf(_channels_last(x))
    param_dtype = dtype if param_dtype is None else param_dtype
    weight = randn(shape[1], dtype=param_dtype, device=dev) if affine in ("both", "weight") else None
    bias = randn(shape[1], dtype=param_dtype, device=dev) if affine in ("both", "bias") else None
    return x, weight, bias


def _check(x, groups, weight, bias, dtype, what, eps=1e-5, backend=None):
    inputs = [t for t in (x, weight, bias) if t is not None]

    def split(*t):  # the inputs back into (x, weight, bias) with their Nones
        it = iter(t)
        return next(it), next(it) if weight is not None else None, next(it) if bias is not None else None

    def reference_fn(*t):
        x64, w64, b64 = split(*t)
        if w64 is None and b64 is not None:  # aten's group_norm backward fails on (None, bias)
            w64 = torch.ones(x64.shape[1], dtype=torch.float64)
        return reference.group_norm_silu(x64, groups, w64, b64, eps)

    reference.check_against_reference(
        lambda *t: npu_kernels.group_norm_silu(split(*t)[0], groups, *split(*t)[1:], eps=eps),
        reference_fn, inputs, dtype, what,
    )


@pytest.mark.parametrize("shape,groups,affine,layout", LAYOUT_CASES)
@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_group_norm_silu_matches_reference(backend, dtype, shape, groups, affine, layout):
    x, weight, bias = _inputs(shape, affine, dtype, device(backend), layout)
    if backend != "npu":  # torch_npu's kernel returns a contiguous tensor
        out = npu_kernels.group_norm_silu(x, groups, weight, bias)
        assert out.stride() == x.stride(), "the output keeps x's memory format"
    _check(x, groups, weight, bias, dtype, f"group_norm_silu[{backend}] {layout}", backend=backend)


@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float16, torch.bfloat16]), indirect=["backend"])
def test_half_precision_input_with_float32_parameters(backend, dtype):
    # Autocast leaves GroupNorm's parameters in float32; the cotangent is contiguous while x is
    # channels_last (what a following convolution hands back).
    x, weight, bias = _inputs((1, 32, 6, 10), "both", dtype, device(backend), "channels_last", torch.float32)
    out = npu_kernels.group_norm_silu(x, 8, weight, bias, eps=1e-6)
    assert out.dtype == dtype
    _check(x, 8, weight, bias, dtype, f"group_norm_silu[{backend}] fp32 params", eps=1e-6, backend=backend)


@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32]), indirect=["backend"])
def test_large_mean_small_variance_keeps_precision(backend, dtype):
    # Mean 50, std 0.5: the backward must centre before scaling (folding the mean into a shift
    # cancels). 4 channels x 1600 positions per group: two Triton chunks. (Mean 1000 / std 0.1 is
    # beyond what float32 statistics can give per element: see the statistics test below.)
    x = randn(1, 8, 40, 40, dtype=dtype, device=device(backend), scale=0.5, offset=50.0)
    weight, bias = randn(8, dtype=dtype, device=device(backend)), randn(8, dtype=dtype, device=device(backend))
    _check(x, 2, weight, bias, dtype, f"group_norm_silu[{backend}] large mean")


@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32, torch.float16]), indirect=["backend"])
def test_constant_input_stays_finite(backend, dtype):
    # Zero variance: rstd = 1/sqrt(eps), x - mean = 0 exactly; the output is silu(bias).
    x = leaf(torch.full((1, 12, 3, 5), 3.0, dtype=dtype, device=device(backend)))
    bias = randn(12, dtype=dtype, device=device(backend))
    out = npu_kernels.group_norm_silu(x, 6, None, bias)
    out.sum().backward()
    expected = F.silu(bias.detach().double().cpu()).view(1, 12, 1, 1).expand(1, 12, 3, 5)
    reference.assert_close(out, expected, dtype, "constant input")
    assert torch.isfinite(x.grad).all() and torch.isfinite(bias.grad).all()


# ------------------------------------------------------------------------------- kernel contract
def _reference_statistics(x: torch.Tensor, groups: int, eps: float):
    x64 = x.detach().cpu().double().unflatten(1, (groups, -1)).flatten(2)
    var, mean = torch.var_mean(x64, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


@pytest.mark.parametrize("shape,groups", [((1, 96, 5, 7), 32), ((1, 8, 40, 40), 2), ((2, 12, 50), 4)], ids=str)
# Mean 100, std 0.1: a one-pass E[x^2] - E[x]^2 variance in float32 would lose every digit of rstd.
@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_kernel_statistics_are_float32_and_exact(backend, dtype, shape, groups):
    """``group_norm_silu_forward`` returns float32 ``mean``/``rstd`` [N, G] (what the backward reads)."""
    x = randn(*shape, dtype=dtype, device=device(backend), scale=0.1, offset=100.0).detach()
    out, mean, rstd = backends.kernel_module(backend).group_norm_silu_forward(x, groups, None, None, 1e-5)
    ref_mean, ref_rstd = _reference_statistics(x, groups, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0], groups)
    # Float32 statistics of the (rounded) input: float32 accuracy whatever the input's dtype.
    reference.assert_close(mean, ref_mean, torch.float32, "mean")
    reference.assert_close(rstd, ref_rstd, torch.float32, "rstd")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: npu_kernels.group_norm_silu(torch.randn(1, 30, 4), 32), "30 channels are not divisible"),
        (lambda: npu_kernels.group_norm_silu(torch.randn(1, 32, 4), 8, torch.randn(16)), r"weight must have shape \(32,\)"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_op(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- torch.library, compile
# Not ``npu``: it serves group_norm_silu with its own autograd-complete function (torch_npu's
# npu_group_norm_swish, or npu_group_norm_silu with its backward), as it does geglu; compiling the
# stand-in would test the stand-in (see test_geglu.py). tests/backends/test_npu.py covers it.
LIBRARY_CASES = cases(backends=("torch", "triton"), dtypes=[torch.float32]) + cases(
    backends=("triton",), dtypes=[torch.float16]
) + cases(backends=("torch",), dtypes=[torch.bfloat16])


@pytest.mark.parametrize("backend,dtype", LIBRARY_CASES, indirect=["backend"])
def test_opcheck(backend, dtype):
    assert _op_checks.serves_through_custom_op(backend, "group_norm_silu")
    dev = device(backend)
    x, weight, bias = randn(2, 6, 5, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev)
    torch.library.opcheck(torch.ops.npu_kernels.group_norm_silu.default, (x, 3, weight, bias, 1e-5, backend))


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_compiles_without_graph_breaks(backend, dtype):
    x, weight, bias = _inputs((2, 12, 3, 5), "both", dtype, device(backend))
    _op_checks.check_compiled(
        lambda x, w, b: npu_kernels.group_norm_silu(x, 4, w, b),
        lambda x, w, b: reference.group_norm_silu(x, 4, w, b),
        [x, weight, bias], dtype, f"group_norm_silu[{backend}]",
    )


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton"), dtypes=[torch.float32]), indirect=["backend"])
def test_eager_calls_match_the_custom_op_and_skip_its_dispatch(backend, dtype):
    dev = device(backend)
    args = (randn(2, 6, 5, dtype=dtype, device=dev), 3, randn(6, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev), 1e-5, backend)
    _op_checks.check_eager_matches_custom_op(
        lambda x, groups, weight, bias, eps, _: npu_kernels.group_norm_silu(x, groups, weight, bias, eps),
        torch.ops.npu_kernels.group_norm_silu.default, args,
    )


# ----------------------------------------------------------------------------------- CUDA GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 96, 5, 7), 32), ((2, 320, 17, 9), 32), ((3, 40, 1, 1), 8)], ids=str)
def test_group_norm_silu_on_cuda(shape, groups, dtype, backend):
    x, weight, bias = _inputs(shape, "both", dtype, "cuda")
    with npu_kernels.use_backend(backend):
        _check(x, groups, weight, bias, dtype, f"group_norm_silu[{backend}] cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sdxl_sized_group_norm_silu_on_triton(dtype):
    with npu_kernels.use_backend("triton"):
        x, weight, bias = _inputs((1, 320, 128, 128), "both", dtype, "cuda")
        _check(x, 32, weight, bias, dtype, "group_norm_silu[triton] SDXL")
        x, weight, _ = _inputs((1, 320, 128, 128), "weight", dtype, "cuda", "channels_last")
        _check(x, 32, weight, None, dtype, "group_norm_silu[triton] SDXL channels_last")
