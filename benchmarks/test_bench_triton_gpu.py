"""GPU benchmarks of the Triton kernels against eager PyTorch at SDXL shapes (pytest-benchmark).

Run on a CUDA machine::

    python -m pytest benchmarks/test_bench_triton_gpu.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Each group times one op and pass (``fwd`` or ``fwd+bwd``) for ``triton`` (the contract functions of
``npu_kernels.triton``, called directly: kernel time without the custom-op / autograd plumbing) and
``torch`` (the eager baseline diffusers runs: ``F.group_norm`` + ``F.silu``, ``chunk`` + ``F.gelu``,
``F.scaled_dot_product_attention`` with autograd). Skipped without a CUDA GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("needs a CUDA GPU run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import npu_kernels.triton as tk  # noqa: E402

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
IMPLS = ["triton", "torch"]


def _timed(benchmark, fn):
    """Benchmark ``fn`` with a device sync so that the GPU work, not the launch, is measured."""
    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


# ----------------------------------------------------------------------------- GroupNorm + SiLU
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_group_norm_silu(benchmark, impl, dtype, channels_last, backward):
    benchmark.group = f"group_norm_silu 1x320x128x128 G32 {'nhwc' if channels_last else 'nchw'} " \
                      f"{dtype} {'fwd+bwd' if backward else 'fwd'}"
    x = torch.randn(1, 320, 128, 128, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(320, device=DEVICE, dtype=dtype)
    bias = torch.randn(320, device=DEVICE, dtype=dtype)
    grad_out = torch.randn_like(x)

    if impl == "triton":
        def fn():
            out, mean, rstd = tk.group_norm_silu_forward(x, 32, weight, bias, 1e-5)
            if backward:
                tk.group_norm_silu_backward(grad_out, x, weight, bias, mean, rstd, 32)
    else:
        xl, wl, bl = (_leaf(t, backward) for t in (x, weight, bias))

        def fn():
            out = F.silu(F.group_norm(xl, 32, wl, bl, 1e-5))
            if backward:
                torch.autograd.grad(out, (xl, wl, bl), grad_out)
    _timed(benchmark, fn)


# ---------------------------------------------------------------------------------------- GEGLU
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_geglu(benchmark, impl, dtype, backward):
    benchmark.group = f"geglu 1x4096x(2x2560) {dtype} {'fwd+bwd' if backward else 'fwd'}"
    x = torch.randn(1, 4096, 2 * 2560, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(1, 4096, 2560, device=DEVICE, dtype=dtype)

    if impl == "triton":
        def fn():
            tk.geglu_forward(x, "none")
            if backward:
                tk.geglu_backward(grad_out, x, "none")
    else:
        xl = _leaf(x, backward)

        def fn():
            hidden, gate = xl.chunk(2, dim=-1)
            out = hidden * F.gelu(gate)
            if backward:
                torch.autograd.grad(out, (xl,), grad_out)
    _timed(benchmark, fn)


# ------------------------------------------------------------------------------------ attention
ATTENTION_CASES = {
    # name: (B, H, Sq, Skv, D, triton forward, triton backward)
    "self B1 H10 S4096 D64": (1, 10, 4096, 4096, 64, tk.attention_forward, tk.attention_backward),
    "self B2 H10 S4096 D64": (2, 10, 4096, 4096, 64, tk.attention_forward, tk.attention_backward),
    "cross B1 H10 Sq4096 Skv77 D64": (1, 10, 4096, 77, 64, tk.cross_attention_forward, tk.cross_attention_backward),
    "cross B2 H20 Sq1024 Skv77 D64": (2, 20, 1024, 77, 64, tk.cross_attention_forward, tk.cross_attention_backward),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention(benchmark, impl, dtype, case, backward):
    batch, heads, seq_q, seq_kv, head_dim, forward_fn, backward_fn = ATTENTION_CASES[case]
    benchmark.group = f"attention {case} {dtype} {'fwd+bwd' if backward else 'fwd'}"
    # diffusers' layout: [B, S, H, D] projections viewed as [B, H, S, D].
    q = torch.randn(batch, seq_q, heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq_kv, heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, seq_kv, heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    grad_out = torch.randn(batch, heads, seq_q, head_dim, device=DEVICE, dtype=dtype)
    scale = head_dim ** -0.5

    if impl == "triton":
        def fn():
            out, lse = forward_fn(q, k, v, None, scale)
            if backward:
                backward_fn(grad_out, q, k, v, out, lse, None, scale)
    else:
        ql, kl, vl = (_leaf(t, backward) for t in (q, k, v))

        def fn():
            out = F.scaled_dot_product_attention(ql, kl, vl, scale=scale)
            if backward:
                torch.autograd.grad(out, (ql, kl, vl), grad_out)
    _timed(benchmark, fn)
