"""End to end: ``python -m trainer.sdxl_lora`` (no arguments) and its outputs; LoRA file in diffusers;
kernels on vs off; an imagefolder run. In-process (``main(argv)``), tiny model, CPU."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from tests.trainer.runs import run_main
from trainer.embedded_default import EMBEDDED_OVERRIDES, ensure_assets

OUTPUT = EMBEDDED_OVERRIDES["output_dir"]


@pytest.fixture(scope="module")
def cache_env(assets_cache: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        yield assets_cache


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory: pytest.TempPathFactory, cache_env: Path) -> dict[str, Any]:
    """The embedded default exactly as ``python -m trainer.sdxl_lora`` runs it, from an empty directory."""
    from trainer import models

    work = tmp_path_factory.mktemp("embedded_default")
    saved_unets = []  # the trained UNet in memory, as the trainer hands it to the LoRA file writer
    save_lora_weights = models.save_lora_weights
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(models, "save_lora_weights", lambda directory, unet, *rest: saved_unets.append(unet) or save_lora_weights(directory, unet, *rest))
        started = time.perf_counter()
        summary, stdout, stderr = run_main([])
        seconds = time.perf_counter() - started
    print(f"embedded default: {seconds:.1f} s in-process (assets generated if not cached)")
    return {"dir": work / OUTPUT, "summary": summary, "stdout": stdout, "stderr": stderr, "seconds": seconds,
            "unet": saved_unets[-1]}


def test_embedded_default_summary(embedded_run: dict[str, Any]) -> None:
    summary = embedded_run["summary"]
    written = json.loads((embedded_run["dir"] / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == EMBEDDED_OVERRIDES["max_train_steps"]
    assert written["global_batch"] == EMBEDDED_OVERRIDES["train_batch_size"]
    assert written["warmup_steps_skipped"] == 5 and written["steps_measured"] == written["steps"] - 5
    assert 0 < written["fps"] <= written["fps_without_data_loading"]
    assert np.isfinite(written["final_train_loss"]) and np.isfinite(written["mean_train_loss"])
    assert written["final_train_loss"] == written["loss_history"][-1]
    assert len(written["peak_memory_bytes_per_device"]) == 1 and written["peak_memory_bytes_per_device"][0] > 0
    assert written["kernels"]["enabled"] and written["kernels"]["attention_processors"] > 0
    # op -> {backend: calls}, counted while training
    assert written["backends"] and all(v and all(n > 0 for n in v.values()) for v in written["backends"].values())
    assert written["embedded_pipeline"] is True and written["embedded_dataset"] is True
    assert written["skipped_steps"] == 0 and written["nonfinite_loss_steps"] == 0
    # Learning is visible: the loss of the last fifth of the run is below that of the first fifth.
    losses = written["loss_history"]
    fifth = len(losses) // 5
    assert np.mean(losses[-fifth:]) < np.mean(losses[:fifth])


def test_embedded_default_prints_progress_and_ascend_lines(embedded_run: dict[str, Any]) -> None:
    stdout, stderr = embedded_run["stdout"], embedded_run["stderr"]
    summary = embedded_run["summary"]
    assert f"Final Performance images/sec : {summary['fps']:.2f}" in stdout
    assert f"Final Train Loss : {summary['final_train_loss']:.6f}" in stdout
    assert "Steps:" in stderr and "step_loss=" in stderr and "images_per_sec=" in stderr  # the tqdm bar


def test_embedded_default_writes_lora_images_curve_and_tensorboard(embedded_run: dict[str, Any]) -> None:
    from PIL import Image
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = embedded_run["dir"]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("unet.") for key in lora)
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(f".{target}." in key for key in lora), target
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k or ".up." in k)  # B was trained

    prompts = EMBEDDED_OVERRIDES["validation_prompts"]
    for phase in ("epoch_000", "final"):
        images = sorted((out / "validation" / phase).glob("*.png"))
        assert len(images) == len(prompts) * EMBEDDED_OVERRIDES["num_validation_images"]
        assert Image.open(images[0]).size == (64, 64)
    assert len(embedded_run["summary"]["validation_images"]) == 2 * len(prompts)

    curve = Image.open(out / "loss_curve.png")
    assert curve.format == "PNG" and curve.size[0] > 300

    events = EventAccumulator(str(out / "logs" / "text2image-fine-tune"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert len(events.Scalars("train_loss")) == EMBEDDED_OVERRIDES["max_train_steps"]
    assert {"lr", "images_per_sec"} <= set(events.Tags()["scalars"])
    assert {"validation", "test"} <= {tag.split("/")[0] for tag in events.Tags()["images"]}


def test_second_run_reuses_the_cached_assets(embedded_run: dict[str, Any], cache_env: Path) -> None:
    marker = next(cache_env.glob("embedded_sdxl_*/COMPLETE"))
    before = marker.stat().st_mtime_ns
    from trainer import embedded_default

    def regenerate():
        raise AssertionError("the cached assets were generated again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedded_default, "build_pipeline", regenerate)
        ensure_assets()
    assert marker.stat().st_mtime_ns == before


def test_lora_file_loads_into_diffusers_pipeline_as_trained(embedded_run: dict[str, Any], cache_env: Path) -> None:
    """load_lora_weights gives the pipeline every LoRA tensor of the file, equal to the trained UNet's in
    memory, and the pipeline then renders what it renders with the trained UNet itself."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from tests import reference

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(ensure_assets().model_dir))
    pipeline.set_progress_bar_config(disable=True)

    def render() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        out = pipeline("a red circle on a blue background", num_inference_steps=2, generator=generator, output_type="latent")
        return out.images.float()

    base = render()
    pipeline.load_lora_weights(str(embedded_run["dir"]))
    (adapter,) = pipeline.get_list_adapters().get("unet")
    in_file = convert_unet_state_dict_to_peft(
        {key.removeprefix("unet."): value for key, value in load_file(embedded_run["dir"] / "pytorch_lora_weights.safetensors").items()}
    )
    trained = embedded_run["unet"]
    for what, state in (("loaded into the pipeline", get_peft_model_state_dict(pipeline.unet, adapter_name=adapter)),
                        ("trained, in memory", get_peft_model_state_dict(trained))):
        assert state.keys() == in_file.keys() and state, f"{what}: LoRA keys differ from the file's"
        for key, value in in_file.items():
            assert torch.equal(state[key].detach().cpu().to(value.dtype), value), f"{what}: {key} differs from the file"
    tuned = render()
    loaded_unet, pipeline.unet = pipeline.unet, trained
    try:
        as_trained = render()
    finally:
        pipeline.unet = loaded_unet
    # The trained UNet runs the fused kernels, the loaded one stock diffusers: fp32 rounding apart.
    reference.assert_close(tuned, as_trained, torch.float32, "pipeline with the LoRA file vs with the trained UNet", k=1e-4)
    assert (tuned - base).abs().max() > 1e-3  # and the LoRA matters
    pipeline.unload_lora_weights()
    reference.assert_close(render(), base, torch.float32, "after unload_lora_weights", k=1e-5)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.trainer.test_data import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("imagefolder") / "train", rows=12)


