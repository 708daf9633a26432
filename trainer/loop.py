"""The SDXL LoRA training step and loop (diffusers' ``train_text_to_image_lora_sdxl.py`` semantics).

Per step: VAE-encode the pixels (``latent_dist.sample() * scaling_factor``), add DDPM noise at uniformly
drawn timesteps (plus ``--noise_offset``), condition the UNet on the concatenated penultimate hidden
states of both text encoders, the second encoder's pooled embedding and the time ids
``original_size + crop_top_left + target_size``, and regress the noise (or the velocity for
v-prediction) with an MSE computed in float32, optionally Min-SNR weighted.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from trainer.metrics import StepRecord, TrainingHistory

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pieces of a step
def encode_prompt(
    text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds, pooled prompt embeds) as ``StableDiffusionXLPipeline.encode_prompt`` builds them.

    Prompt embeds: each encoder's penultimate hidden state, concatenated on the channel axis. Pooled:
    the first output of the last encoder (``CLIPTextModelWithProjection``'s projected ``text_embeds``).
    """
    embeds = []
    pooled = None
    for text_encoder, ids in zip(text_encoders, input_ids):
        outputs = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
        pooled = outputs[0]
        hidden = outputs[-1][-2]
        embeds.append(hidden.view(hidden.shape[0], hidden.shape[1], -1))
    prompt_embeds = torch.concat(embeds, dim=-1)
    assert pooled is not None
    return prompt_embeds, pooled.view(prompt_embeds.shape[0], -1)


