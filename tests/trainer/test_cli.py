"""trainer.args: diffusers' flags with diffusers' defaults, Ascend's names, embedded-default overrides."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.args import build_parser, explicit_flags, parse_args
from trainer.embedded_default import EMBEDDED_OVERRIDES

REPO = Path(__file__).resolve().parents[2]

# Every argument of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py and its default, as of
# huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 (2026-08-23).
DIFFUSERS_FLAGS: dict[str, object] = {
    "pretrained_model_name_or_path": None,  # required there; here too, unless no dataset is given either
    "pretrained_vae_model_name_or_path": None,
    "revision": None,
    "variant": None,
    "dataset_name": None,
    "dataset_config_name": None,
    "train_data_dir": None,
    "image_column": "image",
    "caption_column": "text",
    "validation_prompt": None,
    "num_validation_images": 4,
    "validation_epochs": 1,
    "max_train_samples": None,
    "output_dir": "sd-model-finetuned-lora",
    "cache_dir": None,
    "seed": None,
    "resolution": 1024,
    "center_crop": False,
    "random_flip": False,
    "train_text_encoder": False,
    "train_batch_size": 16,
    "num_train_epochs": 100,
    "max_train_steps": None,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "learning_rate": 1e-4,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "snr_gamma": None,
    "allow_tf32": False,
    "dataloader_num_workers": 0,
    "use_8bit_adam": False,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-08,
    "max_grad_norm": 1.0,
    "push_to_hub": False,
    "hub_token": None,
    "prediction_type": None,
    "hub_model_id": None,
    "logging_dir": "logs",
    "report_to": "tensorboard",
    "mixed_precision": None,
    "local_rank": -1,
    "enable_xformers_memory_efficient_attention": False,
    "enable_npu_flash_attention": False,
    "noise_offset": 0,
    "rank": 4,
    "debug_loss": False,
    "image_interpolation_mode": "lanczos",
}
# The flags of that script with choices, and the choices in its order (image_interpolation_mode: the
# lower-cased names of torchvision's InterpolationMode, as dir() lists them).
DIFFUSERS_CHOICES: dict[str, list[str]] = {
    "mixed_precision": ["no", "fp16", "bf16"],
    "image_interpolation_mode": ["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"],
}
OUR_FLAGS = {
    "vae_name": None, "validation_prompts": None, "kernels": "on", "validation_inference_steps": None,
    "use_npu_fused_adamw": False, "max_nonfinite_steps": 5, "geglu_approximate": "none",
    "recompute": "none", "output_kohya_format": False, "use_dora": False, "enable_bucket": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def help_text() -> str:
    """``python -m trainer.sdxl_lora --help`` exactly as a user runs it."""
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.sdxl_lora", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _flag_help(help_text: str, flag: str) -> str:
    """The help block of one flag: from its first mention to the next flag's line."""
    match = re.search(rf"^\s+(?:--\S+.*?)?--{flag}\b.*?(?=^\s+--|\Z)", help_text, re.S | re.M)
    assert match, f"--{flag} missing from --help"
    return " ".join(match.group(0).split())


@pytest.mark.parametrize("flag", sorted({**DIFFUSERS_FLAGS, **OUR_FLAGS}))
def test_help_lists_every_flag_with_its_default(help_text: str, flag: str) -> None:
    block = _flag_help(help_text, flag)
    default = {**DIFFUSERS_FLAGS, **OUR_FLAGS}[flag]
    assert f"(default: {default})" in block, block


def test_parser_defaults_are_diffusers_defaults() -> None:
    defaults = vars(build_parser().parse_args([]))
    for flag, default in DIFFUSERS_FLAGS.items():
        assert defaults[flag] == default, flag
        assert type(defaults[flag]) is type(default), flag


def test_choices_are_diffusers_choices() -> None:
    actions = {action.dest: action for action in build_parser()._actions}  # noqa: SLF001 - no public listing
    for flag, choices in DIFFUSERS_CHOICES.items():
        assert list(actions[flag].choices) == choices, flag


