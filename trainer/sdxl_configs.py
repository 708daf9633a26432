"""The model configs of SDXL base 1.0, for building its architecture without the hub.

Copied from ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/`` ``config.json``): the fields that shape the networks; every other field has diffusers'
/ transformers' default, which is SDXL's. ``madebyollin/sdxl-vae-fp16-fix`` (the recipe's ``--vae_name``)
has the same VAE architecture. :mod:`trainer.memory_plan` plans these names without a download, and the
benchmarks build their random-init SDXL UNet from :data:`SDXL_UNET_CONFIG`.
"""
from __future__ import annotations

from typing import Any

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"

SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

#: text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP ViT-bigG/14): the layer shapes ...
SDXL_CLIP_L: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_CLIP_BIGG: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
    projection_dim=1280,
)
#: ... and the vocabulary and context both share.
SDXL_CLIP_VOCABULARY: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)
#: (transformers class name, CLIPTextConfig fields) of text_encoder/ and text_encoder_2/.
SDXL_TEXT_ENCODER_CONFIGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("CLIPTextModel", {**SDXL_CLIP_VOCABULARY, **SDXL_CLIP_L}),
    ("CLIPTextModelWithProjection", {**SDXL_CLIP_VOCABULARY, **SDXL_CLIP_BIGG}),
)

#: SDXL base's scheduler/scheduler_config.json, the fields DDPM training reads.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon"
)
