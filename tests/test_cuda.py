"""A LoRA UNet step on a CUDA GPU after ``optimize()``, against stock diffusers. Skipped without one.

The op-level CUDA checks (every backend that serves CUDA, against float64) live with each op in
``tests/ops/test_<op>.py`` under the ``cuda`` marker.
"""
from __future__ import annotations

import pytest
import torch

import npu_kernels
from tests.test_diffusers_integration import lora_unet
from tests.tiny_unet import tiny_sdxl_inputs

pytestmark = pytest.mark.cuda


def _lora_step(weight_dtype: torch.dtype, optimized: bool, compiled: bool = False):
    """One forward+backward of the recipe's model on CUDA: frozen base in ``weight_dtype`` (bf16 runs
    under bf16 autocast, as the recipe does), LoRA fp32. Returns the output and the LoRA gradients."""
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
    grads = {n: p.grad.detach().float().clone() for n, p in unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions: PyTorch lets cuDNN use TF32 by default, and which
    algorithm (so which rounding) it picks differs between the stock and the optimized graph."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def test_optimized_fp32_lora_step_matches_stock_on_cuda(no_tf32):
    stock_out, stock_grads = _lora_step(torch.float32, optimized=False)
    out, grads = _lora_step(torch.float32, optimized=True)
    assert npu_kernels.backend_report("cuda")["group_norm_silu"] == "triton"
    assert grads.keys() == stock_grads.keys() and len(grads) > 0
    assert all(stock_grads[n].norm() > 0 for n in grads), "every LoRA parameter must get a gradient"
    assert _relative(out, stock_out) < 2e-4
    worst = max(_relative(grads[n], stock_grads[n]) for n in grads)
    assert worst < 8e-4, f"worst LoRA grad relative error {worst:.3g}"


def test_optimized_bf16_lora_step_is_as_accurate_as_stock_on_cuda(no_tf32):
    """bf16 autocast: both runs round, differently. Against the fp32 step as the reference, the
    optimized run's error may exceed stock's only by a small margin, per output and per LoRA
    gradient (comparing the two bf16 runs with each other would allow twice bf16's error)."""
    ref_out, ref_grads = _lora_step(torch.float32, optimized=False)
    stock_out, stock_grads = _lora_step(torch.bfloat16, optimized=False)
    out, grads = _lora_step(torch.bfloat16, optimized=True)
    assert grads.keys() == stock_grads.keys() == ref_grads.keys() and len(grads) > 0
    pairs = [("output", out, stock_out, ref_out)] + [(n, grads[n], stock_grads[n], ref_grads[n]) for n in grads]
    for name, ours, stock, ref in pairs:
        ours_error, stock_error = _relative(ours, ref), _relative(stock, ref)
        # bf16 has 8 significant bits (relative rounding ~4e-3): stock's own error is of that order.
        assert ours_error - stock_error <= 0.25 * stock_error + 4e-3, (
            f"{name}: optimized error {ours_error:.3g} vs stock {stock_error:.3g} (both against fp32)"
        )


def test_compiled_optimized_unet_matches_eager_on_cuda(no_tf32):
    eager_out, eager_grads = _lora_step(torch.float32, optimized=True)
    out, grads = _lora_step(torch.float32, optimized=True, compiled=True)
    assert _relative(out, eager_out) < 1e-4
    for name in grads:
        assert _relative(grads[name], eager_grads[name]) < 1e-3, name
