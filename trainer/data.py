"""Training data: loading (hub name, local directory, imagefolder), SDXL preprocessing and batching.

Preprocessing reproduces diffusers' ``train_text_to_image_lora_sdxl.py`` transform by transform, with
PIL and torch instead of torchvision (whose builds are tied to one torch build):

* ``original_size`` is recorded as (height, width) before anything else;
* resize of the shorter side to ``--resolution`` (``--image_interpolation_mode``, default lanczos: torchvision's
  filter for PIL images and its output-size rounding);
  with ``--enable_bucket`` (:mod:`trainer.buckets`) instead a resize (same filter) that just covers the image's bucket;
* random horizontal flip *before* the crop (current diffusers; older versions flipped after it);
* center crop or random crop (``torch.randint`` exactly as ``RandomCrop.get_params``) to the
  ``--resolution`` square or the bucket, whose top-left (y, x) becomes ``crops_coords_top_left`` and
  whose size becomes ``target_size`` in the UNet's time ids;
* ``ToTensor`` + ``Normalize([0.5], [0.5])``, i.e. pixels in [-1, 1];
* captions tokenized by both tokenizers (a random caption when a row holds several).

Images are decoded here rather than by ``datasets`` so that a corrupt or truncated file is one skipped
row (``--on_bad_image skip``, counted in the summary) or a one-line error naming it
(``--on_bad_image fail``) instead of a traceback from inside the DataLoader; and so that every PIL mode
becomes the right RGB (:func:`to_rgb`: 16-bit scaled, transparency composited on white).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from trainer.args import DATASET_NAME_MAPPING
from trainer.buckets import BucketAssignment, BucketGrid
from trainer.errors import InputError

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
        if os.path.isdir(dataset_name) and not has_data_files(dataset_name):
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


def has_data_files(directory: str) -> bool:
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


#: ``--image_interpolation_mode`` -> PIL resampling filter: torchvision's ``pil_modes_mapping``, what its
#: ``Resize`` passes to ``PIL.Image.resize`` for a PIL image (as in diffusers' script). PIL has no exact
#: nearest, so torchvision maps ``nearest_exact`` to PIL's nearest too.
PIL_RESAMPLING = {
    "nearest": 0, "nearest_exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
}  # fmt: skip


def resize_shorter_side(image: Any, size: int, interpolation: str = "lanczos") -> Any:
    """``torchvision.transforms.Resize(size, interpolation)`` on a PIL image: shorter side to ``size``, the
    longer one scaled and truncated to int, as torchvision computes it; ``interpolation`` is one of
    :data:`PIL_RESAMPLING` (``--image_interpolation_mode``, default lanczos as diffusers')."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize((new_w, new_h), PIL_RESAMPLING[interpolation])


def resize_to_cover(image: Any, height: int, width: int, interpolation: str = "lanczos") -> Any:
    """Resize keeping the aspect ratio to the smallest size that covers ``height`` x ``width`` (one side
    equal, the other at least as long, rounded as kohya's bucketing rounds): the crop then removes as
    little as possible."""

    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, int(image.width * scale + 0.5)), max(height, int(image.height * scale + 0.5))
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), PIL_RESAMPLING[interpolation])


