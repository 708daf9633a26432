"""Attention (``npu_kernels.flash_attention``) on every backend that runs here, against float64
reference maths, forward and backward; the kernel contract's logsumexp; input checks,
torch.library registration and torch.compile support."""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests.ops import _attention_cases as ac
from tests.ops import _op_checks
from tests.ops._backends import cases, device

CASES = [
    # (B, H, Sq, Skv, D, mask)               why
    (1, 1, 1, 77, 64, "none"),               # a single query row
    (2, 3, 1, 2, 16, "none"),                # one query, two keys, head dim 16
    (1, 2, 333, 50, 40, "random"),           # Sq not a multiple of any block, D 40 -> 64 padded
    (2, 1, 70, 130, 80, "padding"),          # Skv over 2 key blocks, D 80 -> 128, -inf key padding
    (1, 1, 45, 96, 64, "bool_rows"),         # [1,1,Sq,Skv] boolean mask, masked keys inside rows
    (1, 3, 17, 29, 80, "bool_2d"),           # 2-D boolean mask, 3 heads
    (1, 2, 5, 7, 128, "additive_bcast"),     # head dim 128, [B,1,1,Skv] additive mask
]
CASE_IDS = ["B{}H{}-Sq{}-Skv{}-D{}-{}".format(*c) for c in CASES]


@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_flash_attention_matches_reference(backend, dtype, batch, heads, seq_q, seq_kv, head_dim, mask_kind):
    dev = device(backend)
    q, k, v = ac.qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, dev)
    attn_mask = ac.mask(mask_kind, batch, heads, seq_q, seq_kv, dtype, dev)
    ac.check_public_op("flash_attention", q, k, v, attn_mask, dtype, f"flash_attention[{backend}]")


@pytest.mark.parametrize("backend,dtype", cases(dtypes=[torch.float32]), indirect=["backend"])
def test_contiguous_inputs_and_a_large_scale(backend, dtype):
    # A big scale makes the softmax peaky: the online-max rescaling must be right.
    q, k, v = ac.qkv(1, 1, 40, 150, 128, dtype, device(backend), transposed=False)
    ac.check_public_op("flash_attention", q, k, v, None, dtype, f"flash_attention[{backend}] scale 0.5", scale=0.5)


# Not ``npu``: torch_npu's fused attention takes k and v of one shape.
@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton"), dtypes=[torch.float32]), indirect=["backend"])
def test_value_head_dim_differs(backend, dtype):
    dev = device(backend)
    q, k, v = ac.qkv(1, 2, 33, 47, 64, dtype, dev, head_dim_v=40)
    ac.check_public_op("flash_attention", q, k, v, ac.mask("random", 1, 2, 33, 47, dtype, dev), dtype,
                       f"flash_attention[{backend}] Dv 40")


@pytest.mark.parametrize("backend,dtype", cases(), indirect=["backend"])
def test_a_single_key(backend, dtype):
    ac.check_single_key("flash_attention", dtype, device(backend))


@pytest.mark.parametrize("backend", ["torch", "triton", "npu"], indirect=True)
def test_fp16_large_magnitudes_do_not_overflow(backend):
    ac.check_fp16_large_magnitudes("flash_attention")


@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", [CASES[2], CASES[3]], ids=[CASE_IDS[2], CASE_IDS[3]])
@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_kernel_contract(backend, dtype, batch, heads, seq_q, seq_kv, head_dim, mask_kind):
    dev = device(backend)
    q, k, v = ac.qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, dev)
    ac.check_kernel_contract(backend, "flash_attention", q, k, v, ac.mask(mask_kind, batch, heads, seq_q, seq_kv, dtype, dev))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: npu_kernels.flash_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)), "flash_attention: incompatible shapes"),
        (lambda: npu_kernels.flash_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8).double(), torch.randn(1, 2, 4, 8)), "flash_attention: q, k, v dtypes differ"),
        (lambda: npu_kernels.flash_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), attn_mask=torch.ones(3, 5, dtype=torch.bool)), "does not broadcast"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_op(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- torch.library, compile
# Not ``npu``: it serves attention with torch_npu's fused op and the autograd torch_npu registers
# for it, not with our custom op; and the stand-in is Python that records its calls, which dynamo
# would trace where the real op is opaque to it: compiling it would test the stand-in.
LIBRARY_CASES = cases(backends=("torch", "triton"), dtypes=[torch.float32, torch.float16]) + cases(
    backends=("torch",), dtypes=[torch.bfloat16]
)


def _library_args(backend, dtype):
    dev = device(backend)
    q, k, v = ac.qkv(1, 2, 5, 7, 8, dtype, dev, transposed=False)
    return q, k, v, torch.randn(1, 1, 5, 7, dtype=torch.float64).to(dev, dtype), 0.35, backend


@pytest.mark.parametrize("backend,dtype", LIBRARY_CASES, indirect=["backend"])
def test_opcheck(backend, dtype):
    assert _op_checks.serves_through_custom_op(backend, "flash_attention")
    torch.library.opcheck(torch.ops.npu_kernels.flash_attention.default, _library_args(backend, dtype))


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton")), indirect=["backend"])
def test_compiles_without_graph_breaks(backend, dtype):
    q, k, v = ac.qkv(1, 2, 9, 11, 16, dtype, device(backend))
    _op_checks.check_compiled(
        npu_kernels.flash_attention, ac.reference.attention, [q, k, v], dtype, f"flash_attention[{backend}]"
    )


@pytest.mark.parametrize("backend,dtype", cases(backends=("torch", "triton"), dtypes=[torch.float32]), indirect=["backend"])
def test_eager_calls_match_the_custom_op_and_skip_its_dispatch(backend, dtype):
    _op_checks.check_eager_matches_custom_op(
        lambda q, k, v, mask, scale, _: npu_kernels.flash_attention(q, k, v, mask, scale),
        torch.ops.npu_kernels.flash_attention.default, _library_args(backend, dtype),
    )


# ----------------------------------------------------------------------------------- CUDA GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])  # auto is SDPA on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sq,skv,d", [(1, 1, 64), (333, 333, 40), (1024, 1024, 64)], ids=str)
def test_flash_attention_on_cuda(sq, skv, d, dtype, backend):
    q, k, v = ac.qkv(2, 3, sq, skv, d, dtype, "cuda")
    keep = (torch.rand(2, 1, sq, skv) > 0.3).index_fill_(-1, torch.tensor([0]), True).cuda()
    with npu_kernels.use_backend(backend):
        ac.check_public_op("flash_attention", q, k, v, None, dtype, f"flash_attention[{backend}] cuda")
        ac.check_public_op("flash_attention", q, k, v, keep, dtype, f"flash_attention[{backend}] cuda masked")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sdxl_sized_self_attention_on_triton(dtype):
    q, k, v = ac.qkv(1, 10, 4096, 4096, 64, dtype, "cuda")
    with npu_kernels.use_backend("triton"):
        ac.check_public_op("flash_attention", q, k, v, None, dtype, "flash_attention[triton] SDXL")
