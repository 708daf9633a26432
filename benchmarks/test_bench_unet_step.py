"""One LoRA training step of the SDXL UNet: stock diffusers vs ``npu_kernels.optimize``, eager and
compiled -- four rows per precision, side by side in one run.

fp32 (everything fp32) and bf16 (frozen weights bf16, LoRA fp32, bf16 autocast), batch 1. Full size
is SDXL's architecture at ``--resolution`` (512 px by default); smoke is a tiny UNet. Compiled rows
run ``torch.compile(unet, fullgraph=True, mode=--compile-mode)`` (forward and, through AOTAutograd,
backward; the optimizer stays eager); each op's compiled form follows ``backends.compiled_choice``.
The smoke size on a CPU compiles with ``aot_eager`` unless ``--compile-backend inductor`` is given:
inductor's C++ compilation of even the tiny UNet is too slow for CI (the CPU record in
benchmarks/results/ has the compile times).

``extra_info``: ``mode`` (eager/compiled), ``compile_s`` (the first steps' wall time beyond that of
as many steady steps: compilation, and CUDA-graph recording under reduce-overhead), ``step_s``
(median step after warm-up), ``images_per_s``, ``speedup_vs_stock_eager`` (stock eager's step_s
over this row's, same precision and run), peak memory and its part above the resident weights, and
the bytes autograd saves (eager rows).
"""
from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.nn.functional as F

import npu_kernels
from benchmarks.memory import peak_memory, saved_bytes
from benchmarks.models import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, unet_inputs
from tests.reference import assert_close

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Steps before timing: one for the eager allocator and optimizer state; compiled ones also compile
# (the first call) and, under reduce-overhead, record the CUDA graphs (the next calls).
WARMUP_STEPS = {"eager": 1, "compiled": 3}
# Stock eager's median step per (precision, size): the baseline of the other rows' ratios.
_STOCK_EAGER_STEP_S: dict[tuple[str, str], float] = {}
# Stock eager's first fp32 prediction (from the UNet's initial weights): every other fp32 row must agree with it.
_STOCK_PREDICTION: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module", params=list(PRECISIONS))
def lora_unet(request, bench_size, resolution, device):
    """One UNet per precision, shared by the four rows (optimize/restore in between)."""
    config = SDXL_UNET_CONFIG if bench_size == "full" else TINY_UNET_CONFIG
    latent = resolution // 8 if bench_size == "full" else 16
    unet = build_lora_unet(config, device, PRECISIONS[request.param])
    initial = {name: t.clone() for name, t in unet.state_dict().items()}  # each row starts from these weights
    yield request.param, unet, unet_inputs(config, latent, device), initial
    del unet
    torch._dynamo.reset()
    gc.collect()


def _compile(unet: torch.nn.Module, backend: str, mode: str) -> torch.nn.Module:
    """The whole UNet in one graph (``fullgraph``: a graph break fails the row)."""
    if backend != "inductor":  # modes are inductor's
        return torch.compile(unet, fullgraph=True, backend=backend)
    return torch.compile(unet, fullgraph=True, mode=None if mode == "default" else mode)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["stock", "npu_kernels"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_unet_step(benchmark, lora_unet, mode, impl, bench_size, bench_rounds, resolution, device, compile_mode,
                   compile_backend):
    precision, unet, inputs, initial = lora_unet
    if mode == "compiled" and compile_mode == "reduce-overhead" and device.type != "cuda":
        pytest.skip(f"--compile-mode reduce-overhead captures CUDA graphs: needs CUDA, not {device.type}")
    npu_kernels.restore(unet)
    unet.load_state_dict(initial)  # the rows before trained the LoRA: every row starts from the same weights
    report = npu_kernels.optimize(unet) if impl == "npu_kernels" else None
    torch._dynamo.reset()  # every compiled row compiles from scratch: its compile_s is its own
    model = _compile(unet, compile_backend, compile_mode) if mode == "compiled" else unet
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["sample"], dtype=torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward() -> torch.Tensor:
        with autocast:
            prediction = model(**inputs).sample  # noqa: F821 - cell emptied by the del at the end
        return F.mse_loss(prediction.float(), target)  # noqa: F821

    def step() -> None:
        forward().backward()
        optimizer.step()  # noqa: F821 - cell emptied by the del at the end
        optimizer.zero_grad(set_to_none=True)  # noqa: F821
        _synchronize(device)

    if precision == "fp32":  # ours (and compiled) must compute what stock computes, per element
        with torch.no_grad():
            prediction = model(**inputs).sample.detach()
        if mode == "eager" and impl == "stock":
            _STOCK_PREDICTION[str(bench_size)] = prediction
        elif str(bench_size) in _STOCK_PREDICTION:
            assert_close(prediction, _STOCK_PREDICTION[str(bench_size)], what=f"{impl} {mode} UNet prediction vs stock eager")
    warmup = WARMUP_STEPS[mode]
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - start
    with peak_memory(device) as memory:
        step()
    # Saved-tensor hooks see what eager autograd keeps; a compiled graph saves its own way.
    activation_bytes = saved_bytes(forward, exclude=list(unet.parameters())) if mode == "eager" else None
    optimizer.zero_grad(set_to_none=True)

    size = f"{resolution}" if bench_size == "full" else "tiny"
    benchmark.group = f"unet_step {precision} {size}"
    benchmark.extra_info.update(
        impl=impl,
        mode=mode,
        compile_mode=compile_mode if mode == "compiled" else None,
        compile_backend=compile_backend if mode == "compiled" else None,
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
    if benchmark.stats is not None:  # None under --benchmark-disable
        step_s = benchmark.stats.stats.median
        key = (precision, size)
        if mode == "eager" and impl == "stock":
            _STOCK_EAGER_STEP_S[key] = step_s
        baseline = _STOCK_EAGER_STEP_S.get(key)
        benchmark.extra_info.update(
            step_s=step_s,
            images_per_s=1.0 / step_s,
            compile_s=max(warmup_s - warmup * step_s, 0.0) if mode == "compiled" else 0.0,
            speedup_vs_stock_eager=baseline / step_s if baseline else None,
        )
    npu_kernels.restore(unet)
    torch._dynamo.reset()  # drop the compiled graphs (and their CUDA-graph pools) of this row
    # pytest-benchmark keeps ``step`` for its report: empty its closure cells (del of a cell
    # variable does that) so the next precision's UNet does not have to fit beside this one.
    del unet, model, optimizer, params, inputs, target, initial
