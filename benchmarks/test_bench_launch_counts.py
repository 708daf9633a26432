"""Launch counts of one LoRA step: stock diffusers + PEFT vs ``npu_kernels.optimize``, side by side.

One forward+backward of a UNet with SDXL's block structure and PEFT LoRA r4 on
to_q/to_k/to_v/to_out.0 (560 LoRA layers at full size), fp32 and bf16 autocast (frozen weights bf16,
LoRA fp32). Per precision it reports, in ``extra_info`` and a printed table:

* ATen ops dispatched and kernel-launching ops (views, detach, metadata excluded), stock and
  optimized, and their ratios (targets: dispatched <= 0.65x, launching <= 0.75x stock);
* activation memory, the bytes autograd saves for the backward (target <= 0.70x stock);
* the same for ``optimize(recompute="geglu_projection")`` (the feed-forward projection recomputed in
  the backward instead of its output saved), in the third column;
* step time (forward, backward, optimizer) with stock and optimized rounds interleaved on one model,
  so that load on the machine hits both alike.

Counts are exact and repeatable on any device; on a host-bound GPU or NPU step the step time
follows them. ``--bench-size full``: SDXL's exact block structure (transformer depths 1/2/10,
140 attention blocks) at narrow widths, 256 px latents; smoke (CI): the tiny UNet of the other
benchmarks. Run::

    python -m pytest benchmarks/test_bench_launch_counts.py --bench-size full --benchmark-only -s
"""
from __future__ import annotations

import gc
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import npu_kernels
from benchmarks.dispatch_counts import count_dispatches
from benchmarks.memory import saved_bytes
from benchmarks.models import POOLED_DIM, SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, unet_inputs
from tests import reference

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"dispatched_ratio": 0.65, "launching_ratio": 0.75, "saved_bytes_ratio": 0.70}
# SDXL's block structure (layers per block, transformer depths, 140 attention blocks, GEGLU,
# text-time conditioning) at widths where the step is bound by launching ops, as SDXL's batch-1
# step on a GPU is. Widths and head counts keep SDXL's head dim of 64.
NARROW_SDXL_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    block_out_channels=(64, 128, 256),
    attention_head_dim=(1, 2, 4),
    cross_attention_dim=256,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 1280,
)
POOLED_DIM[id(NARROW_SDXL_UNET_CONFIG)] = 1280  # SDXL's pooled text embedding, as unet_inputs reads it


@pytest.fixture(scope="module", params=list(PRECISIONS))
def lora_step(request, bench_size, device):
    """(precision, unet, step): one UNet per precision, stock or optimized by optimize()/restore()."""
    precision = request.param
    config = NARROW_SDXL_UNET_CONFIG if bench_size == "full" else TINY_UNET_CONFIG
    latent = 32 if bench_size == "full" else 16
    unet = build_lora_unet(config, device, PRECISIONS[precision])
    inputs = unet_inputs(config, latent, device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["sample"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward() -> torch.Tensor:
        with autocast:
            prediction = unet(**inputs).sample
        return F.mse_loss(prediction.float(), target)

    def predict() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return unet(**inputs).sample.float()

    def forward_backward() -> None:
        forward().backward()
        for param in params:
            param.grad = None

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    yield precision, unet, forward, forward_backward, step, predict
    npu_kernels.restore(unet)
    gc.collect()


# Implementation -> optimize() options (None: stock diffusers + PEFT).
IMPLS: dict[str, dict | None] = {
    "stock": None,
    "npu_kernels": {},
    "npu_kernels_recompute": {"recompute": "geglu_projection"},
}


def _set_impl(unet: torch.nn.Module, impl: str) -> None:
    npu_kernels.restore(unet)
    if IMPLS[impl] is not None:
        npu_kernels.optimize(unet, **IMPLS[impl])


def test_launch_counts(benchmark, lora_step, bench_size, bench_rounds, device):
    precision, unet, forward, forward_backward, step, predict = lora_step
    measured: dict[str, dict] = {}
    predictions: dict[str, torch.Tensor] = {}
    for impl in IMPLS:
        _set_impl(unet, impl)
        predictions[impl] = predict()
        forward_backward()  # warm up: lazy initialisation must not count
        counts = count_dispatches(forward_backward)
        measured[impl] = dict(
            dispatched=counts.dispatched,
            launching=counts.launching,
            saved_bytes=saved_bytes(forward, exclude=list(unet.parameters())),
            top_launching=counts.top(8, launching_only=True),
        )
    stock, ours, recompute = measured["stock"], measured["npu_kernels"], measured["npu_kernels_recompute"]
    if precision == "fp32":  # the same maths in another order: per element, as tests/test_diffusers_integration.py
        for impl in ("npu_kernels", "npu_kernels_recompute"):
            reference.assert_close(predictions[impl], predictions["stock"], torch.float32, f"{impl} output", rtol=1e-5, k=2e-4)
    ratios = {
        "dispatched_ratio": ours["dispatched"] / stock["dispatched"],
        "launching_ratio": ours["launching"] / stock["launching"],
        "saved_bytes_ratio": ours["saved_bytes"] / stock["saved_bytes"],
        "recompute_saved_bytes_ratio": recompute["saved_bytes"] / stock["saved_bytes"],
    }

    # Step time: stock and optimized rounds alternate on the same model.
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}

    def interleaved_round() -> None:
        for impl in IMPLS:
            _set_impl(unet, impl)
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)

    interleaved_round()  # warm up the optimizer state of both
    times = {impl: [] for impl in IMPLS}
    rounds = bench_rounds or (5 if bench_size == "full" else 1)
    benchmark.group = f"launch_counts {precision} {bench_size}"
    benchmark.pedantic(interleaved_round, rounds=rounds, warmup_rounds=0)
    step_s = {impl: statistics.median(values) for impl, values in times.items()}
    ratios["step_speedup"] = step_s["stock"] / step_s["npu_kernels"]
    ratios["recompute_step_speedup"] = step_s["stock"] / step_s["npu_kernels_recompute"]

    benchmark.extra_info.update(
        precision=precision,
        size=bench_size,
        device=device.type,
        stock=stock,
        npu_kernels=ours,
        npu_kernels_recompute=recompute,
        step_s=step_s,
        rounds=rounds,
        targets=TARGETS,
        **ratios,
    )
    print(f"\nLoRA step, {bench_size} SDXL-structure UNet, {precision}, {device.type}")
    print(f"{'':26}{'stock':>12}{'optimize()':>12}{'ratio':>8}{'target':>8}{'+recompute':>12}{'ratio':>8}")
    for key, label in (("dispatched", "ATen ops dispatched"), ("launching", "kernel-launching ops"),
                       ("saved_bytes", "activation bytes")):
        target = TARGETS[f"{key}_ratio"]
        print(f"{label:26}{stock[key]:>12}{ours[key]:>12}{ratios[key + '_ratio']:>8.3f}{target:>8.2f}"
              f"{recompute[key]:>12}{recompute[key] / stock[key]:>8.3f}")
    print(f"{'step s (median)':26}{step_s['stock']:>12.4f}{step_s['npu_kernels']:>12.4f}"
          f"{ratios['step_speedup']:>7.2f}x{'':>8}{step_s['npu_kernels_recompute']:>12.4f}{ratios['recompute_step_speedup']:>7.2f}x")
    # Counts are exact: no op of ours may add launches or dispatches over the stock maths.
    assert ours["dispatched"] <= stock["dispatched"]
    assert ours["launching"] <= stock["launching"]
    assert ours["saved_bytes"] <= stock["saved_bytes"]
