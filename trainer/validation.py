"""Validation images: generated with the pipeline being trained, saved as PNGs and logged to the trackers."""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

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