def to_normalized_tensor(image: Any) -> torch.Tensor:
    """``ToTensor`` + ``Normalize([0.5], [0.5])``: CHW float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(0.5).div_(0.5)


# ----------------------------------------------------------------------------- image decoding
#: Row number in the loaded dataset, added before ``--max_train_samples`` shuffles, so a bad image is
#: reported by the row it has in the user's files.
ROW_COLUMN = "__row__"
#: Per example: why its image could not be used (None when it could).
BAD_IMAGE_KEY = "bad_image"
#: Per example / per batch: the bad images that were skipped to produce it.
SKIPPED_KEY = "skipped_images"
#: Where transparent pixels end up: white, the background of most product shots and drawings.
TRANSPARENT_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(Exception):
    """An image that cannot be decoded or converted; the message says why, in one line."""


def decode_image(value: Any) -> Any:
    """A PIL image from what a dataset row holds: a decoded image, ``{"bytes", "path"}``, a path or bytes.

    Decoding is ``datasets.Image().decode_example`` (the same file access, ``load()`` and EXIF rotation
    as when ``datasets`` decodes), but its failures become :class:`BadImageError`.
    """
    from PIL import Image as PILImage

    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    elif isinstance(value, (bytes, bytearray)):
        value = {"path": None, "bytes": bytes(value)}
    elif value is None:
        raise BadImageError("no image (the value is missing)")
    elif not isinstance(value, dict):
        raise BadImageError(f"not an image: a {type(value).__name__}")
    if value.get("path") is None and value.get("bytes") is None:
        raise BadImageError("no image (neither bytes nor a path)")
    import datasets

    try:
        return datasets.Image().decode_example(value)
    except (OSError, SyntaxError, ValueError, EOFError, PILImage.DecompressionBombError) as error:
        # PIL signals corrupt data with any of these (truncated: OSError; broken PNG chunks: SyntaxError).
        raise BadImageError(_image_error_text(error)) from None


def image_size(value: Any) -> tuple[int, int]:
    """(height, width) of the image a row holds, as :func:`decode_image` would decode it (EXIF rotation
    included), from the file's header where it can: bucketing needs every image's size before training."""
    from PIL import Image as PILImage

    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    elif isinstance(value, (bytes, bytearray)):
        value = {"path": None, "bytes": bytes(value)}
    if not isinstance(value, dict) or (value.get("bytes") is None and not os.path.isfile(value.get("path") or "")):
        image = decode_image(value)  # a decoded or remote image, or nothing: decode_image has it or says why
        return image.height, image.width
    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    try:
        with PILImage.open(source) as image:
            width, height = image.size
            rotated = image.getexif().get(PILImage.ExifTags.Base.Orientation) in (5, 6, 7, 8)  # 90 degrees
    except (OSError, SyntaxError, ValueError, EOFError, PILImage.DecompressionBombError) as error:
        raise BadImageError(_image_error_text(error)) from None
    return (width, height) if rotated else (height, width)


def _image_error_text(error: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image PIL can read (unknown format or corrupt header)"  # PIL's text names a BytesIO
    if isinstance(error, FileNotFoundError):
        return "file not found"
    text = " ".join(str(error).split()) or type(error).__name__
    # PNG says "image file is truncated", JPEG "Truncated File Read": one wording for both.
    return "image file is truncated" if "truncated" in text.lower() else text


def image_filename(image: Any) -> str | None:
    """The base name of the file PIL read ``image`` from (None for images decoded from bytes)."""
    return os.path.basename(getattr(image, "filename", "") or "") or None


def to_rgb(image: Any) -> Any:
    """8-bit RGB from any PIL mode, without the surprises of ``image.convert("RGB")``:

    * 16-bit (``I;16*``, and 32-bit ``I`` read as 16-bit range) is scaled to 8 bits (65535 -> 255);
      ``convert`` clips every value above 255 to white;
    * transparency (RGBA, LA, palette or grey with a transparent colour) is composited on
      :data:`TRANSPARENT_BACKGROUND`; ``convert`` keeps whatever colour the transparent pixels hide;
    * everything else (L, 1, P, CMYK, YCbCr, ...) is PIL's own conversion.
    """
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _scale_sixteen_bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode PIL cannot convert (e.g. LAB)
        raise BadImageError(f"cannot convert mode {image.mode} to RGB ({error})") from None


def _scale_sixteen_bit(image: Any) -> Any:
    """16-bit grey to 8-bit grey: v / 257 rounded, so 0 -> 0, 257 -> 1 and 65535 -> 255."""
    from PIL import Image as PILImage

    values = np.asarray(image).astype(np.float64)
    return PILImage.fromarray(np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def describe_row(source: str, row: int | None, value: Any) -> str:
    """How a warning or error names an image: dataset, row and file when the row has one."""
    where = f"{source}: row {row}" if row is not None else source
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"{where} ({path})" if path else where


_UPSCALE_WARNED: set[str] = set()  # datasets warned about (per process: each dataloader worker says it once)


def warn_upscaled_once(size: tuple[int, int], resolution: int, source: str) -> None:
    """An image smaller than ``--resolution`` is upscaled (blurrier training data): said once per dataset."""
    if source in _UPSCALE_WARNED:
        return
    _UPSCALE_WARNED.add(source)
    logger.warning(
        f"{source}: images smaller than --resolution {resolution} (e.g. {size[1]}x{size[0]}) are upscaled to it;"
        " train at a lower --resolution to use them as they are (said once)"
    )


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
    source: str = "dataset"  # names the dataset in bad-image and caption messages
    interpolation: str = "lanczos"  # --image_interpolation_mode
    buckets: BucketGrid | None = None  # --enable_bucket: each image trains at its bucket's size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is trained at: its bucket, else the ``--resolution`` square."""
        return self.buckets.target_size(height, width) if self.buckets is not None else (self.resolution, self.resolution)

    def crop_params(self, height: int, width: int, target: tuple[int, int] | None = None) -> tuple[int, int]:
        """Top-left (y, x) of the ``target`` (height, width) crop (default: the ``--resolution`` square);
        torch RNG for random crops as ``RandomCrop.get_params``."""
        size_h, size_w = target or (self.resolution, self.resolution)
        if self.center_crop:
            return max(0, int(round((height - size_h) / 2.0))), max(0, int(round((width - size_w) / 2.0)))
        if height == size_h and width == size_w:
            return 0, 0
        y1 = int(torch.randint(0, max(height - size_h, 0) + 1, size=(1,)).item())
        x1 = int(torch.randint(0, max(width - size_w, 0) + 1, size=(1,)).item())
        return y1, x1

    def transform_image(self, image: Any, flip: bool | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(pixel values, original size (h, w), crop top-left (y, x)) for one PIL image.

        ``flip``: None draws it (``--random_flip``); True/False fixes it (trainer.caching caches both).
        """
        from PIL import Image

        image = to_rgb(image)
        original_size = (image.height, image.width)
        target_h, target_w = self.target_size(*original_size)
        if original_size[0] < target_h or original_size[1] < target_w:
            warn_upscaled_once(original_size, self.resolution, self.source)
        if self.buckets is None:
            image = resize_shorter_side(image, self.resolution, self.interpolation)
        else:
            image = resize_to_cover(image, target_h, target_w, self.interpolation)
        if (self.random_flip and random.random() < 0.5) if flip is None else flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        y1, x1 = self.crop_params(image.height, image.width, (target_h, target_w))
        # PIL pads out-of-range crops with zeros, as torchvision's crop does.
        image = image.crop((x1, y1, x1 + target_w, y1 + target_h))
        return to_normalized_tensor(image), original_size, (y1, x1)

    def captions(self, raw: Sequence[Any], is_train: bool = True, rows: Sequence[int] | None = None) -> list[str]:
        """One caption per example: see :func:`pick_caption`. ``rows`` name the rows in errors."""
        rows = list(rows) if rows is not None else [None] * len(raw)
        return [
            pick_caption(caption, is_train, f"{describe_row(self.source, row, None)}: caption column '{self.caption_column}'")
            for caption, row in zip(raw, rows)
        ]

    def __call__(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = examples.get(ROW_COLUMN) or [None] * len(examples[self.image_column])
        pixel_values, original_sizes, crop_top_lefts, bad_images, names = [], [], [], [], []
        for value, row in zip(examples[self.image_column], rows):
            # A bad image is not raised here: BadImageGuard decides (skip: another row, fail: stop).
            try:
                image = decode_image(value)
                pixels, original_size, crop_top_left = self.transform_image(image)
            except BadImageError as error:
                pixels = original_size = crop_top_left = None
                bad_images.append(f"{describe_row(self.source, row, value)}: {error}")
                names.append(None)
            else:
                bad_images.append(None)
                names.append(image_filename(image))
            pixel_values.append(pixels)
            original_sizes.append(original_size)
            crop_top_lefts.append(crop_top_left)
        examples["original_sizes"] = original_sizes
        examples["crop_top_lefts"] = crop_top_lefts
        examples["target_sizes"] = [None if p is None else tuple(p.shape[1:]) for p in pixel_values]
        examples["pixel_values"] = pixel_values
        examples[BAD_IMAGE_KEY] = bad_images
        captions = self.captions(examples[self.caption_column], rows=rows)
        examples["input_ids_one"] = tokenize_prompt(self.tokenizer_one, captions)
        examples["input_ids_two"] = tokenize_prompt(self.tokenizer_two, captions)
        if self.debug_loss and names and all(names):  # only when every image came from a named file
            examples["filenames"] = names
        return examples


def pick_caption(caption: Any, is_train: bool, where: str) -> str:
    """The caption of one example, as diffusers picks it, with one-line errors for what it cannot use.

    * a string, the empty string included (the image then trains unconditionally, like SDXL's "");
    * a non-empty list of strings: ``random.choice`` while training (diffusers), the first otherwise;
    * None, an empty list or anything else: :class:`~trainer.errors.InputError` naming the row.
      (Preflight refuses such datasets before training; this guards data that bypassed it.)
    """
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)):
        if len(caption) == 0:
            raise InputError(f"{where} is an empty list; give it at least one caption")
        choice = random.choice(caption) if is_train else caption[0]
        if isinstance(choice, str):
            return choice
    if caption is None:
        raise InputError(f'{where} is missing (None); give it a caption ("" trains it unconditionally)')
    # diffusers' wording, which scripts may already match on
    raise InputError(f"{where} should contain either strings or lists of strings, not {type(caption).__name__}")


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of preprocessed examples into one batch (sizes and crops stay lists of tuples)."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    batch: dict[str, Any] = {
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "input_ids_one": torch.stack([example["input_ids_one"] for example in examples]),
        "input_ids_two": torch.stack([example["input_ids_two"] for example in examples]),
        "original_sizes": [tuple(example["original_sizes"]) for example in examples],
        "crop_top_lefts": [tuple(example["crop_top_lefts"]) for example in examples],
        "target_sizes": [tuple(example["target_sizes"]) for example in examples],
    }
    filenames = [example["filenames"] for example in examples if "filenames" in example]
    if filenames:
        batch["filenames"] = filenames
    # Bad images skipped to fill this batch: the batch carries them to the main process (DataLoader
    # workers cannot report otherwise), where SkippedImages counts them.
    skipped = [problem for example in examples for problem in example.get(SKIPPED_KEY) or ()]
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch


class BadImageGuard(torch.utils.data.Dataset):
    """The training dataset with ``--on_bad_image`` applied to rows whose image cannot be used.

    ``skip``: the row is replaced by the next usable one (so batches keep their size and every device
    keeps the same number of steps) and the example lists what it replaced under :data:`SKIPPED_KEY`.
    ``fail``: :class:`~trainer.errors.InputError` naming the dataset, row and file.

    ``buckets`` (``--enable_bucket``): which bucket each row trains in; a bad row's stand-in is then the
    next row of its bucket, so that the batch keeps one image size.
    """

    def __init__(self, dataset: Any, on_bad_image: str, source: str, buckets: BucketAssignment | None = None) -> None:
        self.dataset = dataset
        self.on_bad_image = on_bad_image
        self.source = source
        self.buckets = buckets

    def stand_in(self, index: int) -> int:
        """The row that replaces the unusable row ``index`` (deterministic)."""
        return self.buckets.stand_in(index) if self.buckets is not None else (index + 1) % len(self)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._usable(index, self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        # One transform call for the whole batch, as datasets' own __getitems__ (what DataLoader uses).
        rows = self.dataset.__getitems__(list(indices))
        return [self._usable(index, row) for index, row in zip(indices, rows)]

    def _usable(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        skipped: list[str] = []
        while example.get(BAD_IMAGE_KEY):
            problem = example[BAD_IMAGE_KEY]
            if self.on_bad_image == "fail":
                raise InputError(f"{problem} (--on_bad_image fail; use skip to train without it)")
            skipped.append(problem)
            if len(skipped) >= len(self):
                raise InputError(f"{self.source}: no image in its {len(self)} rows can be read (last: {problem})")
            index = self.stand_in(index)
            example = self.dataset[index]
        example[SKIPPED_KEY] = skipped
        return example


class SkippedImages:
    """The distinct bad images skipped during the run (main process), each warned about once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._seen: set[str] = set()

    def record(self, batch: dict[str, Any]) -> None:
        """Take :data:`SKIPPED_KEY` out of a batch; a row skipped again in a later epoch counts once."""
        for problem in batch.pop(SKIPPED_KEY, None) or ():
            if problem not in self._seen:
                self._seen.add(problem)
                self.problems.append(problem)
                logger.warning(f"skipped unreadable image: {problem}")

    def __len__(self) -> int:
        return len(self.problems)


def build_train_dataset(
    args: argparse.Namespace, tokenizer_one: Any, tokenizer_two: Any, main_process_first: Any, loaded: Any = None
) -> Any:
    """Load (unless ``loaded``: the dataset preflight already loaded), optionally truncate
    (``--max_train_samples``) and attach the SDXL transform.

    ``main_process_first`` is ``accelerator.main_process_first``: with several processes only one
    downloads/converts the dataset at a time.
    """
    with main_process_first():
        dataset = loaded
        if dataset is None:
            dataset = load_train_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
        image_column, caption_column = resolve_columns(dataset.column_names, args)
        dataset = undecoded_with_rows(dataset, image_column)
        if args.max_train_samples is not None:
            dataset = dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty.")
        source = str(args.dataset_name if args.dataset_name is not None else args.train_data_dir)
        preprocess = SDXLPreprocessor(
            tokenizer_one=tokenizer_one,
            tokenizer_two=tokenizer_two,
            image_column=image_column,
            caption_column=caption_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            debug_loss=args.debug_loss,
            source=source,
            interpolation=getattr(args, "image_interpolation_mode", "lanczos"),
            buckets=BucketGrid.from_args(args) if getattr(args, "enable_bucket", False) else None,
        )
        # getattr: callers that build their Namespace by hand predate --on_bad_image.
        on_bad_image = getattr(args, "on_bad_image", "skip")
        assignment = assign_buckets(dataset, image_column, preprocess.buckets, on_bad_image, source) if preprocess.buckets else None
        return BadImageGuard(dataset.with_transform(preprocess, output_all_columns=True), on_bad_image, source, assignment)


def assign_buckets(dataset: Any, image_column: str, grid: BucketGrid, on_bad_image: str, source: str) -> BucketAssignment:
    """Every row's bucket, from its image's size (file headers, no decoding). A row whose size cannot be
    read trains in no bucket (``--on_bad_image skip``: reported with the skipped images) or stops the
    run (``fail``)."""
    sizes: list[tuple[int, int] | None] = []
    unreadable: list[str] = []
    for start in range(0, len(dataset), 256):  # a chunk at a time: the column holds the encoded images
        chunk = dataset[start : start + 256]
        for value, row in zip(chunk[image_column], chunk[ROW_COLUMN]):
            try:
                sizes.append(image_size(value))
            except BadImageError as error:
                problem = f"{describe_row(source, row, value)}: {error}"
                if on_bad_image == "fail":
                    raise InputError(f"{problem} (--on_bad_image fail; use skip to train without it)") from None
                sizes.append(None)
                unreadable.append(problem)
    return BucketAssignment.of_sizes(grid, sizes, unreadable)


def undecoded_with_rows(dataset: Any, image_column: str) -> Any:
    """The dataset with images left encoded (SDXLPreprocessor decodes them, see :func:`decode_image`)
    and a :data:`ROW_COLUMN` holding each row's number, for messages about bad images."""
    from datasets import Image

    if isinstance(dataset.features[image_column], Image):
        dataset = dataset.cast_column(image_column, Image(decode=False))  # metadata only: no data rewritten
    return dataset.add_column(ROW_COLUMN, np.arange(len(dataset), dtype=np.int64))
