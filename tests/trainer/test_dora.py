"""--use_dora: PEFT DoRA adapters as diffusers' DreamBooth SDXL script adds them, trained through
npu_kernels.dora_linear (no layer falls back to PEFT's forward), saved in diffusers' LoRA format with the
magnitude vectors, loaded back by load_lora_weights and by the checkpoint hook. In-process, tiny model, CPU."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from tests.trainer.test_e2e import run_main

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory: pytest.TempPathFactory, assets: Any) -> Iterator[dict[str, Any]]:
    """A two-step --use_dora run (checkpoint at the end), counting the calls of npu_kernels.dora_linear."""
    from npu_kernels import peft_lora

    out = tmp_path_factory.mktemp("dora")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        original = peft_lora.dora_linear
        patch.setattr(peft_lora, "dora_linear", lambda *a: calls.append(1) or original(*a))
        argv = [
            "--pretrained_model_name_or_path", "embedded", "--use_dora", "--output_dir", str(out),
            "--max_train_samples", "4", "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--learning_rate", "1e-2", "--num_validation_images", "0", "--report_to", "none", "--seed", "3",
        ]  # fmt: skip
        summary, _stdout, _stderr = run_main(argv)
    yield {"dir": out, "summary": summary, "dora_linear_calls": len(calls)}


def test_dora_layers_train_through_the_fused_op(dora_run: dict[str, Any]) -> None:
    kernels = dora_run["summary"]["kernels"]
    assert kernels["enabled"] and kernels["lora_layers"] > 0
    assert kernels["lora_fallbacks"] == [], kernels["lora_fallbacks"]
    # every LoRA layer, forward in each of the two steps (final inference loads the file into stock modules)
    assert dora_run["dora_linear_calls"] >= 2 * kernels["lora_layers"]


def test_dora_file_loads_into_diffusers_pipeline(dora_run: dict[str, Any], assets: Any) -> None:
    """Every LoRA layer has its magnitude vector in the file (diffusers' key names), load_lora_weights
    makes DoRA layers of them with the file's values, and the trained magnitudes moved off their init."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(dora_run["dir"] / LORA_FILE)
    magnitudes = [key for key in state if "lora_magnitude_vector" in key]
    downs = [key for key in state if "lora_A" in key or ".down." in key]
    assert magnitudes and len(magnitudes) == len(downs)
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(assets.model_dir))
    pipeline.load_lora_weights(str(dora_run["dir"]))
    (adapter,) = pipeline.get_list_adapters().get("unet")
    in_file = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in state.items()})
    loaded = get_peft_model_state_dict(pipeline.unet, adapter_name=adapter)
    assert loaded.keys() == in_file.keys()
    for key, value in in_file.items():
        assert torch.equal(loaded[key].detach().to(value.dtype), value), key
    # The magnitude starts as the row norms of W (B is zero at gaussian init); training moved it.
    moved = 0
    for module in pipeline.unet.modules():
        if hasattr(module, "lora_magnitude_vector") and adapter in module.lora_magnitude_vector:
            initial = module.base_layer.weight.detach().float().norm(dim=1)
            moved += not torch.allclose(module.lora_magnitude_vector[adapter].weight.float(), initial, rtol=1e-4)
    assert moved > 0


def test_checkpoint_holds_the_magnitudes_and_the_load_hook_restores_them(dora_run: dict[str, Any], assets: Any) -> None:
    """The checkpoint's LoRA file, converted as the trainer's load hook converts it, sets every magnitude."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from trainer.models import UNET_LORA_TARGETS

    (checkpoint,) = sorted(dora_run["dir"].glob("checkpoint-*"))
    state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(str(checkpoint))
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    unet = UNet2DConditionModel.from_pretrained(str(assets.model_dir), subfolder="unet")
    rank = next(v for k, v in unet_state.items() if "lora_A" in k).shape[0]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, use_dora=True, target_modules=UNET_LORA_TARGETS))
    set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    restored = get_peft_model_state_dict(unet)
    assert any("lora_magnitude_vector" in key for key in unet_state)
    for key, value in unet_state.items():
        assert torch.equal(restored[key], value), key
