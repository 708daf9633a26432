"""``--output_kohya_format``: the LoRA also in the kohya key layout, as diffusers' DreamBooth SDXL script
writes it, next to the diffusers file in ``--output_dir`` and in every checkpoint.

Reads the session's finished tiny run (``tests/trainer/finished_run.py``, trained with the flag): no
training here. The kohya file is judged by diffusers' own loader: ``load_lora_weights`` takes it and
the UNet gets the same LoRA weights, and the pipeline the same images, as from the diffusers file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer.finished_run import FinishedRun
from trainer.checkpointing import KOHYA_LORA_FILE, LORA_FILE
from trainer.models import pipeline_dtype_kwargs


@pytest.fixture(scope="module")
def run_dir(finished_run: FinishedRun) -> Path:
    """The run's folder, once it is known to have trained and saved (its upload fails by design: exit 3)."""
    assert finished_run.returncode == 3 and (finished_run.dir / LORA_FILE).is_file(), finished_run.stderr[-3000:]
    return finished_run.dir


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _sorted_bytes(tensors: list[torch.Tensor]) -> list[bytes]:
    return sorted(t.contiguous().numpy().tobytes() for t in tensors)


@pytest.mark.parametrize("folder", [".", "checkpoint-2", "checkpoint-4"])
def test_a_kohya_file_is_written_next_to_every_lora_file(run_dir: Path, folder: str) -> None:
    """Same tensors, kohya's names: ``lora_unet_<module>.lora_down/.lora_up.weight`` and an ``alpha`` per
    module equal to the rank (the trainer's ``lora_alpha``, so the scale stays 1)."""
    root = run_dir / folder
    ours, kohya = _tensors(root / LORA_FILE), _tensors(root / KOHYA_LORA_FILE)
    modules = {key.split(".")[0] for key in kohya}
    assert all(m.startswith("lora_unet_") for m in modules), sorted(modules)[:3]
    assert set(kohya) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(modules) == len(ours) // 2
    for module in modules:
        assert int(kohya[f"{module}.alpha"]) == kohya[f"{module}.lora_down.weight"].shape[0]
    downs = [v for k, v in ours.items() if "lora_A" in k or "lora.down" in k]
    ups = [v for k, v in ours.items() if "lora_B" in k or "lora.up" in k]
    assert len(downs) == len(ups) == len(modules)
    assert _sorted_bytes(downs) == _sorted_bytes([kohya[f"{m}.lora_down.weight"] for m in modules])
    assert _sorted_bytes(ups) == _sorted_bytes([kohya[f"{m}.lora_up.weight"] for m in modules])


@pytest.fixture(scope="module")
def pipeline_with_both(run_dir: Path, assets: Any) -> Any:
    """The embedded pipeline with the run's LoRA loaded twice by ``load_lora_weights``: from the diffusers
    file (adapter ``diffusers``) and from the kohya file (adapter ``kohya``)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(assets.model_dir), **pipeline_dtype_kwargs(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE, adapter_name="diffusers")
    pipe.load_lora_weights(str(run_dir), weight_name=KOHYA_LORA_FILE, adapter_name="kohya")
    return pipe


def test_load_lora_weights_gives_the_same_unet_weights_from_the_kohya_file(pipeline_with_both: Any) -> None:
    """Every LoRA layer of the UNet: the kohya adapter's ``W + scale * B @ A`` is the diffusers adapter's."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in pipeline_with_both.unet.modules() if isinstance(m, LoraLayer)]
    assert layers and all({"diffusers", "kohya"} <= set(m.lora_A) for m in layers)
    trained = 0
    for layer in layers:
        delta = layer.get_delta_weight("diffusers")
        torch.testing.assert_close(layer.get_delta_weight("kohya"), delta, rtol=0, atol=0)
        trained += bool(delta.abs().max() > 0)
    assert trained == len(layers)  # B was trained away from zero in every layer: the comparison means something


def test_the_kohya_file_generates_the_same_images(pipeline_with_both: Any) -> None:
    def image(adapter: str | None) -> torch.Tensor:
        if adapter is None:
            pipeline_with_both.disable_lora()
        else:
            pipeline_with_both.enable_lora()
            pipeline_with_both.set_adapters(adapter)
        result = pipeline_with_both(
            "a red circle on a blue background", num_inference_steps=3, height=64, width=64,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        )  # fmt: skip
        return result.images

    with_diffusers_file, with_kohya_file, without_lora = image("diffusers"), image("kohya"), image(None)
    assert torch.isfinite(with_diffusers_file).all()
    torch.testing.assert_close(with_kohya_file, with_diffusers_file, rtol=0, atol=0)
    assert not torch.equal(without_lora, with_diffusers_file)  # the LoRA changes the image
