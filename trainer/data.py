"""Training data: loading (hub name, local directory, imagefolder), SDXL preprocessing and batching.

Preprocessing reproduces diffusers' ``train_text_to_image_lora_sdxl.py`` transform by transform, with
PIL and torch instead of torchvision (whose builds are tied to one torch build):

* ``original_size`` is recorded as (height, width) before anything else;
* resize of the shorter side to ``--resolution`` (bilinear, torchvision's output-size rounding);
* random horizontal flip *before* the crop (current diffusers; older versions flipped after it);
* center crop or random crop (``torch.randint`` exactly as ``RandomCrop.get_params``), whose
  top-left (y, x) becomes ``crops_coords_top_left`` in the UNet's time ids;
* ``ToTensor`` + ``Normalize([0.5], [0.5])``, i.e. pixels in [-1, 1];
* captions tokenized by both tokenizers (a random caption when a row holds several).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from trainer.args import DATASET_NAME_MAPPING

logger = logging.getLogger(__name__)


def load_train_dataset(
    dataset_name: str | None,
    train_data_dir: str | None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
) -> Any:
    """The ``train`` split, loaded as diffusers does.

    ``dataset_name`` may be a hub id or a local directory (e.g. Ascend's pokemon layout: ``README.MD``,
    ``dataset_infos.json``, ``data/*.parquet``); otherwise ``train_data_dir`` is read as an imagefolder
    (images plus ``metadata.jsonl`` with the captions).
    """
    from datasets import load_dataset
    from datasets.exceptions import NonMatchingSplitsSizesError

    if dataset_name is not None:
        if os.path.isdir(dataset_name) and not _has_data_files(dataset_name):
            raise FileNotFoundError(
                f"--dataset_name {dataset_name!r} is a directory without data files: expected e.g."
                " data/*.parquet (Ascend's layout) or images with a metadata.jsonl."
            )
        try:
            dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
        except NonMatchingSplitsSizesError as error:
            # A local copy whose dataset_infos.json (e.g. pokemon's "833 rows") disagrees with its parquet
            # files: train on what is there, but say so loudly.
            logger.warning(
                f"{dataset_name}: dataset_infos.json does not match the data files ({error}); loading the"
                " files as they are. Fix or delete dataset_infos.json to silence this."
            )
            dataset = load_dataset(
                dataset_name,
                dataset_config_name,
                cache_dir=cache_dir,
                data_dir=train_data_dir,
                verification_mode="no_checks",
            )
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} is not a directory.")
        # Same call as diffusers: every file below the folder, matched to its row of metadata.jsonl.
        dataset = load_dataset(
            "imagefolder", data_files={"train": os.path.join(train_data_dir, "**")}, cache_dir=cache_dir
        )
    else:
        raise ValueError("Need either a dataset name or a training folder.")
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (splits: {', '.join(dataset)}).")
    return dataset["train"]


def _has_data_files(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(not name.startswith(".") and not name.lower().endswith((".md", ".json")) for name in files):
            return True
    return False


def resolve_columns(column_names: Sequence[str], args: argparse.Namespace) -> tuple[str, str]:
    """(image column, caption column), validated against the dataset as in diffusers."""
    mapped = DATASET_NAME_MAPPING.get(args.dataset_name or "", None)
    columns = []
    for flag, index in (("image_column", 0), ("caption_column", 1)):
        value = getattr(args, flag)
        if value is None:
            value = mapped[index] if mapped is not None else column_names[index]
        elif value not in column_names:
            raise ValueError(f"--{flag}' value '{value}' needs to be one of: {', '.join(column_names)}")
        columns.append(value)
    return columns[0], columns[1]


def tokenize_prompt(tokenizer: Any, prompt: str | list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's ``model_max_length`` (77 for CLIP)."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def resize_shorter_side(image: Any, size: int) -> Any:
    """``torchvision.transforms.Resize(size, BILINEAR)`` on a PIL image: shorter side to ``size``, the
    longer one scaled and truncated to int, as torchvision computes it."""
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BILINEAR)


def to_normalized_tensor(image: Any) -> torch.Tensor:
    """``ToTensor`` + ``Normalize([0.5], [0.5])``: CHW float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(0.5).div_(0.5)


@dataclass
class SDXLPreprocessor:
    """The per-example transform installed with ``Dataset.with_transform`` (applied lazily per batch)."""

    tokenizer_one: Any
    tokenizer_two: Any
    image_column: str
    caption_column: str
    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    debug_loss: bool = False

    def crop_params(self, height: int, width: int) -> tuple[int, int]:
        """Top-left (y, x) of the crop; torch RNG for random crops as ``RandomCrop.get_params``."""
        size = self.resolution
        if self.center_crop:
            return max(0, int(round((height - size) / 2.0))), max(0, int(round((width - size) / 2.0)))
        if height == size and width == size:
            return 0, 0
        y1 = int(torch.randint(0, max(height - size, 0) + 1, size=(1,)).item())
        x1 = int(torch.randint(0, max(width - size, 0) + 1, size=(1,)).item())
        return y1, x1

    def transform_image(self, image: Any) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(pixel values, original size (h, w), crop top-left (y, x)) for one PIL image."""
        from PIL import Image

        image = image.convert("RGB")
        original_size = (image.height, image.width)
        image = resize_shorter_side(image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        y1, x1 = self.crop_params(image.height, image.width)
        # PIL pads out-of-range crops with zeros, as torchvision's crop does.
        image = image.crop((x1, y1, x1 + self.resolution, y1 + self.resolution))
        return to_normalized_tensor(image), original_size, (y1, x1)

    def captions(self, raw: Sequence[Any], is_train: bool = True) -> list[str]:
        captions = []
        for caption in raw:
            if isinstance(caption, str):
                captions.append(caption)
            elif isinstance(caption, (list, np.ndarray)):
                # take a random caption if there are multiple
                captions.append(random.choice(caption) if is_train else caption[0])
            else:
                raise ValueError(
                    f"Caption column `{self.caption_column}` should contain either strings or lists of strings."
                )
        return captions

    def __call__(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pixel_values, original_sizes, crop_top_lefts = [], [], []
        for image in examples[self.image_column]:
            pixels, original_size, crop_top_left = self.transform_image(image)
            pixel_values.append(pixels)
            original_sizes.append(original_size)
            crop_top_lefts.append(crop_top_left)
        examples["original_sizes"] = original_sizes
        examples["crop_top_lefts"] = crop_top_lefts
        examples["pixel_values"] = pixel_values
        captions = self.captions(examples[self.caption_column])
        examples["input_ids_one"] = tokenize_prompt(self.tokenizer_one, captions)
        examples["input_ids_two"] = tokenize_prompt(self.tokenizer_two, captions)
        if self.debug_loss:
            names = [os.path.basename(image.filename) for image in examples[self.image_column] if getattr(image, "filename", None)]
            if names:
                examples["filenames"] = names
        return examples


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of preprocessed examples into one batch (sizes and crops stay lists of tuples)."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    batch: dict[str, Any] = {
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "input_ids_one": torch.stack([example["input_ids_one"] for example in examples]),
        "input_ids_two": torch.stack([example["input_ids_two"] for example in examples]),
        "original_sizes": [tuple(example["original_sizes"]) for example in examples],
        "crop_top_lefts": [tuple(example["crop_top_lefts"]) for example in examples],
    }
    filenames = [example["filenames"] for example in examples if "filenames" in example]
    if filenames:
        batch["filenames"] = filenames
    return batch


def build_train_dataset(args: argparse.Namespace, tokenizer_one: Any, tokenizer_two: Any, main_process_first: Any) -> Any:
    """Load, optionally truncate (``--max_train_samples``) and attach the SDXL transform.

    ``main_process_first`` is ``accelerator.main_process_first``: with several processes only one
    downloads/converts the dataset at a time.
    """
    with main_process_first():
        dataset = load_train_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
        image_column, caption_column = resolve_columns(dataset.column_names, args)
        if args.max_train_samples is not None:
            dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty.")
        preprocess = SDXLPreprocessor(
            tokenizer_one=tokenizer_one,
            tokenizer_two=tokenizer_two,
            image_column=image_column,
            caption_column=caption_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            debug_loss=args.debug_loss,
        )
        return dataset.with_transform(preprocess, output_all_columns=True)


def build_dataloader(dataset: Any, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, shuffle=True, collate_fn=collate_fn, batch_size=batch_size, num_workers=num_workers
    )
