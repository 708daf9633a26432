"""Image generation with a whole SDXL-structure pipeline: stock diffusers vs ``npu_kernels.optimize(pipe)``.

One prompt, a few denoising steps (classifier-free guidance: the UNet sees a batch of two) and the VAE
decode, at two resolutions, without and with a LoRA loaded by diffusers' ``load_lora_weights`` from a
file on disk. Per case, in ``extra_info`` and a printed table:

* **time per image**: the whole pipeline call, stock and optimized rounds interleaved on one pipeline
  (``optimize``/``restore`` between them, outside the timed call), medians;
* **peak memory** of the whole call and of the VAE decode alone (where GroupNorm+SiLU's full-resolution
  activations live), each above what was allocated when it began. Counted at the allocator: every
  allocation and free through PyTorch's allocator (tensors, and the scratch buffers ops take from it),
  from ``torch.profiler``'s memory events, so it is exact and repeatable on a shared machine; memory a
  library allocates on its own (oneDNN scratchpads) is not seen, by either side. Measured in a separate
  call per implementation (which is also the warm-up), so the profiler costs the timed rounds nothing;
* the images of both equal per element within ``tests/reference.py``'s tolerance (asserted).

Sizes: ``smoke`` (CI): tiny widths, 64 and 128 px. ``full``: SDXL's VAE at its real widths, a UNet
with SDXL's exact block structure at the launch-count benchmark's narrow widths, text encoders with
SDXL's depths at narrow widths (``benchmarks/sdxl_assets.py`` builds them, random weights); 512 and
1024 px. The pipeline is written to disk and loaded with ``from_pretrained``. Run::

    python -m pytest benchmarks/test_bench_generation.py --bench-size full --benchmark-only -s
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch.profiler import ProfilerActivity, profile, record_function

import npu_kernels
from benchmarks.models import LORA_TARGETS, TINY_UNET_CONFIG
from benchmarks.sdxl_assets import CLIP_BIGG, CLIP_L, SDXL_VAE, build_sdxl_architecture_pipeline
from benchmarks.test_bench_launch_counts import NARROW_SDXL_UNET_CONFIG
from tests.reference import assert_as_accurate_as_stock, assert_close
from trainer.models import pipeline_dtype_kwargs

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESOLUTIONS = {"smoke": (64, 128), "full": (512, 1024)}
STEPS = 4
PROMPT = "a red circle on a blue background"
IMPLS = ("stock", "npu_kernels")
DECODE_RANGE = "vae_decode"


def _narrow_clip(clip: dict, hidden: int, layers: int | None = None, **extra) -> dict:
    """``clip`` (SDXL's CLIP ViT-L or OpenCLIP bigG) at width ``hidden``, heads of 64 channels where wide enough."""
    return dict(clip, hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=max(1, hidden // 64),
                num_hidden_layers=layers or clip["num_hidden_layers"], **extra)


# The UNet's cross-attention width is the two encoders' hidden sizes together; its pooled text input
# is the second encoder's projection (1280 in SDXL and in the narrow UNet, 32 in the tiny one).
PIPELINES = {
    "smoke": dict(
        unet_config=TINY_UNET_CONFIG,
        clip_l=_narrow_clip(CLIP_L, 32, layers=2, projection_dim=32),
        clip_bigg=_narrow_clip(CLIP_BIGG, 32, layers=2, projection_dim=32),
        vae_config=dict(SDXL_VAE, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    ),
    "full": dict(
        unet_config=NARROW_SDXL_UNET_CONFIG,
        clip_l=_narrow_clip(CLIP_L, 128),
        clip_bigg=_narrow_clip(CLIP_BIGG, 128),
        vae_config=SDXL_VAE,
    ),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "resolution_px" in metafunc.fixturenames:
        sizes = RESOLUTIONS[metafunc.config.getoption("--bench-size")]
        metafunc.parametrize("resolution_px", sizes, ids=[f"{px}px" for px in sizes])


@pytest.fixture(scope="module")
def pipeline_dir(bench_size, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init pipeline written with ``save_pretrained`` (built on the meta device, its
    non-persistent buffers, such as CLIP's position ids, get their values when it is loaded)."""
    directory = tmp_path_factory.mktemp("generation_pipeline")
    build_sdxl_architecture_pipeline(**PIPELINES[bench_size]).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module", params=list(PRECISIONS))
def pipeline(request, pipeline_dir, device):
    """(precision, pipeline): loaded with ``from_pretrained`` once per precision, stock between tests."""
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, **pipeline_dtype_kwargs(PRECISIONS[request.param])).to(device)
    pipe.set_progress_bar_config(disable=True)
    yield request.param, pipe
    del pipe
    gc.collect()


@pytest.fixture(scope="module")
def lora_file(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet LoRA (rank 4 on to_q/k/v/out, B random so that it changes the image) written by diffusers'
    ``save_lora_weights``; the adapter is removed from the pipeline again (``unload_lora_weights``)."""
    _, pipe = pipeline
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    directory = tmp_path_factory.mktemp("generation_lora")
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    pipe.unload_lora_weights()
    return directory


def _generate(pipe, resolution_px: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPT, height=resolution_px, width=resolution_px, num_inference_steps=STEPS, generator=generator,
                    output_type="pt").images


def _fp32_image(pipeline_dir: Path, lora_dir: Path | None, resolution_px: int, device: torch.device) -> torch.Tensor:
    """Stock diffusers' image in fp32 (the reference a half-precision image is judged against)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, **pipeline_dtype_kwargs(torch.float32)).to(device)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return _generate(pipe, resolution_px)


def _set_impl(pipe, impl: str) -> None:
    npu_kernels.restore(pipe)
    if impl == "npu_kernels":
        npu_kernels.optimize(pipe)


def _peaks(prof: profile, device: torch.device) -> dict[str, int]:
    """Peak bytes allocated above the start of the profile, overall and within the VAE decode."""
    events = list(prof.profiler.kineto_results.events())
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name.lower() == device.type
    )
    window = next(e for e in events if e.name() == DECODE_RANGE)
    live = peak = decode_peak = 0
    live_at_decode = None
    for start_ns, nbytes in memory:
        if live_at_decode is None and start_ns >= window.start_ns():
            live_at_decode = live
        live += nbytes
        peak = max(peak, live)
        if window.start_ns() <= start_ns <= window.end_ns():
            decode_peak = max(decode_peak, live - live_at_decode)
    return {"peak_bytes": peak, "vae_decode_peak_bytes": decode_peak}


def _profiled_generation(pipe, resolution_px: int, device: torch.device) -> tuple[torch.Tensor, dict[str, int]]:
    """(the decoded image before post-processing's [0, 1] clamp, peak memory) of one pipeline call."""
    decoded: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def marked_decode(*args, **kwargs):
        with record_function(DECODE_RANGE):
            out = decode(*args, **kwargs)
        decoded.append(out[0] if isinstance(out, tuple) else out.sample)
        return out

    pipe.vae.decode = marked_decode  # an instance attribute over the class's method, deleted below
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda"
                     else [ProfilerActivity.CPU], profile_memory=True) as prof:
            _generate(pipe, resolution_px)
    finally:
        del pipe.vae.decode
    return decoded[0], _peaks(prof, device)


@pytest.mark.parametrize("lora", [False, True], ids=["no_lora", "lora"])
def test_generation(benchmark, pipeline, pipeline_dir, lora_file, lora, resolution_px, bench_size, bench_rounds, device):
    precision, pipe = pipeline
    if lora:
        pipe.load_lora_weights(lora_file)
    try:
        images, memory = {}, {}
        for impl in IMPLS:  # also the warm-up of each
            _set_impl(pipe, impl)
            images[impl], memory[impl] = _profiled_generation(pipe, resolution_px, device)
        times: dict[str, list[float]] = {impl: [] for impl in IMPLS}

        def interleaved_round() -> None:
            for impl in IMPLS:
                _set_impl(pipe, impl)
                start = time.perf_counter()
                _generate(pipe, resolution_px)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[impl].append(time.perf_counter() - start)

        rounds = bench_rounds or {"smoke": 1, "full": 2 if device.type == "cpu" else 3}[bench_size]
        benchmark.group = f"generation {precision} {bench_size} {resolution_px}px {'lora' if lora else 'no_lora'}"
        benchmark.pedantic(interleaved_round, rounds=rounds, warmup_rounds=0)
    finally:
        npu_kernels.restore(pipe)
        if lora:
            pipe.unload_lora_weights()

    seconds = {impl: statistics.median(values) for impl, values in times.items()}
    stock, ours = memory["stock"], memory["npu_kernels"]
    benchmark.extra_info.update(
        precision=precision, size=bench_size, device=device.type, resolution=resolution_px, lora=lora, steps=STEPS,
        seconds_per_image=seconds, rounds=times, stock=stock, npu_kernels=ours,
        speedup=seconds["stock"] / seconds["npu_kernels"],
        peak_ratio=ours["peak_bytes"] / stock["peak_bytes"],
        vae_decode_peak_ratio=ours["vae_decode_peak_bytes"] / stock["vae_decode_peak_bytes"],
        memory_method="bytes allocated through PyTorch's allocator (torch.profiler memory events) above the call's start",
    )
    mib = 2**20
    print(f"\nGeneration, {bench_size} SDXL-structure pipeline, {resolution_px} px, {precision}, "
          f"{'LoRA' if lora else 'no LoRA'}, {STEPS} steps, {device.type}, median of {rounds} interleaved rounds")
    print(f"{'':30}{'stock':>12}{'optimize()':>12}{'ratio':>8}")
    print(f"{'time per image (s)':30}{seconds['stock']:>12.3f}{seconds['npu_kernels']:>12.3f}"
          f"{seconds['stock'] / seconds['npu_kernels']:>7.2f}x")
    for key, label in (("peak_bytes", "peak memory, whole (MiB)"), ("vae_decode_peak_bytes", "peak memory, VAE decode (MiB)")):
        print(f"{label:30}{stock[key] / mib:>12.1f}{ours[key] / mib:>12.1f}{ours[key] / stock[key]:>8.3f}")

    assert images["stock"].std() > 0.01, "the stock image is nearly constant: the comparison would prove little"
    if precision == "fp32":
        assert_close(images["npu_kernels"], images["stock"], what=f"image at {resolution_px} px")
    else:  # half precision: as close to an fp32 run of the same pipeline as stock's own image, per element
        exact = _fp32_image(pipeline_dir, lora_file if lora else None, resolution_px, device)
        assert_as_accurate_as_stock({"image": images["npu_kernels"]}, {"image": images["stock"]}, {"image": exact})
    assert ours["vae_decode_peak_bytes"] <= stock["vae_decode_peak_bytes"]
