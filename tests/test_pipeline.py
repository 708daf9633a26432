"""``npu_kernels.optimize(pipe)`` / ``restore(pipe)`` on a whole diffusers pipeline read from disk.

The pipeline is the trainer's embedded tiny SDXL (``trainer.embedded_default.build_pipeline``), written
with ``save_pretrained`` and read back with ``from_pretrained``; the LoRA is a file written by diffusers'
``save_lora_weights`` and read by ``load_lora_weights``. Images are generated at 160 px: 20x20 latents,
so the VAE's mid-block self-attention has 400 tokens (``flash_attention``) and the UNet's 100 and 25
(``cross_attention``'s short key/value path).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import npu_kernels
from npu_kernels import diffusers_integration
from tests import reference
from trainer.embedded_default import VALIDATION_PROMPTS, build_pipeline

SIZE = 160
STEPS = 3
MODELS = ("vae", "unet")
TEXT_ENCODERS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pipeline") / "model"
    build_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


def load(model_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UNet LoRA (r4 on to_q/k/v/out, lora_B random so that it changes the image) saved by diffusers."""
    unet = load(model_dir).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    directory = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(unet))
    return directory


def generate(pipe: StableDiffusionXLPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoised latents, decoded image before the [0, 1] clamp of post-processing): no value hidden by clamping."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe(
            VALIDATION_PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=generator,
            output_type="latent",
        ).images
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents, image


