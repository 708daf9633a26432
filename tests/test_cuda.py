"""The public ops and ``optimize()`` on a CUDA GPU, through every backend that serves CUDA.

``test_triton_kernels.py`` checks the Triton kernels alone; this file checks what a user runs: the
custom ops (dispatch, autograd, layouts) on CUDA tensors against float64 references on the CPU, and
a LoRA UNet step on CUDA with ``optimize()`` against stock diffusers. Skipped without a CUDA GPU.
"""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests import reference
from tests.test_diffusers_integration import lora_unet
from tests.tiny_unet import tiny_sdxl_inputs

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATTENTION_BACKENDS = ["auto", "triton", "torch"]  # auto is SDPA on CUDA
ELEMENTWISE_BACKENDS = ["auto", "triton", "torch"]


def _cuda_leaves(*cpu_tensors: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to("cuda", dtype).requires_grad_() for t in cpu_tensors]


def _check(fn, reference_fn, inputs: list[torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """``fn`` on CUDA vs ``reference_fn`` in float64 on the CPU, on the same (rounded) values."""
    out = fn(*inputs)
    cotangent = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, cotangent.to("cuda", dtype))
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    ref_out = reference_fn(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, cotangent)
    assert out.device.type == "cuda" and out.dtype == dtype, f"{what}: {out.device} {out.dtype}"
    reference.assert_close(out.cpu(), ref_out, dtype, f"{what} forward")
    for i, (grad, ref_grad) in enumerate(zip(grads, ref_grads)):
        reference.assert_close(grad.cpu(), ref_grad, dtype, f"{what} grad {i}")


@pytest.mark.parametrize("backend", ELEMENTWISE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 333, 2 * 40), (1, 77, 2 * 1280)], ids=str)
def test_geglu_on_cuda(shape, dtype, backend):
    (x,) = _cuda_leaves(torch.randn(*shape, dtype=torch.float64) * 2, dtype=dtype)
    with npu_kernels.use_backend(backend):
        _check(npu_kernels.geglu, reference.geglu, [x], dtype, f"geglu[{backend}]")


@pytest.mark.parametrize("backend", ELEMENTWISE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((1, 96, 5, 7), 32), ((2, 320, 17, 9), 32), ((3, 40, 1, 1), 8)], ids=str)
def test_group_norm_silu_on_cuda(shape, groups, dtype, backend):
    x, weight, bias = _cuda_leaves(
        torch.randn(*shape, dtype=torch.float64) * 3 + 0.5,
        torch.randn(shape[1], dtype=torch.float64),
        torch.randn(shape[1], dtype=torch.float64),
        dtype=dtype,
    )
    with npu_kernels.use_backend(backend):
        _check(
            lambda *t: npu_kernels.group_norm_silu(t[0], groups, t[1], t[2]),
            lambda *t: reference.group_norm_silu(t[0], groups, t[1], t[2]),
            [x, weight, bias], dtype, f"group_norm_silu[{backend}]",
        )


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,sq,skv,d", [
    ("flash_attention", 1, 1, 64), ("flash_attention", 333, 333, 40), ("flash_attention", 1024, 1024, 64),
    ("cross_attention", 333, 77, 64), ("cross_attention", 1, 77, 80),
], ids=str)
def test_attention_on_cuda(op, sq, skv, d, dtype, backend):
    # diffusers' layout: [B, S, H, D] projections viewed as [B, H, S, D] (not contiguous).
    q, k, v = (t.transpose(1, 2) for t in _cuda_leaves(
        *(torch.randn(2, s, 3, d, dtype=torch.float64) for s in (sq, skv, skv)), dtype=dtype))
    keep = (torch.rand(2, 1, sq, skv) > 0.3).index_fill_(-1, torch.tensor([0]), True)
    fn = getattr(npu_kernels, op)
    with npu_kernels.use_backend(backend):
        _check(lambda q, k, v: fn(q, k, v), reference.attention, [q, k, v], dtype, f"{op}[{backend}]")
        _check(lambda q, k, v: fn(q, k, v, attn_mask=keep.cuda()),
               lambda q, k, v: reference.attention(q, k, v, keep), [q, k, v], dtype, f"{op}[{backend}] masked")


# ------------------------------------------------------------------------ a LoRA UNet step on CUDA
def _lora_step(weight_dtype: torch.dtype, optimized: bool, compiled: bool = False):
    """One forward+backward of the recipe's model on CUDA: frozen base in ``weight_dtype``, LoRA fp32."""
    unet = lora_unet()  # lora_B randomised: with PEFT's zero init, lora_A would get no gradient
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" not in name:
            param.data = param.data.to(weight_dtype)
    unet.to("cuda")
    if optimized:
        npu_kernels.optimize(unet)
    inputs = tiny_sdxl_inputs()
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else {n: t.cuda() for n, t in v.items()})
              for k, v in inputs.items()}
    forward = torch.compile(unet, fullgraph=True) if compiled else unet
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weight_dtype == torch.bfloat16):
        out = forward(**inputs).sample.float()
    out.square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions: PyTorch lets cuDNN use TF32 by default, and which
    algorithm (so which rounding) it picks differs between the stock and the optimized graph. Seen
    on an H100 with TF32 on: 4.1e-4 relative difference in the UNet output, both ways round."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("weight_dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16-autocast"])
def test_optimized_lora_step_matches_stock_on_cuda(weight_dtype, tol, no_tf32):
    stock_out, stock_grads = _lora_step(weight_dtype, optimized=False)
    out, grads = _lora_step(weight_dtype, optimized=True)
    assert npu_kernels.backend_report("cuda")["group_norm_silu"] == "triton"
    assert _relative(out, stock_out) < tol
    assert grads.keys() == stock_grads.keys() and len(grads) > 0
    assert all(stock_grads[n].norm() > 0 for n in grads), "every LoRA parameter must get a gradient"
    worst = max(_relative(grads[n], stock_grads[n]) for n in grads)
    assert worst < 4 * tol, f"worst LoRA grad relative error {worst:.3g}"


def test_compiled_optimized_unet_matches_eager_on_cuda(no_tf32):
    eager_out, eager_grads = _lora_step(torch.float32, optimized=True)
    out, grads = _lora_step(torch.float32, optimized=True, compiled=True)
    assert _relative(out, eager_out) < 1e-4
    for name in grads:
        assert _relative(grads[name], eager_grads[name]) < 1e-3, name
