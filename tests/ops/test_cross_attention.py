"""Cross-attention over a short key/value sequence (``npu_kernels.cross_attention``, e.g. SDXL's 77
text tokens) on every backend that runs here, against float64 reference maths, forward and
backward; the Triton kernel's chunked backward and its fallback to the flash kernels; the SDPA
backend; input checks, torch.library registration and torch.compile support."""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests import reference
from tests.ops import _attention_cases as ac
from tests.ops import _op_checks
from tests.ops._backends import cases, device

CASES = [
    # (B, H, Sq, Skv, D, mask)              why
    (1, 2, 333, 77, 64, "none"),            # SDXL's text length, Sq not a block multiple
    (2, 1, 1, 77, 40, "padding"),           # one query row, -inf key padding, D 40
    (1, 1, 65, 16, 80, "random"),           # tiny key set, D 80 -> 128
    (1, 1, 20, 5, 64, "bool_rows"),         # fewer keys than tl.dot's minimum block
    (1, 3, 17, 29, 80, "bool_2d"),          # 2-D boolean mask, 3 heads
    (2, 2, 9, 77, 16, "additive_bcast"),    # [B,1,1,Skv] additive mask, head dim 16
]
CASE_IDS = ["B{}H{}-Sq{}-Skv{}-D{}-{}".format(*c) for c in CASES]


@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_cross_attention_matches_reference(backend, dtype, batch, heads, seq_q, seq_kv, head_dim, mask_kind):
    dev = device(backend)
    q, k, v = ac.qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, dev)
    attn_mask = ac.mask(mask_kind, batch, heads, seq_q, seq_kv, dtype, dev)
    ac.check_public_op("cross_attention", q, k, v, attn_mask, dtype, f"cross_attention[{backend}]")


@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32]), indirect=["backend"])
def test_contiguous_inputs_and_a_given_scale(backend, dtype):
    q, k, v = ac.qkv(2, 3, 9, 77, 40, dtype, device(backend), transposed=False)
    ac.check_public_op("cross_attention", q, k, v, None, dtype, f"cross_attention[{backend}] scale 0.3", scale=0.3)


@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_a_single_key(backend, dtype):
    ac.check_single_key("cross_attention", dtype, device(backend))


@pytest.mark.parametrize("backend", ["torch", "triton", "npu"], indirect=True)
def test_fp16_large_magnitudes_do_not_overflow(backend):
    ac.check_fp16_large_magnitudes("cross_attention")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_chunked_backward(backend, monkeypatch):
    """Several query blocks per program and several chunks whose dK/dV partials get summed."""
    from npu_kernels.backends.triton import cross_attention as tk_cross

    monkeypatch.setattr(tk_cross, "CROSS_BWD_TARGET_PROGRAMS", 2)
    dev = device(backend)
    q, k, v = ac.qkv(1, 1, 300, 77, 64, torch.float32, dev)  # 5 query blocks -> 2 chunks of 3 blocks
    ac.check_kernel_contract(backend, "cross_attention", q, k, v, ac.mask("random", 1, 1, 300, 77, torch.float32, dev))


@pytest.mark.parametrize("seq_kv,head_dim", [(256, 64), (200, 128)], ids=["Skv256-D64", "Skv200-D128"])
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_large_tiles_fall_back_to_flash(backend, seq_kv, head_dim):
    """Key tiles too big for the fused backward's registers (both cases) or, in fp32, for the
    forward's shared memory (Skv 200 -> 256 x head dim 128): the flash kernels take over."""
    dev = device(backend)
    q, k, v = ac.qkv(1, 1, 30, seq_kv, head_dim, torch.float32, dev)
    ac.check_kernel_contract(backend, "cross_attention", q, k, v, ac.mask("padding", 1, 1, 30, seq_kv, torch.float32, dev))


@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_kernel_contract(backend, dtype, batch, heads, seq_q, seq_kv, head_dim, mask_kind):
    dev = device(backend)
    q, k, v = ac.qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, dev)
    ac.check_kernel_contract(backend, "cross_attention", q, k, v, ac.mask(mask_kind, batch, heads, seq_q, seq_kv, dtype, dev))


