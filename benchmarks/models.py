"""Random-init UNets for the benchmarks: SDXL's full architecture (built on the meta device and
materialised in place, no download) or a tiny one of the same layout for the CI smoke run."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from trainer.sdxl_configs import SDXL_UNET_CONFIG  # stabilityai/stable-diffusion-xl-base-1.0's UNet

TINY_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG,
    sample_size=16,
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 2, 4),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
)
POOLED_DIM = {id(SDXL_UNET_CONFIG): 1280, id(TINY_UNET_CONFIG): 32}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Fan-in scaled normal weights, zero biases, unit norms: activations stay O(1) through the net."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            fan_in = math.prod(weight.shape[1:])
            weight.copy_(torch.randn(weight.shape, generator=generator).mul_(1 / math.sqrt(fan_in)))
        elif isinstance(weight, torch.Tensor):
            weight.fill_(1.0)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


def build_lora_unet(
    config: dict, device: torch.device, weight_dtype: torch.dtype, rank: int = 4, use_dora: bool = False
) -> UNet2DConditionModel:
    """The recipe's model: frozen UNet in ``weight_dtype``, PEFT LoRA (rank 4; DoRA with ``use_dora``)
    trainable in fp32."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(weight_dtype).to_empty(device=device)
    _random_init(unet)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, use_dora=use_dora, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # diffusers' cast_training_params: LoRA trains in fp32
    unet.train()
    return unet


def unet_inputs(config: dict, latent_size: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(1)
    pixels = latent_size * 8
    return {
        "sample": torch.randn(1, 4, latent_size, latent_size, generator=generator).to(device),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"], generator=generator).to(device),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, POOLED_DIM[id(config)], generator=generator).to(device),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32, device=device),
        },
    }


def lora_training_step(
    model: torch.nn.Module, inputs: dict, target: torch.Tensor, optimizer: torch.optim.Optimizer, bf16: bool,
    device: torch.device,
) -> Callable[[], None]:
    """One LoRA training step of ``model``: forward (bf16 autocast when asked), MSE to ``target``,
    backward, optimizer update; waits for the GPU so that a timer around it measures the step."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = model(**inputs).sample
        F.mse_loss(prediction.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


@dataclass
class LoraStepCalls:
    """What the benchmarks time or count of one LoRA step of a UNet on fixed inputs."""

    forward: Callable[[], torch.Tensor]  # the MSE loss, graph kept for a backward
    forward_backward: Callable[[], None]  # forward + backward, gradients dropped
    step: Callable[[], None]  # forward + backward + AdamW update
    predict: Callable[[], torch.Tensor]  # the prediction without a graph, in fp32


def lora_step_calls(unet: torch.nn.Module, inputs: dict, bf16: bool, device: torch.device) -> LoraStepCalls:
    """The calls of one LoRA step of ``unet`` on ``inputs`` (bf16 autocast when asked) against a random
    target, with an AdamW over its trainable parameters."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["sample"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def forward() -> torch.Tensor:
        with autocast:
            prediction = unet(**inputs).sample
        return F.mse_loss(prediction.float(), target)

    def predict() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return unet(**inputs).sample.float()

    def forward_backward() -> None:
        forward().backward()
        for param in params:
            param.grad = None

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return LoraStepCalls(forward, forward_backward, step, predict)


def interleaved_step_medians(
    benchmark, impls: tuple[str, ...] | list[str], set_impl: Callable[[str], None], step: Callable[[], None], rounds: int
) -> dict[str, float]:
    """Median step seconds of each implementation, ``rounds`` rounds through all of them in turn on one model
    (after one warm-up round that also creates the optimizer's state), timed by pytest-benchmark's pedantic."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}

    def interleaved_round() -> None:
        for impl in impls:
            set_impl(impl)
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)

    interleaved_round()
    for values in times.values():
        values.clear()
    benchmark.pedantic(interleaved_round, rounds=rounds, warmup_rounds=0)
    return {impl: statistics.median(values) for impl, values in times.items()}
