"""A tiny UNet2DConditionModel with SDXL's block layout and text-time conditioning, for tests."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

CROSS_DIM = 64
POOLED_DIM = 32
TIME_IDS = 6


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's structure (Down, CrossAttnDown x2 / CrossAttnUp x2, Up; text_time embedding, linear
    projections, GEGLU feed-forwards) at widths a CPU test runs in a second."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=36,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 6),  # number of heads per level, as SDXL's config means it
        cross_attention_dim=CROSS_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TIME_IDS * 8 + POOLED_DIM,
        norm_num_groups=32,
    )


def tiny_sdxl_inputs(batch: int = 2, size: int = 36, text_len: int = 77, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, text_len, CROSS_DIM, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, POOLED_DIM, generator=generator),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        },
    }