@pytest.mark.parametrize("mode", DIFFUSERS_CHOICES["image_interpolation_mode"])
def test_image_interpolation_mode_is_the_resize_filter(mode: str, assets: object) -> None:
    """--image_interpolation_mode reaches the training transform: the pixels are those of torchvision's
    ``Resize(interpolation=mode)`` on a PIL image, i.e. ``PIL.Image.resize`` with torchvision's filter for
    that mode (its ``pil_modes_mapping``: nearest_exact is PIL's nearest), then the center crop."""
    import contextlib

    import numpy as np
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image
    from transformers import CLIPTokenizer

    from trainer import data

    torchvision_pil_filter = {
        "nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
        "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS,
    }  # fmt: skip
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(45, 67, 3), dtype=np.uint8))  # odd sizes, 67x45
    loaded = Dataset.from_dict({"image": [image], "text": ["noise"]}, features=Features({"image": ImageFeature(), "text": Value("string")}))
    args = parse_args(["--dataset_name", "in-memory", "--pretrained_model_name_or_path", "x", "--resolution", "32",
                       "--center_crop", "--image_interpolation_mode", mode])  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(str(assets.model_dir / "tokenizer"))
    pixels = data.build_train_dataset(args, tokenizer, tokenizer, contextlib.nullcontext, loaded=loaded)[0]["pixel_values"]

    resized = image.resize((int(32 * 67 / 45), 32), torchvision_pil_filter[mode])  # 47x32
    left = int(round((resized.width - 32) / 2.0))
    expected = (np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    np.testing.assert_array_equal(pixels.numpy(), expected)
    if mode != "lanczos":  # each filter gives other pixels than the default (the flag is not ignored)
        assert not np.array_equal(pixels.numpy(), data.SDXLPreprocessor(None, None, "image", "text", 32, center_crop=True).transform_image(image)[0].numpy())


def test_help_names_the_embedded_overrides(help_text: str) -> None:
    for key in EMBEDDED_OVERRIDES:
        assert f"--{key}" in help_text.split("embedded default:")[1]


def test_recompute_levels_are_the_kernels_levels() -> None:
    """--recompute offers exactly npu_kernels.RECOMPUTE_LEVELS; --recompute_geglu_projection is an alias."""
    import npu_kernels
    from trainer import args as trainer_args

    assert trainer_args.RECOMPUTE_LEVELS == npu_kernels.RECOMPUTE_LEVELS
    assert parse_args(["--recompute_geglu_projection"]).recompute == "geglu_projection"
    most_frugal = npu_kernels.RECOMPUTE_LEVELS[-1]
    assert parse_args(["--recompute", most_frugal]).recompute == most_frugal


def test_ascend_names_are_aliases() -> None:
    args = parse_args(["--vae_name=/models/sdxl-vae-fp16-fix", "--validation_prompts", "a b", "c d", "--validation_prompt", "e"])
    assert args.pretrained_vae_model_name_or_path == "/models/sdxl-vae-fp16-fix"
    assert args.all_validation_prompts == ["e", "a b", "c d"]
    assert parse_args(["--pretrained_vae_model_name_or_path", "x"]).pretrained_vae_model_name_or_path == "x"


def test_no_arguments_selects_the_embedded_default_and_its_sizes() -> None:
    args = parse_args([])
    assert args.embedded_model and args.embedded_dataset
    for key, value in EMBEDDED_OVERRIDES.items():
        assert getattr(args, key) == value, key
    assert args.all_validation_prompts == EMBEDDED_OVERRIDES["validation_prompts"]
    assert args.kernels == "on"


def test_explicit_flags_win_over_embedded_overrides() -> None:
    args = parse_args(["--resolution", "1024", "--learning_rate=1e-4", "--validation_prompt", "x"])
    assert (args.resolution, args.learning_rate) == (1024, 1e-4)
    assert args.all_validation_prompts == ["x"]  # a chosen prompt replaces the embedded ones
    assert args.train_batch_size == EMBEDDED_OVERRIDES["train_batch_size"]
    assert explicit_flags(["--vae_name", "v", "--random_flip"]) == {"pretrained_vae_model_name_or_path", "random_flip"}


def test_a_real_model_keeps_diffusers_defaults() -> None:
    args = parse_args(["--pretrained_model_name_or_path", "/models/sdxl", "--dataset_name", "/data/pokemon"])
    assert not args.embedded_model and not args.embedded_dataset
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.output_dir) == (1024, 16, 1e-4, "sd-model-finetuned-lora")
    assert args.all_validation_prompts == []


def test_ascend_launch_line_parses() -> None:
    """The python command line of Ascend's test/train_1p_text_to_image_sdxl_lora.sh, verbatim."""
    argv = (
        "--pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0"
        " --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix"
        " --dataset_name=lambdalabs/pokemon-blip-captions --caption_column=text --resolution=1024 --random_flip"
        " --train_batch_size=1 --gradient_accumulation_steps=1 --gradient_checkpointing --max_train_steps=1000"
        " --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 --max_grad_norm=1 --mixed_precision=no"
        " --checkpointing_steps=500 --output_dir=test/output/0/"
    ).split()
    args = parse_args(argv)
    assert args.gradient_checkpointing and args.random_flip and args.max_train_steps == 1000


def test_local_rank_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parse_args([]).local_rank == 3