def assert_same_images(actual: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    for got, ref, what in zip(actual, expected, ("latents", "image")):
        assert ref.std() > 0.05, f"{what}: the stock result is nearly constant, the comparison would prove little"
        reference.assert_close(got, ref, what=what)


def assert_bitwise(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert all(torch.equal(a, e) for a, e in zip(actual, expected)), "restore(pipe) does not give stock's bits"


def instance_forwards(pipe: StableDiffusionXLPipeline) -> dict[str, object]:
    """Every instance-level forward and attention processor optimize() may have installed, by module name."""
    found: dict[str, object] = {}
    for component, model in diffusers_integration._pipeline_models(pipe).items():
        for name, module in model.named_modules():
            if "forward" in module.__dict__:
                found[f"{component}.{name}"] = module.__dict__["forward"]
            if isinstance(module, Attention):
                found[f"{component}.{name}.processor"] = module.processor
    return found


def test_report_lists_each_component(model_dir: Path) -> None:
    pipe = load(model_dir)
    report = npu_kernels.optimize(pipe)

    assert isinstance(report, npu_kernels.OptimizeReport)
    assert set(report.components) == set(MODELS) | set(TEXT_ENCODERS)
    for name in MODELS:
        model, part = getattr(pipe, name), report.components[name]
        assert part.attention_processors == sum(isinstance(m, Attention) for m in model.modules()) > 0, name
        assert part.resnet_blocks == sum(isinstance(m, ResnetBlock2D) for m in model.modules()) > 0, name
        assert not part.skipped and not part.lora_fallbacks, name
    assert report.components["vae"].norm_out_pairs == 2  # encoder and decoder conv_norm_out + conv_act
    assert report.components["unet"].geglu > 0
    for name, cls in TEXT_ENCODERS.items():
        part = report.components[name]
        assert not any(getattr(part, field) for field in diffusers_integration._COUNT_FIELDS), name
        assert f"{name}: {cls} is not a diffusers model, nothing to swap" in report.skipped
        assert f"  {name}: {cls} is not a diffusers model, nothing to swap" in str(report).splitlines()
        assert not any("forward" in m.__dict__ for m in getattr(pipe, name).modules()), f"{name} was touched"
    for field in diffusers_integration._COUNT_FIELDS:
        assert getattr(report, field) == sum(getattr(part, field) for part in report.components.values()), field
    assert report.as_dict()["components"]["vae"]["resnet_blocks"] == report.components["vae"].resnet_blocks
    assert str(report).splitlines()[1].startswith("  vae: ")


def test_optimize_matches_stock_restore_is_bitwise_and_twice_is_idempotent(model_dir: Path) -> None:
    pipe = load(model_dir)
    stock = generate(pipe)

    npu_kernels.optimize(pipe)
    installed = instance_forwards(pipe)
    assert_same_images(generate(pipe), stock)

    again = npu_kernels.optimize(pipe)
    assert not any(getattr(again, field) for field in diffusers_integration._COUNT_FIELDS)
    assert instance_forwards(pipe) == installed, "a second optimize() swapped something again"
    assert_same_images(generate(pipe), stock)

    assert npu_kernels.restore(pipe) is pipe
    assert instance_forwards(pipe).keys() == {k for k in installed if k.endswith(".processor")}
    assert_bitwise(generate(pipe), stock)


def test_vae_decode_runs_the_fused_ops(model_dir: Path, monkeypatch) -> None:
    """The VAE decoder's GroupNorm+SiLU pairs and its mid-block attention go through npu_kernels' ops."""
    pipe = load(model_dir)
    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        stock = pipe.vae.decode(latents).sample
    calls = {"group_norm_silu": 0, "flash_attention": 0}

    def counted(name: str):
        op = getattr(diffusers_integration, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(diffusers_integration, name, counted(name))
    npu_kernels.optimize(pipe)
    with torch.no_grad():
        ours = pipe.vae.decode(latents).sample

    decoder = pipe.vae.decoder
    resnets = sum(isinstance(m, ResnetBlock2D) for m in decoder.modules())
    assert calls == {"group_norm_silu": 2 * resnets + 1, "flash_attention": 1}  # + conv_norm_out; 400 tokens
    reference.assert_close(ours, stock, what="VAE decode")


@pytest.mark.parametrize("batch", [1, 2])
def test_group_norm_silu_takes_the_vae_attention_output_layout(batch: int) -> None:
    """The VAE's attention returns ``out.transpose(-1, -2).reshape(...) + residual``: channels-last, and
    with a batch of one its batch stride is arbitrary, which ATen's GroupNorm refuses as it is (stock
    F.group_norm copies it to contiguous first; so must the backend)."""
    channels, side = 32, 5
    generator = torch.Generator().manual_seed(7)
    out = torch.randn(batch, side * side, channels, generator=generator).transpose(-1, -2).reshape(batch, channels, side, side)
    x = (out + torch.randn(batch, channels, side, side, generator=generator)).requires_grad_()
    weight = torch.randn(channels, generator=generator).requires_grad_()
    bias = torch.randn(channels, generator=generator).requires_grad_()
    reference.check_against_reference(
        npu_kernels.group_norm_silu, reference.group_norm_silu, (x, 8, weight, bias, 1e-6), torch.float32, "VAE layout"
    )


def test_pipeline_with_a_lora_file(model_dir: Path, lora_dir: Path) -> None:
    plain = generate(load(model_dir))
    pipe = load(model_dir)
    pipe.load_lora_weights(lora_dir)
    stock = generate(pipe)
    assert (stock[1] - plain[1]).abs().max() > 1e-3, "the LoRA does not change the image: the check would prove little"

    report = npu_kernels.optimize(pipe)
    lora_layers = sum(diffusers_integration.peft_lora.patchable(m) for m in pipe.unet.modules())
    assert report.components["unet"].lora_layers == lora_layers > 0 and not report.lora_fallbacks
    assert_same_images(generate(pipe), stock)
    npu_kernels.restore(pipe)
    assert_bitwise(generate(pipe), stock)

    # Loaded after optimize(): the LoRA applies at once (PEFT's forward), and is fused by the next call.
    late = load(model_dir)
    npu_kernels.optimize(late)
    late.load_lora_weights(lora_dir)
    assert_same_images(generate(late), stock)
    assert npu_kernels.optimize(late).components["unet"].lora_layers == lora_layers
    assert_same_images(generate(late), stock)


def test_anything_else_is_refused_in_one_line() -> None:
    with pytest.raises(TypeError, match="expected a torch.nn.Module or a diffusers DiffusionPipeline, got str"):
        npu_kernels.optimize("stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(TypeError, match="got dict"):
        npu_kernels.restore({})
