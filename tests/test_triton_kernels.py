"""The Triton kernels (``npu_kernels.backends.triton``) against float64 references, forward and backward.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
here and in ``conftest.py`` before anything imports triton), fp32 and fp16 only: shapes are small
and awkward (lengths not multiples of the blocks, padded head dims, odd channel counts, strided
views, masks with ``-inf``). With a GPU the same tests run on CUDA (bf16 too), plus SDXL-sized cases.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

import npu_kernels.backends.triton as tk  # noqa: E402
from npu_kernels.backends.triton import cross_attention as tk_cross  # noqa: E402
from npu_kernels.backends.triton import geglu as tk_geglu  # noqa: E402

INTERPRET = tk.interpreting()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (SDXL-sized shapes)")

# Max error allowed, relative to max(1, the largest magnitude of the reference tensor).
FWD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Backward passes chain more roundings (fp16 P and dS tiles feed the dot products).
BWD_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# Sums over many elements (GroupNorm's weight/bias gradients) get a looser bound in low precision.
SUM_TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x {scale:.3g}"


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out.double())


# ============================================================================================ GEGLU
def _geglu_reference(x: torch.Tensor, grad_out: torch.Tensor, approximate: str):
    x64 = x.detach().double().requires_grad_()
    hidden, gate = x64.chunk(2, -1)
    out = hidden * F.gelu(gate, approximate=approximate)
    (grad_x,) = _grads(out, [x64], grad_out)
    return out, grad_x


def _check_geglu(x: torch.Tensor, approximate: str) -> None:
    dtype = x.dtype
    out = tk.geglu_forward(x, approximate)
    grad_out = _randn(*out.shape, dtype=dtype)
    ref_out, ref_grad = _geglu_reference(x, grad_out, approximate)
    assert out.dtype == dtype
    _close(out, ref_out, FWD_TOL[dtype], "geglu out")
    grad_x = tk.geglu_backward(grad_out, x, approximate)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    _close(grad_x, ref_grad, BWD_TOL[dtype], "geglu grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 7, 2 * 40), (2, 3, 2 * 1100), (5, 2 * 3)], ids=str)
def test_geglu(shape, approximate, dtype):
    # 1100 > the 1024-column block: several column blocks, the last one partial.
    _check_geglu(_randn(*shape, dtype=dtype, scale=2.0), approximate)


@pytest.mark.parametrize("layout", ["row_slice", "transposed_leading", "last_dim_strided"])
def test_geglu_non_contiguous(layout):
    if layout == "row_slice":  # rows padded: stride(-2) > 2H, last dim unit stride
        x = _randn(4, 6, 2 * 24 + 10)[..., : 2 * 24]
        assert tk_geglu._as_rows(x).data_ptr() == x.data_ptr(), "a row-strided view must be read in place"
    elif layout == "transposed_leading":  # leading dims not collapsible: one copy
        x = _randn(6, 4, 2 * 24).transpose(0, 1)
    else:  # last dim not stride-1: copied
        x = _randn(2 * 24, 5).t()
    assert not x.is_contiguous()
    _check_geglu(x, "none")


# ================================================================================= GroupNorm + SiLU
def _gn_reference(x, num_groups, weight, bias, eps, grad_out):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    weight64 = leaves[1]
    if weight64 is None and bias is not None:  # aten's group_norm backward fails on (None, bias)
        weight64 = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    out = F.silu(F.group_norm(leaves[0], num_groups, weight64, leaves[2], eps))
    grads = _grads(out, [t for t in leaves if t is not None], grad_out)
    x64 = leaves[0].detach().unflatten(1, (num_groups, -1)).flatten(2)
    var, mean = torch.var_mean(x64, dim=-1, unbiased=False)
    return out, list(grads), mean, torch.rsqrt(var + eps)


def _check_group_norm_silu(x, num_groups, weight, bias, eps=1e-5, grad_out=None):
    dtype = x.dtype
    out, mean, rstd = tk.group_norm_silu_forward(x, num_groups, weight, bias, eps)
    if grad_out is None:
        grad_out = _randn(*x.shape, dtype=dtype)
    ref_out, ref_grads, ref_mean, ref_rstd = _gn_reference(x, num_groups, weight, bias, eps, grad_out)

    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride(), "output must keep x's memory format"
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0], num_groups)
    _close(out, ref_out, FWD_TOL[dtype], "group_norm_silu out")
    _close(mean, ref_mean, 1e-5, "mean")
    _close(rstd, ref_rstd, 1e-4, "rstd")

    grad_x, grad_w, grad_b = tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, num_groups)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    _close(grad_x, ref_grads.pop(0), BWD_TOL[dtype], "grad_x")
    for name, param, grad in (("grad_weight", weight, grad_w), ("grad_bias", bias, grad_b)):
        if param is None:
            assert grad is None, f"{name} must be None without the parameter"
        else:
            assert grad.dtype == param.dtype and grad.shape == param.shape
            _close(grad, ref_grads.pop(0), SUM_TOL[param.dtype], name)


GN_CASES = [
    # (shape, groups, affine)            why
    ((1, 96, 5, 7), 32, "both"),         # batch 1, 3 channels per group, odd spatial
    ((2, 6, 9, 11), 3, "none"),          # no affine parameters, 2 channels per group
    ((2, 6, 9, 11), 3, "weight"),        # weight only
    ((1, 64, 33, 33), 4, "both"),        # 1089 positions: several spatial chunks per group
    ((1, 256, 3, 3), 1, "bias"),         # 256 channels in one group: several channel blocks
    ((2, 12, 50), 4, "both"),            # 1-D spatial
    ((1, 8, 3, 4, 5), 2, "both"),        # 3-D spatial
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,affine", GN_CASES, ids=[f"{c[0]}-G{c[1]}-{c[2]}" for c in GN_CASES])
def test_group_norm_silu(shape, groups, affine, dtype, channels_last):
    # Inputs with a large offset: catches a naive E[x²] - E[x]² variance.
    x = _randn(*shape, dtype=dtype, scale=3.0) + 4.0
    if channels_last:
        x = x.permute(0, *range(2, x.dim()), 1).contiguous().permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        assert not x.is_contiguous() or x.shape[1] == 1
    channels = shape[1]
    weight = _randn(channels, dtype=dtype) if affine in ("both", "weight") else None
    bias = _randn(channels, dtype=dtype) if affine in ("both", "bias") else None
    _check_group_norm_silu(x, groups, weight, bias)


def test_group_norm_silu_large_mean_small_variance():
    """Mean 1000, std 0.1 in fp32: a one-pass E[x²] - E[x]² variance would lose every digit."""
    x = _randn(1, 8, 40, 40, scale=0.1) + 1000.0  # 4 channels x 1600 positions per group: 2 chunks
    out, mean, rstd = tk.group_norm_silu_forward(x, 2, None, None, 1e-5)
    _, _, ref_mean, ref_rstd = _gn_reference(x, 2, None, None, 1e-5, torch.zeros_like(x))
    _close(mean / 1000.0, ref_mean / 1000.0, 1e-6, "mean")
    _close(rstd / ref_rstd, torch.ones_like(ref_rstd), 1e-4, "rstd (relative)")
    assert not torch.isnan(out).any()


def test_group_norm_silu_mixed_layouts_and_param_dtype():
    """fp16 activations with fp32 parameters; grad_out contiguous while x is channels_last."""
    x = _randn(1, 32, 6, 10, dtype=torch.float16).to(memory_format=torch.channels_last)
    weight, bias = _randn(32), _randn(32)
    grad_out = _randn(1, 32, 6, 10, dtype=torch.float16)  # contiguous
    _check_group_norm_silu(x, 8, weight, bias, eps=1e-6, grad_out=grad_out)


# ======================================================================================== attention
def _qkv(batch, heads, seq_q, seq_kv, head_dim, dtype, head_dim_v=None, transposed=True):
    """q/k/v as diffusers makes them: ``[B, S, H, D]`` projections viewed as ``[B, H, S, D]``."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if transposed:
        q = _randn(batch, seq_q, heads, head_dim, dtype=dtype).transpose(1, 2)
        k = _randn(batch, seq_kv, heads, head_dim, dtype=dtype).transpose(1, 2)
        v = _randn(batch, seq_kv, heads, head_dim_v, dtype=dtype).transpose(1, 2)
    else:
        q = _randn(batch, heads, seq_q, head_dim, dtype=dtype)
        k = _randn(batch, heads, seq_kv, head_dim, dtype=dtype)
        v = _randn(batch, heads, seq_kv, head_dim_v, dtype=dtype)
    return q, k, v


