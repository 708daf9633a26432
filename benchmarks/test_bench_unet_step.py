"""One LoRA training step of the SDXL UNet: stock diffusers vs ``npu_kernels.optimize``.

fp32 (everything fp32) and bf16 (frozen weights bf16, LoRA fp32, bf16 autocast), batch 1. Full size
is SDXL's architecture at ``--resolution`` (512 px by default); smoke is a tiny UNet. ``extra_info``:
images/s, peak memory and its part above the resident weights, and the bytes autograd saves.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import npu_kernels
from benchmarks.memory import peak_memory, saved_bytes
from benchmarks.models import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, unet_inputs

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=list(PRECISIONS))
def lora_unet(request, bench_size, resolution, device):
    """One UNet per precision, shared by the stock and optimized runs (optimize/restore in between)."""
    config = SDXL_UNET_CONFIG if bench_size == "full" else TINY_UNET_CONFIG
    latent = resolution // 8 if bench_size == "full" else 16
    unet = build_lora_unet(config, device, PRECISIONS[request.param])
    yield request.param, unet, unet_inputs(config, latent, device)
    del unet
    gc.collect()


@pytest.mark.parametrize("impl", ["stock", "npu_kernels"])
def test_unet_step(benchmark, lora_unet, impl, bench_size, bench_rounds, resolution, device):
    precision, unet, inputs = lora_unet
    npu_kernels.restore(unet)
    report = npu_kernels.optimize(unet) if impl == "npu_kernels" else None
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["sample"], dtype=torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward() -> torch.Tensor:
        with autocast:
            prediction = unet(**inputs).sample
        return F.mse_loss(prediction.float(), target)

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm up (allocator, optimizer state)
    with peak_memory(device) as memory:
        step()
    activation_bytes = saved_bytes(forward, exclude=list(unet.parameters()))
    optimizer.zero_grad(set_to_none=True)

    benchmark.group = f"unet_step {precision} {resolution if bench_size == 'full' else 'tiny'}"
    benchmark.extra_info.update(
        impl=impl,
        precision=precision,
        size=bench_size,
        resolution=resolution if bench_size == "full" else 128,
        device=device.type,
        peak_bytes=memory["peak"],
        peak_above_weights_bytes=memory["peak"] - memory["baseline"],
        saved_bytes=activation_bytes,
        swapped=report.as_dict() if report else None,
    )
    # A CPU step at full size takes seconds (2 rounds); a GPU step is short and gets 10.
    rounds = bench_rounds or (10 if device.type == "cuda" else 2 if bench_size == "full" else 1)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = 1.0 / benchmark.stats.stats.median
    npu_kernels.restore(unet)
    # pytest-benchmark keeps ``step`` for its report: empty its closure cells (del of a cell
    # variable does that) so the next precision's UNet does not have to fit beside this one.
    del unet, optimizer, params, inputs, target