def compute_time_ids(
    original_sizes: Sequence[Sequence[int]],
    crop_top_lefts: Sequence[Sequence[int]],
    resolution: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per image: (orig_h, orig_w, crop_y, crop_x, target_h, target_w)."""
    rows = [list(original) + list(crop) + [resolution, resolution] for original, crop in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: Any,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE in float32; with ``snr_gamma``, Min-SNR weights min(snr, gamma) / snr for epsilon targets and
    min(snr, gamma) / (snr + 1) for v-prediction (https://arxiv.org/abs/2303.09556, section 3.4)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * weights
    return loss.mean()


@dataclass
class StepContext:
    """What a training step reads besides the batch."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: Sequence[torch.nn.Module]
    noise_scheduler: Any
    weight_dtype: torch.dtype
    separate_vae: bool
    resolution: int
    noise_offset: float
    snr_gamma: float | None
    device: torch.device


def training_loss(ctx: StepContext, batch: dict[str, Any]) -> torch.Tensor:
    """Forward pass of one batch to its (scalar) loss."""
    # The model's own VAE runs in float32 (SDXL's overflows in fp16); a separate one in weight_dtype.
    pixel_values = batch["pixel_values"].to(ctx.device, dtype=ctx.weight_dtype if ctx.separate_vae else torch.float32)
    with torch.no_grad():
        model_input = ctx.vae.encode(pixel_values).latent_dist.sample()
    model_input = model_input * ctx.vae.config.scaling_factor
    model_input = model_input.to(ctx.weight_dtype)

    noise = torch.randn_like(model_input)
    if ctx.noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += ctx.noise_offset * torch.randn((model_input.shape[0], model_input.shape[1], 1, 1), device=model_input.device)
    bsz = model_input.shape[0]
    timesteps = torch.randint(0, ctx.noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device).long()
    noisy_model_input = ctx.noise_scheduler.add_noise(model_input, noise, timesteps)

    add_time_ids = compute_time_ids(
        batch["original_sizes"], batch["crop_top_lefts"], ctx.resolution, ctx.device, ctx.weight_dtype
    )
    prompt_embeds, pooled_prompt_embeds = encode_prompt(ctx.text_encoders, [batch["input_ids_one"], batch["input_ids_two"]])
    model_pred = ctx.unet(
        noisy_model_input,
        timesteps,
        prompt_embeds,
        added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds},
        return_dict=False,
    )[0]

    prediction_type = ctx.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = ctx.noise_scheduler.get_velocity(model_input, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {prediction_type}")
    return diffusion_loss(model_pred, target, timesteps, ctx.noise_scheduler, ctx.snr_gamma)


# ----------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-<step>`` directories in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return sorted(names, key=lambda name: int(name.split("-")[1]))


def save_checkpoint(accelerator: Any, output_dir: str, global_step: int, total_limit: int | None) -> str:
    """``accelerator.save_state`` to ``checkpoint-<step>``, first pruning so at most ``total_limit`` remain."""
    if total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        if len(checkpoints) >= total_limit:
            removing = checkpoints[: len(checkpoints) - total_limit + 1]
            logger.info(f"{len(checkpoints)} checkpoints already exist, removing {len(removing)} checkpoints")
            logger.info(f"removing checkpoints: {', '.join(removing)}")
            for name in removing:
                shutil.rmtree(os.path.join(output_dir, name))
    path = os.path.join(output_dir, f"checkpoint-{global_step}")
    accelerator.save_state(path)
    logger.info(f"Saved state to {path}")
    return path


def resume(accelerator: Any, args: argparse.Namespace, num_update_steps_per_epoch: int) -> tuple[int, int]:
    """(global step, first epoch) after ``--resume_from_checkpoint`` (a path or ``latest``), as diffusers."""
    if not args.resume_from_checkpoint:
        return 0, 0
    if args.resume_from_checkpoint != "latest":
        path = os.path.basename(args.resume_from_checkpoint.rstrip("/"))
    else:
        checkpoints = list_checkpoints(args.output_dir)
        path = checkpoints[-1] if checkpoints else None
    if path is None or not os.path.isdir(os.path.join(args.output_dir, path)):
        accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
        args.resume_from_checkpoint = None
        return 0, 0
    accelerator.print(f"Resuming from checkpoint {path}")
    accelerator.load_state(os.path.join(args.output_dir, path))
    global_step = int(path.split("-")[1])
    return global_step, global_step // num_update_steps_per_epoch


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    max_train_steps: int
    num_train_epochs: int
    first_epoch: int
    initial_global_step: int
    images_per_micro_step: int  # per-device batch x number of devices
    train_batch_size: int
    max_grad_norm: float
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    output_dir: str
    debug_loss: bool = False


def _timed(iterable: Iterable[Any]) -> Iterable[tuple[Any, float]]:
    """Yield (item, seconds spent producing it): the data-loading share of each step."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item, time.perf_counter() - start


def train_loop(
    accelerator: Any,
    config: LoopConfig,
    step_ctx: StepContext,
    trainable_modules: Sequence[torch.nn.Module],
    optimizer: Any,
    lr_scheduler: Any,
    dataloader: Any,
    params_to_clip: list[torch.nn.Parameter],
    progress_bar: Any,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainingHistory:
    """Run epochs ``first_epoch..num_train_epochs`` until ``max_train_steps`` optimizer steps.

    Returns one :class:`StepRecord` per optimizer step. ``on_epoch_end(epoch)`` runs validation.
    """
    from accelerate.utils import DistributedType

    history = TrainingHistory()
    global_step = config.initial_global_step
    accumulate_target = trainable_modules[0]
    for epoch in range(config.first_epoch, config.num_train_epochs):
        for module in trainable_modules:
            module.train()
        train_loss = 0.0
        step_time = data_time = 0.0
        micro_steps = 0
        step_start = time.perf_counter()
        for batch, waited in _timed(dataloader):
            data_time += waited
            micro_steps += 1
            with accelerator.accumulate(accumulate_target):
                loss = training_loss(step_ctx, batch)
                if config.debug_loss and "filenames" in batch:
                    for name in batch["filenames"]:
                        accelerator.log({"loss_for_" + name: loss}, step=global_step)
                # Gather the losses across all processes for logging (if we use distributed training).
                avg_loss = accelerator.gather(loss.repeat(config.train_batch_size)).mean()
                train_loss += avg_loss.item() / accelerator.gradient_accumulation_steps

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_clip, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                # .item() above synchronised the device, so the wall clock covers the whole step.
                now = time.perf_counter()
                step_time = now - step_start
                global_step += 1
                lr = lr_scheduler.get_last_lr()[0]
                record = StepRecord(
                    step=global_step,
                    loss=train_loss,
                    lr=lr,
                    images=config.images_per_micro_step * micro_steps,
                    step_time=step_time,
                    data_time=data_time,
                )
                history.add(record)
                progress_bar.update(1)
                accelerator.log(
                    {"train_loss": train_loss, "lr": lr, "images_per_sec": record.images / max(step_time, 1e-9)},
                    step=global_step,
                )
                train_loss = 0.0
                data_time = 0.0
                micro_steps = 0
                step_start = now

                # DeepSpeed needs every process to save; otherwise only the main one writes.
                if accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.is_main_process:
                    if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                        save_checkpoint(accelerator, config.output_dir, global_step, config.checkpoints_total_limit)

            progress_bar.set_postfix(
                step_loss=f"{loss.detach().item():.4f}",
                lr=lr_scheduler.get_last_lr()[0],
                images_per_sec=f"{history.records[-1].images / max(history.records[-1].step_time, 1e-9):.2f}"
                if history.records
                else "-",
            )
            if global_step >= config.max_train_steps:
                break

        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if global_step >= config.max_train_steps:
            break
    return history


def num_update_steps(dataloader_len: int, gradient_accumulation_steps: int) -> int:
    return math.ceil(dataloader_len / gradient_accumulation_steps)