def _mask(kind, batch, heads, seq_q, seq_kv, dtype):
    """Additive masks: random, or boolean-derived with -inf (never a whole row), some broadcast."""
    if kind == "none":
        return None
    if kind == "random":  # full [B, H, Sq, Skv]
        return _randn(batch, heads, seq_q, seq_kv, dtype=dtype)
    if kind == "padding":  # [B, 1, 1, Skv] key padding: the last keys of each batch masked
        keep = torch.ones(batch, 1, 1, seq_kv, dtype=torch.bool)
        for b in range(batch):
            keep[b, ..., max(1, seq_kv - 3 - 5 * b):] = False
    elif kind == "bool_rows":  # [1, 1, Sq, Skv] random boolean pattern, one key always kept
        keep = torch.rand(1, 1, seq_q, seq_kv) > 0.5
        keep[0, 0, torch.arange(seq_q), torch.arange(seq_q) % seq_kv] = True  # every row keeps a key
    else:
        raise ValueError(kind)
    zero = torch.zeros(keep.shape, dtype=dtype)
    return zero.masked_fill(~keep, float("-inf")).to(DEVICE)


def _attention_reference(q, k, v, mask, scale, grad_out):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    out = torch.softmax(scores, -1) @ v64
    lse = torch.logsumexp(scores.detach(), -1)
    return out, lse, _grads(out, [q64, k64, v64], grad_out)