def test_kernels_on_and_off_give_the_same_loss_curve(tmp_path: Path, cache_env: Path, imagefolder: Path) -> None:
    """Same seed, same data: the fused kernels must not change the loss curve (also: the embedded pipeline on
    one's own imagefolder, asked for by name)."""
    common = [
        "--pretrained_model_name_or_path", "embedded", "--train_data_dir", str(imagefolder), "--max_train_steps", "8", "--seed", "7",
        "--num_validation_images", "0", "--report_to", "none", "--snr_gamma", "5.0",
    ]  # fmt: skip
    on, _, _ = run_main(common + ["--output_dir", str(tmp_path / "on"), "--kernels", "on"])
    off, _, _ = run_main(common + ["--output_dir", str(tmp_path / "off"), "--kernels", "off"])
    assert on["kernels"]["enabled"] and not off["kernels"]["enabled"]
    assert on["embedded_pipeline"] and off["embedded_pipeline"]  # asked for by name, and said so
    assert on["steps"] == off["steps"] == 8
    np.testing.assert_allclose(on["loss_history"], off["loss_history"], rtol=2e-3, atol=1e-4)
    # The weights after AdamW are not compared: Adam normalises the gradients, so a scale error in a
    # kernel's backward would hardly show. tests/trainer/test_semantics.py compares one step's raw LoRA
    # gradients instead (test_kernels_on_and_off_give_the_same_raw_lora_gradients).
