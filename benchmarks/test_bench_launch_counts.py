"""Launch counts of one LoRA step: stock diffusers + PEFT vs ``npu_kernels.optimize``, side by side.

One forward+backward of a UNet with SDXL's block structure and PEFT LoRA r4 on
to_q/to_k/to_v/to_out.0 (560 LoRA layers at full size), fp32 and bf16 autocast (frozen weights bf16,
LoRA fp32). Per precision it reports, in ``extra_info`` and a printed table:

* ATen ops dispatched and kernel-launching ops (views, detach, metadata excluded), stock and
  optimized, and their ratios (targets: dispatched <= 0.65x, launching <= 0.75x stock);
* activation memory, the bytes autograd saves for the backward (target <= 0.55x stock from `half_geglu_projection` on);
* one column per ``npu_kernels.RECOMPUTE_LEVELS`` level (``optimize(recompute=level)``; "none" is
  the default), each keeping no more than the one before;
* step time (forward, backward, optimizer): the median of interleaved rounds (stock and every level
  one after the other in each round, on one model, so that load on the machine hits all alike);
* every column's prediction against stock's, per element (bf16: by stock's own error against the
  same weights run in fp32).

Counts are exact and repeatable on any device; on a host-bound GPU or NPU step the step time
follows them. ``--bench-size full``: SDXL's exact block structure (transformer depths 1/2/10,
140 attention blocks) at narrow widths, 256 px latents; smoke (CI): the tiny UNet of the other
benchmarks. Run (step time: 9 rounds at full size unless ``--bench-rounds`` says more)::

    python -m pytest benchmarks/test_bench_launch_counts.py --bench-size full --benchmark-only -s
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import npu_kernels
from benchmarks.dispatch_counts import count_dispatches
from benchmarks.memory import saved_bytes
from benchmarks.models import (
    POOLED_DIM,
    SDXL_UNET_CONFIG,
    TINY_UNET_CONFIG,
    build_lora_unet,
    interleaved_step_medians,
    lora_step_calls,
    unet_inputs,
)
from tests import reference

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"dispatched_ratio": 0.65, "launching_ratio": 0.75, "saved_bytes_ratio": 0.55}
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
    calls = lora_step_calls(unet, inputs, precision == "bf16", device)
    calls.predict.inputs = inputs  # what the bf16 row's fp32 reference runs on
    yield precision, unet, calls.forward, calls.forward_backward, calls.step, calls.predict
    npu_kernels.restore(unet)
    gc.collect()


# Implementation -> optimize() options (None: stock diffusers + PEFT): stock, then every recompute
# level, the default ("none") first.
IMPLS: dict[str, dict | None] = {
    "stock": None,
    **{f"recompute={level}": {"recompute": level} for level in npu_kernels.RECOMPUTE_LEVELS},
}
DEFAULT = "recompute=none"


def _set_impl(unet: torch.nn.Module, impl: str) -> None:
    npu_kernels.restore(unet)
    if IMPLS[impl] is not None:
        npu_kernels.optimize(unet, **IMPLS[impl])


def _check_outputs(precision: str, unet: torch.nn.Module, predictions: dict[str, torch.Tensor], predict) -> None:
    """Every column predicts what stock predicts, per element: fp32 as the same maths in another
    order; bf16 judged against the same weights run in fp32 by stock's own bf16 error."""
    if precision == "fp32":
        for impl in IMPLS:
            reference.assert_close(predictions[impl], predictions["stock"], torch.float32, f"{impl} output", rtol=1e-5, k=2e-4)
        return
    exact_unet = copy.deepcopy(unet)
    npu_kernels.restore(exact_unet)
    exact_unet.float()
    with torch.autocast(predictions["stock"].device.type, enabled=False), torch.no_grad():
        exact = exact_unet(**predict.inputs).sample.float()
    del exact_unet
    for impl in IMPLS:
        reference.assert_as_accurate_as_stock({"output": predictions[impl]}, {"output": predictions["stock"]}, {"output": exact})


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
    _check_outputs(precision, unet, predictions, predict)
    stock, ours = measured["stock"], measured[DEFAULT]
    ratios = {
        f"{key}_ratio": ours[key] / stock[key] for key in ("dispatched", "launching", "saved_bytes")
    }

    # Step time: stock and every level, rounds interleaved on the same model.
    rounds = bench_rounds or (9 if bench_size == "full" else 1)
    benchmark.group = f"launch_counts {precision} {bench_size}"
    step_s = interleaved_step_medians(benchmark, list(IMPLS), lambda impl: _set_impl(unet, impl), step, rounds)
    for impl in IMPLS:
        measured[impl]["step_s"] = step_s[impl]
        measured[impl]["speed_vs_stock"] = step_s["stock"] / step_s[impl]
        measured[impl]["saved_bytes_vs_stock"] = measured[impl]["saved_bytes"] / stock["saved_bytes"]
    ratios["step_speedup"] = measured[DEFAULT]["speed_vs_stock"]

    benchmark.extra_info.update(
        precision=precision, size=bench_size, device=device.type, columns=measured, rounds=rounds, targets=TARGETS, **ratios,
    )
    print(f"\nLoRA step, {bench_size} SDXL-structure UNet, {precision}, {device.type}, median of {rounds} interleaved rounds")
    print(f"{'':26}" + "".join(f"{impl.removeprefix('recompute='):>22}" for impl in IMPLS))
    for key, label in (("dispatched", "ATen ops dispatched"), ("launching", "kernel-launching ops"),
                       ("saved_bytes", "activation bytes")):
        cells = [f"{measured[impl][key]:>12} {measured[impl][key] / stock[key]:>8.3f}x" for impl in IMPLS]
        print(f"{label:26}" + "".join(f"{c:>22}" for c in cells))
    cells = [f"{step_s[impl]:>12.4f} {measured[impl]['speed_vs_stock']:>7.2f}x" for impl in IMPLS]
    print(f"{'step s (speed vs stock)':26}" + "".join(f"{c:>22}" for c in cells))
    print(f"targets (default vs stock): {TARGETS}")
    # Counts are exact: no op of ours may add launches or dispatches over the stock maths.
    assert ours["dispatched"] <= stock["dispatched"]
    assert ours["launching"] <= stock["launching"]
    kept = [measured[impl]["saved_bytes"] for impl in IMPLS]
    assert kept == sorted(kept, reverse=True), "each level keeps no more than the one before"
    # The 0.55x target is held by the first level that recomputes a feed-forward GEMM, at both sizes and
    # precisions (the default recomputes no GEMM: see benchmarks/memory_curve.py for what each level costs in time).
    assert measured["recompute=half_geglu_projection"]["saved_bytes"] <= TARGETS["saved_bytes_ratio"] * stock["saved_bytes"]