def test_sdpa_backend_matches_reference():
    from npu_kernels.backends import sdpa as sdpa_backend

    q, k, v = ac.qkv(1, 2, 5, 77, 16, torch.float32, transposed=False)
    keep = ac.mask("bool_rows", 1, 2, 5, 77, torch.float32)
    reference.check_against_reference(
        lambda q, k, v: sdpa_backend.cross_attention(q, k, v, keep, 0.25),
        lambda q, k, v: reference.attention(q, k, v, keep, scale=0.25),
        [q, k, v], torch.float32, "sdpa",
    )
    assert sdpa_backend.not_supported_reasons("geglu", npu_kernels.registry.GegluInputs(q)) == ["sdpa serves attention only, not geglu"]


def test_refuses_long_key_value():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 300, 8)
    with pytest.raises(ValueError, match="cross_attention.*300"):
        npu_kernels.cross_attention(q, k, k)


def test_bad_inputs_raise_value_error_naming_the_op():
    with pytest.raises(ValueError, match=r"cross_attention: q, k, v must be \[B, H, S, D\]"):
        npu_kernels.cross_attention(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))


# ---------------------------------------------------------------------------- torch.library, compile
# Not ``npu``: it serves cross_attention with torch_npu's fused op and its registered autograd, not
# our custom op (and dynamo would trace the stand-in's Python where the real op is opaque to it).
LIBRARY_CASES = cases(backends=("torch", "triton"), dtypes=[torch.float32, torch.float16]) + cases(
    backends=("torch",), dtypes=[torch.bfloat16]
)


def _library_args(backend, dtype):
    q, k, v = ac.qkv(1, 2, 5, 77, 8, dtype, device(backend), transposed=False)
    return q, k, v, None, 0.35, backend


@pytest.mark.parametrize("backend,dtype", LIBRARY_CASES, indirect=["backend"])
def test_opcheck(backend, dtype):
    assert _op_checks.serves_through_custom_op(backend, "cross_attention")
    torch.library.opcheck(torch.ops.npu_kernels.cross_attention.default, _library_args(backend, dtype))


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_compiles_without_graph_breaks(backend, dtype):
    dev = device(backend)
    q, k, v = ac.qkv(1, 2, 9, 13, 16, dtype, dev)
    attn_mask = ac.mask("padding", 1, 2, 9, 13, dtype, dev)
    _op_checks.check_compiled(
        lambda q, k, v: npu_kernels.cross_attention(q, k, v, attn_mask),
        lambda q, k, v: reference.attention(q, k, v, attn_mask.double()),
        [q, k, v], dtype, f"cross_attention[{backend}]",
    )


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton"), dtypes=[torch.float32]), indirect=["backend"])
def test_eager_calls_match_the_custom_op_and_skip_its_dispatch(backend, dtype):
    _op_checks.check_eager_matches_custom_op(
        lambda q, k, v, mask, scale, _: npu_kernels.cross_attention(q, k, v, mask, scale),
        torch.ops.npu_kernels.cross_attention.default, _library_args(backend, dtype),
    )


# ----------------------------------------------------------------------------------- CUDA GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])  # auto is SDPA on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq,skv,d", [(333, 77, 64), (1, 77, 80)], ids=str)
def test_cross_attention_on_cuda(sq, skv, d, dtype, backend):
    q, k, v = ac.qkv(2, 3, sq, skv, d, dtype, "cuda")
    keep = (torch.rand(2, 1, sq, skv) > 0.3).index_fill_(-1, torch.tensor([0]), True).cuda()
    with npu_kernels.use_backend(backend):
        ac.check_public_op("cross_attention", q, k, v, None, dtype, f"cross_attention[{backend}] cuda")
        ac.check_public_op("cross_attention", q, k, v, keep, dtype, f"cross_attention[{backend}] cuda masked")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sdxl_sized_cross_attention_on_triton(dtype):
    q, k, v = ac.qkv(1, 10, 4096, 77, 64, dtype, "cuda")
    with npu_kernels.use_backend("triton"):
        ac.check_public_op("cross_attention", q, k, v, None, dtype, "cross_attention[triton] SDXL")
