"""DoRA column of the launch counts: one DoRA step, stock diffusers + PEFT's DoRA vs ``npu_kernels.optimize``.

The launch-count benchmark's model (``benchmarks/test_bench_launch_counts.py``: SDXL's block structure
at narrow widths with ``--bench-size full``, the tiny UNet in the smoke run) with PEFT DoRA r4
(``LoraConfig(use_dora=True)``, diffusers' DreamBooth SDXL recipe) on to_q/to_k/to_v/to_out.0, fp32 and
bf16 autocast (frozen weights bf16, DoRA parameters fp32). Per precision, in ``extra_info`` and a
printed table: ATen ops dispatched and kernel-launching ops of one forward+backward, the bytes
autograd saves for the backward, and the step time (forward, backward, AdamW) with PEFT and
optimized rounds interleaved on one model. Before measuring, the DoRA parameters are moved off their
initial values (B random, magnitudes away from the row norms), so both paths compute a non-trivial
DoRA, and the smoke asserts they predict the same (fp32 per element, bf16 at bf16's tolerance) and
that ours dispatches, launches and saves no more than PEFT's. Run::

    python -m pytest benchmarks/test_bench_dora.py --bench-size full --benchmark-only -s
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import benchmarks.test_bench_launch_counts as launch_counts  # the module, not its tests: nothing collected twice
import npu_kernels
from benchmarks.dispatch_counts import count_dispatches
from benchmarks.memory import saved_bytes
from benchmarks.models import TINY_UNET_CONFIG, build_lora_unet, interleaved_step_medians, lora_step_calls, unet_inputs
from tests import reference

IMPLS = ("peft_dora", "npu_kernels")


@torch.no_grad()
def _train_a_little(unet: torch.nn.Module) -> None:
    """B random and magnitudes 0.8x-1.2x their row norms, as after some training (gaussian init starts
    with B = 0 and magnitude = ‖W‖, where DoRA's scale is exactly 1)."""
    generator = torch.Generator().manual_seed(2)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        elif "lora_magnitude_vector" in name:
            param.mul_(0.8 + 0.4 * torch.rand(param.shape, generator=generator).to(param.device))


@pytest.fixture(scope="module", params=list(launch_counts.PRECISIONS))
def dora_step(request, bench_size, device):
    precision = request.param
    config = launch_counts.NARROW_SDXL_UNET_CONFIG if bench_size == "full" else TINY_UNET_CONFIG
    latent = 32 if bench_size == "full" else 16
    unet = build_lora_unet(config, device, launch_counts.PRECISIONS[precision], use_dora=True)
    _train_a_little(unet)
    inputs = unet_inputs(config, latent, device)
    calls = lora_step_calls(unet, inputs, precision == "bf16", device)
    yield precision, unet, inputs, calls.forward, calls.forward_backward, calls.step, calls.predict
    npu_kernels.restore(unet)
    gc.collect()


@torch.no_grad()
def _fp32_prediction(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """What PEFT's DoRA predicts in fp32, without autocast, with the (bf16-valued) weights of ``unet``."""
    return copy.deepcopy(unet).float()(**inputs).sample.float()


def _set_impl(unet: torch.nn.Module, impl: str) -> None:
    npu_kernels.restore(unet)
    if impl == "npu_kernels":
        report = npu_kernels.optimize(unet)
        assert report.lora_layers and not report.lora_fallbacks, report.lora_fallbacks  # every DoRA layer fused


def test_dora_launch_counts(benchmark, dora_step, bench_size, bench_rounds, device):
    precision, unet, inputs, forward, forward_backward, step, predict = dora_step
    exact_prediction = _fp32_prediction(unet, inputs) if precision == "bf16" else None
    measured: dict[str, dict] = {}
    predictions: dict[str, torch.Tensor] = {}
    for impl in IMPLS:
        _set_impl(unet, impl)
        predictions[impl] = predict()
        forward_backward()  # warm up: lazy initialisation (and the ‖W‖² cache) must not count
        counts = count_dispatches(forward_backward)
        measured[impl] = dict(
            dispatched=counts.dispatched,
            launching=counts.launching,
            saved_bytes=saved_bytes(forward, exclude=list(unet.parameters())),
            top_launching=counts.top(8, launching_only=True),
        )
    # Stock PEFT DoRA and ours predict the same: fp32 per element as the LoRA launch counts; in bf16 ours is
    # as close as PEFT's to the fp32 prediction of the same (bf16-valued) weights, judged by PEFT's own
    # bf16 error (bf16 rounding grows through the UNet: no per-element bound holds between two bf16 runs).
    if precision == "fp32":
        reference.assert_close(predictions["npu_kernels"], predictions["peft_dora"], torch.float32, "output", rtol=1e-5, k=2e-4)
    else:
        reference.assert_as_accurate_as_stock(
            {"output": predictions["npu_kernels"]}, {"output": predictions["peft_dora"]}, {"output": exact_prediction}
        )
    peft, ours = measured["peft_dora"], measured["npu_kernels"]
    ratios = {f"{key}_ratio": ours[key] / peft[key] for key in ("dispatched", "launching", "saved_bytes")}

    rounds = bench_rounds or (5 if bench_size == "full" else 1)
    benchmark.group = f"dora_launch_counts {precision} {bench_size}"
    step_s = interleaved_step_medians(benchmark, IMPLS, lambda impl: _set_impl(unet, impl), step, rounds)
    ratios["step_speedup"] = step_s["peft_dora"] / step_s["npu_kernels"]

    benchmark.extra_info.update(
        precision=precision, size=bench_size, device=device.type, peft_dora=peft, npu_kernels=ours,
        step_s=step_s, rounds=rounds, **ratios,
    )  # fmt: skip
    print(f"\nDoRA step, {bench_size} SDXL-structure UNet, {precision}, {device.type}")
    print(f"{'':26}{'PEFT DoRA':>12}{'optimize()':>12}{'ratio':>8}")
    for key, label in (("dispatched", "ATen ops dispatched"), ("launching", "kernel-launching ops"),
                       ("saved_bytes", "activation bytes")):
        print(f"{label:26}{peft[key]:>12}{ours[key]:>12}{ratios[key + '_ratio']:>8.3f}")
    print(f"{'step s (median)':26}{step_s['peft_dora']:>12.4f}{step_s['npu_kernels']:>12.4f}{ratios['step_speedup']:>7.2f}x")
    # Counts are exact: the fused DoRA may not add dispatches, launches or saved bytes over PEFT's.
    assert ours["dispatched"] <= peft["dispatched"]
    assert ours["launching"] <= peft["launching"]
    assert ours["saved_bytes"] <= peft["saved_bytes"]