def _check_attention(forward, backward, q, k, v, mask, scale=None):
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = forward(q, k, v, mask, scale)
    grad_out = _randn(*out.shape, dtype=dtype)
    ref_out, ref_lse, ref_grads = _attention_reference(q, k, v, mask, scale, grad_out)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    _close(out, ref_out, FWD_TOL[dtype], "attention out")
    _close(lse, ref_lse, FWD_TOL[dtype] if dtype != torch.float32 else 2e-5, "lse")
    grads = backward(grad_out, q, k, v, out, lse, mask, scale)
    for name, grad, ref, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        _close(grad, ref, BWD_TOL[dtype], name)


ATTN_CASES = [
    # (B, H, Sq, Skv, D, mask)           why
    (1, 1, 1, 77, 64, "none"),           # a single query row
    (1, 2, 333, 50, 40, "random"),       # Sq not a multiple of any block, D 40 -> 64 padded
    (2, 1, 70, 130, 80, "padding"),      # Skv over 2 key blocks, D 80 -> 128, [B,1,1,Skv] -inf mask
    (1, 1, 45, 96, 64, "bool_rows"),     # [1,1,Sq,Skv] boolean-derived mask, -inf inside rows
]
ATTN_IDS = ["B{}H{}-Sq{}-Skv{}-D{}-{}".format(*c) for c in ATTN_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", ATTN_CASES, ids=ATTN_IDS)
def test_flash_attention(batch, heads, seq_q, seq_kv, head_dim, mask_kind, dtype):
    q, k, v = _qkv(batch, heads, seq_q, seq_kv, head_dim, dtype)
    mask = _mask(mask_kind, batch, heads, seq_q, seq_kv, dtype)
    _check_attention(tk.flash_attention_forward, tk.flash_attention_backward, q, k, v, mask)


def test_flash_attention_head_dim_128_contiguous_large_scale():
    """Head dim 128 once, contiguous inputs, a big scale (peaky softmax: online-max rescaling)."""
    q, k, v = _qkv(1, 1, 40, 150, 128, torch.float32, transposed=False)
    _check_attention(tk.flash_attention_forward, tk.flash_attention_backward, q, k, v, None, scale=0.5)


def test_flash_attention_value_head_dim_differs():
    q, k, v = _qkv(1, 2, 33, 47, 64, torch.float32, head_dim_v=40)
    _check_attention(tk.flash_attention_forward, tk.flash_attention_backward, q, k, v, _mask("random", 1, 2, 33, 47, torch.float32))


CROSS_CASES = [
    # (B, H, Sq, Skv, D, mask)           why
    (1, 2, 333, 77, 64, "none"),         # SDXL text length, Sq not a block multiple
    (2, 1, 1, 77, 40, "padding"),        # one query row, -inf key padding, D 40
    (1, 1, 65, 16, 80, "random"),        # tiny key set, D 80 -> 128
    (1, 1, 20, 5, 64, "bool_rows"),      # fewer keys than tl.dot's minimum block
]
CROSS_IDS = ["B{}H{}-Sq{}-Skv{}-D{}-{}".format(*c) for c in CROSS_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,seq_q,seq_kv,head_dim,mask_kind", CROSS_CASES, ids=CROSS_IDS)
def test_cross_attention(batch, heads, seq_q, seq_kv, head_dim, mask_kind, dtype):
    q, k, v = _qkv(batch, heads, seq_q, seq_kv, head_dim, dtype)
    mask = _mask(mask_kind, batch, heads, seq_q, seq_kv, dtype)
    _check_attention(tk.cross_attention_forward, tk.cross_attention_backward, q, k, v, mask)


def test_cross_attention_chunked_backward(monkeypatch):
    """Several query blocks per program and several chunks whose dK/dV partials get summed."""
    monkeypatch.setattr(tk_cross, "CROSS_BWD_TARGET_PROGRAMS", 2)
    q, k, v = _qkv(1, 1, 300, 77, 64, torch.float32)  # 5 query blocks -> 2 chunks of 3 blocks
    _check_attention(tk.cross_attention_forward, tk.cross_attention_backward, q, k, v,
                     _mask("random", 1, 1, 300, 77, torch.float32))


@pytest.mark.parametrize("seq_kv,head_dim", [(256, 64), (200, 128)], ids=["Skv256-D64", "Skv200-D128"])
def test_cross_attention_large_tiles_fall_back_to_flash(seq_kv, head_dim):
    """Key tiles too big for the fused backward's registers (both cases) or, in fp32, for the
    forward's shared memory (Skv 200 -> 256 x head dim 128): the flash kernels take over."""
    q, k, v = _qkv(1, 1, 30, seq_kv, head_dim, torch.float32)
    _check_attention(tk.cross_attention_forward, tk.cross_attention_backward, q, k, v,
                     _mask("padding", 1, 1, 30, seq_kv, torch.float32))


# ================================================================================== support checks
def test_not_supported_reasons():
    x = torch.empty(2, 8, device=DEVICE)
    assert tk.not_supported_reasons("geglu", x) == []
    assert any("even" in r for r in tk.not_supported_reasons("geglu", torch.empty(2, 7, device=DEVICE)))
    assert any("float64" in r for r in tk.not_supported_reasons("geglu", x.double()))
    assert tk.not_supported_reasons("group_norm_silu", torch.empty(1, 4, 3, 3, device=DEVICE), None, None) == []

    q, k, v = _qkv(1, 1, 4, 300, 64, torch.float16)
    assert tk.not_supported_reasons("flash_attention", q, k, v, None) == []
    assert any("Skv 300 > 256" in r for r in tk.not_supported_reasons("cross_attention", q, k, v, None))
    big = torch.empty(1, 1, 4, 256, device=DEVICE)
    assert any("head dim 256 > 128" in r for r in tk.not_supported_reasons("flash_attention", big, big, big, None))
    # Boolean / 2-D masks are served: the ops layer makes them additive and 4-D first.
    bool_mask = torch.ones(4, 300, dtype=torch.bool, device=DEVICE)
    assert tk.not_supported_reasons("flash_attention", q, k, v, bool_mask) == []
    weight64 = torch.ones(4, dtype=torch.float64, device=DEVICE)
    assert tk.not_supported_reasons("group_norm_silu", torch.empty(1, 4, 3, device=DEVICE), weight64, None) == []
    assert tk.not_supported_reasons("no_such_op", q)
    if INTERPRET:
        bf16 = torch.empty(2, 8, dtype=torch.bfloat16)
        assert any("interpreter" in r for r in tk.not_supported_reasons("geglu", bf16))


# ====================================================================== SDXL-sized, CUDA GPU only
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_group_norm_silu(dtype):
    x = _randn(1, 320, 128, 128, dtype=dtype)
    _check_group_norm_silu(x, 32, _randn(320, dtype=dtype), _randn(320, dtype=dtype))
    _check_group_norm_silu(x.to(memory_format=torch.channels_last), 32, _randn(320, dtype=dtype), None)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_geglu(dtype):
    _check_geglu(_randn(1, 4096, 2 * 2560, dtype=dtype), "none")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_self_attention(dtype):
    q, k, v = _qkv(1, 10, 4096, 4096, 64, dtype)
    _check_attention(tk.flash_attention_forward, tk.flash_attention_backward, q, k, v, None)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_cross_attention(dtype):
    q, k, v = _qkv(1, 10, 4096, 77, 64, dtype)
    _check_attention(tk.cross_attention_forward, tk.cross_attention_backward, q, k, v, None)
