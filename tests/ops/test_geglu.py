"""GEGLU (``npu_kernels.geglu``) on every backend that runs here, against float64 reference maths,
forward and backward; its input checks, torch.library registration and torch.compile support."""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests import reference
from tests.ops import _op_checks
from tests.ops._backends import cases, device, leaf, randn

SHAPES = [
    (1, 1, 2),  # H = 1
    (3, 5, 14),  # H = 7
    (2, 333, 2 * 40),  # odd row count
    (7, 2 * 640),  # 2-D input
    (2, 3, 2 * 1100),  # H > the Triton kernel's 1024-column block: the last block partial
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_geglu_matches_reference(backend, dtype, approximate, shape):
    x = randn(*shape, dtype=dtype, device=device(backend), scale=2.0)
    reference.check_against_reference(
        lambda t: npu_kernels.geglu(t, approximate), lambda t: reference.geglu(t, approximate), [x], dtype,
        f"geglu[{backend}]",
    )


def _strided(layout: str, dev: str) -> torch.Tensor:
    base = torch.randn
    if layout == "row_slice":  # rows padded: stride(-2) > 2H, last dim unit stride
        x = base(4, 6, 2 * 24 + 10)[..., : 2 * 24]
    elif layout == "transposed_leading":  # leading dims not collapsible
        x = base(6, 4, 2 * 24).transpose(0, 1)
    else:  # last dim not stride-1
        x = base(2 * 24, 5).t()
    assert not x.is_contiguous()
    return leaf(x.to(dev))


@pytest.mark.parametrize("layout", ["row_slice", "transposed_leading", "last_dim_strided"])
@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32]), indirect=["backend"])
def test_geglu_non_contiguous_input(backend, dtype, layout):
    x = _strided(layout, device(backend))
    reference.check_against_reference(npu_kernels.geglu, reference.geglu, [x], dtype, f"geglu[{backend}] {layout}")


