"""Validation images: generated with the pipeline being trained (every ``--validation_epochs``) and, after
training, with the base pipeline plus the saved LoRA file; saved as PNGs and logged to the trackers."""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer import models
from trainer.sampling import isolated_global_rngs

logger = logging.getLogger(__name__)


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "prompt"


def generate_images(
    pipeline: Any,
    prompts: Sequence[str],
    num_images: int,
    device: torch.device,
    seed: int | None,
    num_inference_steps: int | None,
    autocast_dtype: torch.dtype | None,
) -> list[tuple[str, Any]]:
    """``num_images`` images per prompt as (prompt, PIL image).

    One generator seeded with ``seed`` serves all images (as diffusers), so runs are comparable. Autocast
    is used only under mixed precision: diffusers autocasts always, which on CPU means bfloat16 even for
    an fp32 run.
    """
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    kwargs: dict[str, Any] = {}
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    use_autocast = autocast_dtype is not None and not torch.backends.mps.is_available()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if use_autocast else contextlib.nullcontext()
    images = []
    with autocast, torch.no_grad():
        for prompt in prompts:
            for _ in range(num_images):
                images.append((prompt, pipeline(prompt=prompt, generator=generator, **kwargs).images[0]))
    return images


def save_and_log(
    images: list[tuple[str, Any]],
    directory: Path,
    accelerator: Any,
    step: int,
    phase: str,
) -> list[Path]:
    """Write ``images`` as ``<directory>/<index>_<prompt>.png`` and log them to TensorBoard / wandb."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (prompt, image) in enumerate(images):
        path = directory / f"{index:02d}_{_slug(prompt)}.png"
        image.save(path)
        paths.append(path)
    if not images:
        return paths
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            np_images = np.stack([np.asarray(image) for _, image in images])
            tracker.writer.add_images(phase, np_images, step, dataformats="NHWC")
            for index, (prompt, _) in enumerate(images):
                tracker.writer.add_text(f"{phase}_prompts", f"{index}: {prompt}", step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({phase: [wandb.Image(image, caption=f"{i}: {prompt}") for i, (prompt, image) in enumerate(images)]})
    return paths


def _autocast_dtype(weight_dtype: torch.dtype) -> torch.dtype | None:
    return weight_dtype if weight_dtype != torch.float32 else None


class Validator:
    """Images from the pipeline being trained, after epochs ``epoch % --validation_epochs == 0``.

    Main process only; the global RNGs are forked around it (CPU and the accelerator's), so a resumed
    run's training draws stay identical whether or not validation ran in between.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        accelerator: Any,
        components: models.SDXLComponents,
        unwrap: Callable[[Any], Any],
        unet: torch.nn.Module,
        text_encoders: Sequence[torch.nn.Module],
    ) -> None:
        self.args, self.accelerator, self.components, self.unwrap = args, accelerator, components, unwrap
        # The (wrapped) models being trained; the recipe drops them after training (see sdxl_lora._teardown).
        self.unet: torch.nn.Module | None = unet
        self.text_encoders: list[torch.nn.Module] = list(text_encoders)
        self.paths: list[str] = []

    def __call__(self, epoch: int) -> None:
        args = self.args
        if not (self.accelerator.is_main_process and args.all_validation_prompts and epoch % args.validation_epochs == 0):
            return
        with isolated_global_rngs():
            self._run(epoch)

    def _run(self, epoch: int) -> None:
        from diffusers import StableDiffusionXLPipeline  # diffusers is heavy: loaded when first needed

        args, components = self.args, self.components
        logger.info(
            f"Running validation... Generating {args.num_validation_images} images with prompts: {args.all_validation_prompts}."
        )
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            vae=components.vae,
            text_encoder=self.unwrap(self.text_encoders[0]),
            text_encoder_2=self.unwrap(self.text_encoders[1]),
            unet=self.unwrap(self.unet),
            revision=args.revision,
            variant=args.variant,
            **models.pipeline_dtype_kwargs(components.weight_dtype),
        )
        images = generate_images(
            pipeline,
            args.all_validation_prompts,
            args.num_validation_images,
            self.accelerator.device,
            args.seed,
            args.validation_inference_steps,
            _autocast_dtype(components.weight_dtype),
        )
        directory = Path(args.output_dir, "validation", f"epoch_{epoch:03d}")
        self.paths.extend(str(p) for p in save_and_log(images, directory, self.accelerator, epoch, "validation"))
        del pipeline


def final_inference(
    args: argparse.Namespace, accelerator: Any, components: models.SDXLComponents, output_dir: Path
) -> list[str]:
    """Reload the base pipeline, load the saved LoRA file into it and render the validation prompts."""
    if not (args.all_validation_prompts and args.num_validation_images > 0):
        return []
    import diffusers  # heavy: loaded when first needed
    from diffusers import StableDiffusionXLPipeline

    if accelerator.mixed_precision == "fp16":
        components.vae.to(components.weight_dtype)  # the pipeline decodes in the UNet's dtype
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        vae=components.vae,
        revision=args.revision,
        variant=args.variant,
        **models.pipeline_dtype_kwargs(components.weight_dtype),
    )
    # Without text-encoder LoRA diffusers warns once per encoder that it found none: expected here.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        models.load_lora_into_pipeline(pipeline, str(output_dir))
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if args.kernels == "on":  # the whole pipeline: UNet and VAE (the text encoders have nothing to swap)
        import npu_kernels

        logger.info(str(npu_kernels.optimize(pipeline, geglu_approximate=getattr(args, "geglu_approximate", "none"))))
    images = generate_images(
        pipeline,
        args.all_validation_prompts,
        args.num_validation_images,
        accelerator.device,
        args.seed,
        args.validation_inference_steps,
        _autocast_dtype(components.weight_dtype),
    )
    step = args.max_train_steps
    return [str(p) for p in save_and_log(images, output_dir / "validation" / "final", accelerator, step, "test")]
