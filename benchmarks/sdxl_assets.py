"""An SDXL-architecture pipeline (random init, no download) and a small captioned dataset on disk,
in the layouts a real run reads, for the trainer benchmark. Built once and cached.

The components have SDXL base 1.0's architectures (UNet 2.6 B, CLIP ViT-L, OpenCLIP bigG, the
fp16-fix-style VAE that needs no upcast) but random weights; the tokenizers and scheduler are the
embedded default's. Weights are saved in fp32 (about 14 GB), so fp32 and bf16 runs load the same.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.models import SDXL_UNET_CONFIG, _random_init
from trainer.sdxl_configs import SDXL_CLIP_BIGG, SDXL_CLIP_L, SDXL_VAE_CONFIG

ASSETS_VERSION = "v1"
NUM_IMAGES = 8

# SDXL base's text encoders and VAE (trainer.sdxl_configs), the VAE as the fp16-fix release ships it.
CLIP_L = SDXL_CLIP_L
CLIP_BIGG = SDXL_CLIP_BIGG
SDXL_VAE = dict(SDXL_VAE_CONFIG, force_upcast=False)


def _materialise(build) -> torch.nn.Module:
    """Build on the meta device (no memory, no init cost), then allocate and fill with random weights."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu")
    _random_init(module)
    return module


def build_sdxl_architecture_pipeline(
    unet_config: dict = SDXL_UNET_CONFIG, clip_l: dict = CLIP_L, clip_bigg: dict = CLIP_BIGG, vae_config: dict = SDXL_VAE
):
    """SDXL base 1.0's architectures by default; other configs (narrower widths) keep the pipeline's structure."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.embedded_default import build_pipeline, build_tokenizers

    tokenizer, tokenizer_2 = build_tokenizers()
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionXLPipeline(
        vae=_materialise(lambda: AutoencoderKL(**vae_config)),
        text_encoder=_materialise(lambda: CLIPTextModel(CLIPTextConfig(**common, **clip_l))),
        text_encoder_2=_materialise(lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**{**common, "pad_token_id": tokenizer_2.pad_token_id}, **clip_bigg))),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_materialise(lambda: UNet2DConditionModel(**unet_config)),
        scheduler=build_pipeline().scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def ensure_sdxl_assets(root: Path | None = None) -> tuple[Path, Path]:
    """(model_dir, dataset_dir) of the cached SDXL-architecture pipeline and dataset, built if absent."""
    from trainer.embedded_default import build_samples, cache_root, write_parquet_dataset

    base = (root or cache_root()) / f"sdxl_architecture_{ASSETS_VERSION}"
    if not (base / "COMPLETE").exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".sdxl_architecture_", dir=base.parent))
        try:
            build_sdxl_architecture_pipeline().save_pretrained(staging / "model", safe_serialization=True)
            write_parquet_dataset(staging / "dataset", build_samples(num_images=NUM_IMAGES))
            (staging / "COMPLETE").write_text(ASSETS_VERSION + "\n")
            shutil.rmtree(base, ignore_errors=True)
            os.replace(staging, base)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return base / "model", base / "dataset"