def test_triton_geglu_reads_row_strided_views_in_place():
    pytest.importorskip("triton", reason="triton is not installed")
    from npu_kernels.backends.triton import geglu as tk_geglu

    x = torch.randn(4, 6, 2 * 24 + 10, device=device("triton"))[..., : 2 * 24]
    assert tk_geglu._as_rows(x).data_ptr() == x.data_ptr(), "a row-strided view must be read in place"


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: npu_kernels.geglu(torch.randn(3, 5)), "geglu: the last dimension must be even"),
        (lambda: npu_kernels.geglu(torch.randn(3, 4), approximate="fast"), "approximate must be one of"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_op(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- torch.library, compile
LIBRARY_CASES = cases(backends=("torch", "triton"), dtypes=[torch.float32, torch.float16]) + cases(
    backends=("torch",), dtypes=[torch.bfloat16]
)


@pytest.mark.parametrize("backend,dtype", LIBRARY_CASES, indirect=["backend"])
def test_opcheck(backend, dtype):
    # The NPU backend serves geglu with torch_npu's own op (and its registered backward), not ours.
    assert _op_checks.serves_through_custom_op(backend, "geglu")
    x = randn(3, 5, 2 * 7, dtype=dtype, device=device(backend))
    torch.library.opcheck(torch.ops.npu_kernels.geglu.default, (x, "none", backend))


# Not ``npu``: it serves geglu with torch_npu's op, which the real torch_npu registers with the
# dispatcher (opaque to dynamo) while the stand-in is Python that records its calls: compiling it
# would test the stand-in, not our code.
@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_compiles_without_graph_breaks(backend, dtype):
    x = randn(4, 3, 2 * 9, dtype=dtype, device=device(backend))
    _op_checks.check_compiled(
        lambda t: npu_kernels.geglu(t, "tanh"), lambda t: reference.geglu(t, "tanh"), [x], dtype, f"geglu[{backend}]"
    )


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton"), dtypes=[torch.float32]), indirect=["backend"])
def test_eager_calls_match_the_custom_op_and_skip_its_dispatch(backend, dtype):
    x = randn(3, 5, 2 * 8, dtype=dtype, device=device(backend))
    _op_checks.check_eager_matches_custom_op(
        lambda x, approximate, _: npu_kernels.geglu(x, approximate), torch.ops.npu_kernels.geglu.default, (x, "none", backend)
    )


# ----------------------------------------------------------------------------------- CUDA GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 333, 2 * 40), (1, 77, 2 * 1280)], ids=str)
def test_geglu_on_cuda(shape, dtype, backend):
    x = randn(*shape, dtype=dtype, device="cuda", scale=2.0)
    with npu_kernels.use_backend(backend):
        reference.check_against_reference(npu_kernels.geglu, reference.geglu, [x], dtype, f"geglu[{backend}] cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sdxl_sized_geglu_on_triton(dtype):
    x = randn(1, 4096, 2 * 2560, dtype=dtype, device="cuda")
    with npu_kernels.use_backend("triton"):
        reference.check_against_reference(npu_kernels.geglu, reference.geglu, [x], dtype, "geglu[triton] SDXL")


# ------------------------------------------------------------------- with its frozen projection
@pytest.mark.parametrize("keep_gate", [False, True], ids=["whole", "keep_gate"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 5), (9, 16)], ids=str)
@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_geglu_projection_matches_reference(backend, dtype, shape, keep_gate):
    """x -> geglu(x Wᵀ + b) with W, b frozen: forward and grad x vs float64, saving x (and with
    keep_gate the gate half) only, never the 2H-wide projection."""
    dev = device(backend)
    hidden = 6
    weight = randn(2 * hidden, shape[-1], dtype=dtype, device=dev).detach()
    bias = randn(2 * hidden, dtype=dtype, device=dev).detach()
    x = randn(*shape, dtype=dtype, device=dev)
    reference.check_against_reference(
        lambda t: npu_kernels.geglu_projection(t, weight, bias, keep_gate=keep_gate),
        lambda t: reference.geglu(torch.nn.functional.linear(t, weight.double(), bias.double()), "none"),
        [x], dtype, f"geglu_projection[{backend}] keep_gate={keep_gate}",
    )
    out = npu_kernels.geglu_projection(x, weight, bias, keep_gate=keep_gate)
    activations = [t for t in out.grad_fn.saved_tensors if t is not None and t is not weight and t is not bias]
    expected = [x.shape, (*shape[:-1], hidden)] if keep_gate else [x.shape]
    assert [t.shape for t in activations] == expected
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in activations[1:])  # no view of the projection


@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_geglu_projection_tanh_on_a_non_contiguous_input(backend, dtype):
    """The tanh approximation, and x a transposed view (as a caller's permuted activations are)."""
    dev = device(backend)
    weight = randn(2 * 5, 7, dtype=dtype, device=dev).detach()
    bias = randn(2 * 5, dtype=dtype, device=dev).detach()
    x = leaf(randn(3, 7, 4, dtype=dtype, device=dev).transpose(1, 2))
    assert not x.is_contiguous()
    reference.check_against_reference(
        lambda t: npu_kernels.geglu_projection(t, weight, bias, "tanh"),
        lambda t: reference.geglu(torch.nn.functional.linear(t, weight.double(), bias.double()), "tanh"),
        [x], dtype, f"geglu_projection[{backend}] tanh, non-contiguous",
    )


@pytest.mark.parametrize("keep_gate", [False, True], ids=["whole", "keep_gate"])
def test_geglu_projection_equals_the_saving_path_exactly(keep_gate):
    """Recomputing the projection (or its hidden half: the same GEMM's rows) gives bitwise the
    gradients of geglu(F.linear(...)), fp32 and bf16 autocast."""
    weight, bias = torch.randn(2 * 24, 16), torch.randn(2 * 24)
    x = randn(3, 11, 16, dtype=torch.float32)
    grad = torch.randn(3, 11, 24)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = npu_kernels.geglu_projection(x, weight, bias, keep_gate=keep_gate)
            plain = npu_kernels.geglu(torch.nn.functional.linear(x, weight, bias))
        (grad_ours,) = torch.autograd.grad(ours, x, grad.to(ours.dtype))
        (grad_plain,) = torch.autograd.grad(plain, x, grad.to(plain.dtype))
        assert ours.dtype == plain.dtype and grad_ours.dtype == x.dtype
        torch.testing.assert_close(ours, plain, rtol=0, atol=0)
        torch.testing.assert_close(grad_ours, grad_plain, rtol=0, atol=0)


def test_geglu_projection_with_a_trainable_projection_is_plain_geglu():
    weight = torch.randn(8, 5, requires_grad=True)
    x = randn(2, 5, dtype=torch.float32)
    out = npu_kernels.geglu_projection(x, weight)
    assert type(out.grad_fn).__name__ != "_EagerGegluProjectionBackward"
    (grad_w,) = torch.autograd.grad(out.sum(), weight)
    expected = torch.autograd.grad(npu_kernels.geglu(torch.nn.functional.linear(x, weight)).sum(), weight)[0]
    torch.testing.assert_close(grad_w, expected)
    with pytest.raises(ValueError, match="geglu_projection: need x"):
        npu_kernels.geglu_projection(x, torch.randn(7, 5))
