"""The whole recipe (``python -m trainer.sdxl_lora``): default flags vs the speed features on.

Both sides at the same precision: fp32, and bf16 (frozen weights bf16, the fp16-fix-style VAE
given separately so it runs in bf16 too). Speed features: ``--cache_latents
--cache_text_embeddings`` (VAE and text encoders run once before training) and the kernels
(``--kernels on``; default flags train with ``--kernels off``, i.e. stock diffusers modules).

Full size is SDXL's architecture (random weights, built once and cached on disk, ~14 GB) at
``--resolution`` (512 by default) on 8 captioned images; smoke is the embedded tiny pipeline.
``extra_info["images_per_s"]`` is the trainer's own figure: images per second after the first 5
steps, data loading included (its summary's ``fps``).

Each side runs eager and compiled (``--compile``, and ``--compile_mode`` from the benchmarks'
``--compile-mode``; ``--compile_backend`` from ``--compile-backend`` when not inductor, i.e. aot_eager for
the CPU smoke size): four rows per precision. ``compile_s`` is the trainer's own report of its
compile time (summary ``compile_seconds``); ``speedup_vs_default_eager`` divides this row's images/s by
that of default flags eager in the same run.
"""
from __future__ import annotations

import gc
import json

import pytest
from accelerate.state import AcceleratorState, GradientState

from trainer import sdxl_lora

FLAGS = {
    "default_flags": ["--kernels", "off"],
    "speed_features": ["--kernels", "on", "--cache_latents", "--cache_text_embeddings"],
}


# images/s of default flags eager per (precision, resolution): the baseline of the other rows.
_DEFAULT_EAGER_FPS: dict[tuple[str, int], float] = {}
# Default flags eager's fp32 loss at every step: the other fp32 rows train the same maths.
_DEFAULT_EAGER_LOSSES: dict[int, list[float]] = {}


def _compile_flags(compile_mode: str, compile_backend: str) -> list[str]:
    flags = ["--compile"] + (["--compile_mode", compile_mode] if compile_mode != "default" else [])
    if compile_backend != "inductor":
        flags += ["--compile_backend", compile_backend]
    return flags


@pytest.fixture(scope="module")
def assets(bench_size):
    if bench_size == "full":
        from benchmarks.sdxl_assets import ensure_sdxl_assets

        return ensure_sdxl_assets()
    from trainer.embedded_default import ensure_assets

    embedded = ensure_assets()
    return embedded.model_dir, embedded.dataset_dir


@pytest.mark.parametrize("features", list(FLAGS))
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_step(benchmark, assets, tmp_path, bench_size, resolution, precision, mode, features, compile_mode,
                      compile_backend):
    compile_flags = _compile_flags(compile_mode, compile_backend) if mode == "compiled" else []
    model_dir, dataset_dir = assets
    resolution = resolution if bench_size == "full" else 64
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--dataset_name", str(dataset_dir),
        "--resolution", str(resolution),
        "--train_batch_size", "1",
        "--max_train_steps", "8",
        "--mixed_precision", "no" if precision == "fp32" else "bf16",
        "--output_dir", str(tmp_path / "out"),
        "--checkpointing_steps", "1000000",
        "--seed", "42",
        "--center_crop",  # a random crop cannot be cached; both sides crop the same way
        *FLAGS[features],
        *compile_flags,
    ]
    if precision == "bf16":
        argv += ["--vae_name", str(model_dir / "vae")]  # a separate VAE runs in the weight dtype
    summary = {}

    def run() -> None:
        # accelerate keeps one process-wide state; each run here sets its own mixed precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        summary.update(sdxl_lora.main(argv))
        gc.collect()

    benchmark.group = f"trainer_step {precision} {resolution if bench_size == 'full' else 'tiny'}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    fps = saved.get("fps")
    if mode == "eager" and features == "default_flags" and fps:
        _DEFAULT_EAGER_FPS[(precision, resolution)] = fps
    baseline = _DEFAULT_EAGER_FPS.get((precision, resolution))
    if precision == "fp32":  # kernels, caching and compiling change no step's loss beyond rounding
        losses = saved["loss_history"]
        if mode == "eager" and features == "default_flags":
            _DEFAULT_EAGER_LOSSES[resolution] = losses
        elif resolution in _DEFAULT_EAGER_LOSSES:
            expected = _DEFAULT_EAGER_LOSSES[resolution]
            assert len(losses) == len(expected) and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses, expected)), (
                f"{features} {mode} losses {losses} differ from default flags eager's {expected}"
            )
    benchmark.extra_info.update(
        impl=features,
        mode=mode,
        compile_mode=compile_mode if mode == "compiled" else None,
        compile_backend=compile_backend if mode == "compiled" else None,
        precision=precision,
        resolution=resolution,
        images_per_s=fps,
        compile_s=saved.get("compile_seconds"),
        speedup_vs_default_eager=fps / baseline if fps and baseline else None,
        summary=saved,
    )
