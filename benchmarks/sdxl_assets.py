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

ASSETS_VERSION = "v1"
NUM_IMAGES = 8

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=False)


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
