"""``--cache_latents`` / ``--cache_text_embeddings``: the frozen encoders run once, before training.

Every step of diffusers' recipe VAE-encodes its images and runs both text encoders on its captions,
although neither is trained. With the caches (kohya sd-scripts' and SimpleTuner's ``cache_latents``):

* **latents**: the VAE encoder's output distribution (mean and log-variance, what
  ``latent_dist.parameters`` holds) of every image, kept on the CPU. Each step still *samples* from it
  with the same random draw as ``vae.encode(...).latent_dist.sample()``, so training is the same as
  without the cache, not trained on the distribution's mean. ``--random_flip`` is honoured by caching
  both orientations and choosing per sample with the same draw as the uncached transform. A random crop
  cannot be cached (each epoch would need another crop): an image the transform would crop randomly
  (not square, no ``--center_crop``) is refused with an error saying what to do. With
  ``--enable_bucket`` each image is encoded at its bucket's size (one encoder call per size).
* **text embeddings**: the penultimate hidden states of both encoders and the pooled embedding of every
  distinct caption (every entry of a caption list too, so the per-epoch ``random.choice`` still works),
  looked up by token ids. Refused with ``--train_text_encoder``: trained encoders change every step.

Memory: per image ``2 x 4 x (resolution/8)^2`` values (x2 with ``--random_flip``), e.g. 0.5 MiB in fp32
at 1024 px; per caption ``77 x 2048 + 1280`` values (0.3 MiB in fp16 for SDXL). With several processes
each encodes its share and all receive the whole cache (``gather_object``).
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from trainer import data
from trainer.errors import InputError
from trainer.models import encode_prompt
from trainer.sampling import isolated_global_rngs

logger = logging.getLogger(__name__)

LATENT_KEY = "latent_parameters"
PROMPT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations a cache cannot honour (before any model is loaded)."""
    if getattr(args, "cache_text_embeddings", False) and args.train_text_encoder:
        raise InputError(
            "--cache_text_embeddings cannot be combined with --train_text_encoder: the text encoders change every"
            " step, so their embeddings cannot be computed once. Drop one of the two flags."
        )


# ----------------------------------------------------------------------------- text embeddings
def ids_key(ids_one: torch.Tensor, ids_two: torch.Tensor) -> bytes:
    """Lookup key of one caption: its token ids under both tokenizers."""
    return ids_one.to(torch.int64).numpy().tobytes() + b"|" + ids_two.to(torch.int64).numpy().tobytes()


@dataclass
class TextEmbeddingCache:
    """(prompt embeds, pooled prompt embeds) per caption, on the CPU."""

    entries: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def lookup(self, ids_one: torch.Tensor, ids_two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked embeddings for a batch of token ids (rows of ``ids_one``/``ids_two``)."""
        pairs = []
        for one, two in zip(ids_one, ids_two):
            entry = self.entries.get(ids_key(one, two))
            if entry is None:
                raise KeyError("a caption that is not in the text-embedding cache (the dataset changed after caching?)")
            pairs.append(entry)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _caption_strings(raw_captions: Sequence[Any]) -> list[str]:
    """Every caption a row may train with (all entries of caption lists), sorted and distinct."""
    found: set[str] = set()
    for caption in raw_captions:
        if isinstance(caption, str):
            found.add(caption)
        elif caption is not None and not isinstance(caption, (bytes, dict)):
            found.update(c for c in caption if isinstance(c, str))
    return sorted(found)


def build_text_cache(
    raw_captions: Sequence[Any], preprocessor: Any, text_encoders: Sequence[torch.nn.Module], accelerator: Any, batch_size: int
) -> TextEmbeddingCache:
    """Encode every distinct caption once (each process a share; all receive everything)."""
    captions = _caption_strings(raw_captions)
    mine = captions[accelerator.process_index :: accelerator.num_processes]
    results: list[tuple[bytes, torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            ids_one = data.tokenize_prompt(preprocessor.tokenizer_one, chunk)
            ids_two = data.tokenize_prompt(preprocessor.tokenizer_two, chunk)
            embeds, pooled = encode_prompt(text_encoders, [ids_one, ids_two])
            for i in range(len(chunk)):
                results.append((ids_key(ids_one[i], ids_two[i]), embeds[i].cpu(), pooled[i].cpu()))
    cache = TextEmbeddingCache()
    for key, embeds, pooled in _gather(accelerator, results):
        cache.entries[key] = (embeds, pooled)
    return cache


# ----------------------------------------------------------------------------- latents
@dataclass
class LatentEntry:
    """One image: its size before resizing, and per orientation (0: as is, 1: flipped) the crop and the
    VAE encoder's distribution parameters."""

    original_size: tuple[int, int]
    crop_top_lefts: list[tuple[int, int]]
    parameters: list[torch.Tensor]
    filename: str | None = None  # the image file's name, for --debug_loss (None: not from a named file)
    target_size: tuple[int, int] | None = None  # the trained (height, width): its bucket, or the square


@dataclass
class _Failure:
    """A row whose image could not be cached, carried through gather_object so every process raises."""

    index: int
    message: str
    bad_image: bool  # unreadable (subject to --on_bad_image) rather than uncacheable


def _transform_deterministic(preprocessor: Any, image: Any, flip: bool) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]] | None:
    """``transform_image`` with the flip fixed; None when it still drew random numbers (a random crop)."""
    before = torch.get_rng_state()
    result = preprocessor.transform_image(image, flip=flip)
    return None if not torch.equal(before, torch.get_rng_state()) else result


def build_latent_cache(
    raw: Any, preprocessor: Any, vae: torch.nn.Module, vae_dtype: torch.dtype, accelerator: Any, batch_size: int, source: str
) -> tuple[dict[int, LatentEntry], dict[int, str]]:
    """(entries by row index, unreadable rows by row index -> problem) for the whole dataset."""
    flips = (False, True) if preprocessor.random_flip else (False,)
    indices = list(range(len(raw)))[accelerator.process_index :: accelerator.num_processes]
    done: list[tuple[int, LatentEntry] | _Failure] = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            pending: list[tuple[int, tuple[int, int], list[tuple[int, int]], list[torch.Tensor], str | None]] = []
            for index in indices[start : start + batch_size]:
                row = raw[index]
                value = row[preprocessor.image_column]
                where = data.describe_row(source, row.get(data.ROW_COLUMN, index), value)
                try:
                    image = data.decode_image(value)
                    variants = [_transform_deterministic(preprocessor, image, flip) for flip in flips]
                except data.BadImageError as error:
                    done.append(_Failure(index, f"{where}: {error}", bad_image=True))
                    continue
                if any(v is None for v in variants):
                    done.append(
                        _Failure(
                            index,
                            f"--cache_latents cannot honour random cropping: {where} is {image.width}x{image.height}, so"
                            f" after resizing to {_trained_size(preprocessor, image)} every epoch would crop it"
                            " differently. Add --center_crop (the crop is then fixed), crop the images to squares, or"
                            " drop --cache_latents.",
                            bad_image=False,
                        )
                    )
                    continue
                pending.append((index, variants[0][1], [v[2] for v in variants], [v[0] for v in variants], data.image_filename(image)))
            # One encoder call per image size (several with --enable_bucket: each bucket its own shape).
            for size in sorted({tuple(item[3][0].shape) for item in pending}):
                same = [item for item in pending if tuple(item[3][0].shape) == size]
                pixels = torch.stack([p for item in same for p in item[3]]).to(accelerator.device, dtype=vae_dtype)
                parameters = vae.encode(pixels).latent_dist.parameters.cpu()
                per_image = len(flips)
                for n, (index, original, crops, _, filename) in enumerate(same):
                    params = [parameters[n * per_image + k].clone() for k in range(per_image)]
                    done.append((index, LatentEntry(original, crops, params, filename, (size[1], size[2]))))
    entries: dict[int, LatentEntry] = {}
    bad: dict[int, str] = {}
    for item in _gather(accelerator, done):
        if isinstance(item, _Failure):
            if not item.bad_image:
                raise InputError(item.message)
            bad[item.index] = item.message
        else:
            entries[item[0]] = item[1]
    return entries, bad


def _trained_size(preprocessor: Any, image: Any) -> str:
    """How the random-crop refusal names the size an image is cropped to."""
    height, width = preprocessor.target_size(image.height, image.width)
    if preprocessor.buckets is None:
        return f"--resolution {preprocessor.resolution}"
    return f"cover its bucket {width}x{height}"


def _gather(accelerator: Any, items: list[Any]) -> list[Any]:
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


# ----------------------------------------------------------------------------- datasets and batches
class CachedLatentsDataset(torch.utils.data.Dataset):
    """Training examples from the latent cache, with the uncached pipeline's random choices.

    Under :class:`~trainer.sampling.SeededSampleDataset` the uncached transform draws, per sample,
    ``random.random()`` for the flip and then ``random.choice`` for a caption list; this draws the same,
    in the same order, so cached and uncached runs train on the same samples. Unreadable rows follow
    ``--on_bad_image`` as :class:`~trainer.data.BadImageGuard` does (skip: the next usable row stands in).
    """

    def __init__(
        self,
        entries: dict[int, LatentEntry],
        bad_rows: dict[int, str],
        raw_captions: Sequence[Any],
        preprocessor: Any,
        on_bad_image: str,
        stand_in: Callable[[int], int] | None = None,
    ) -> None:
        self.stand_in = stand_in or (lambda index: (index + 1) % len(self))  # the guard's: same bucket
        self.entries = entries
        self.bad_rows = bad_rows
        self.raw_captions = list(raw_captions)
        self.preprocessor = preprocessor
        self.on_bad_image = on_bad_image
        if not entries:
            raise InputError(f"{preprocessor.source}: no image in its {len(self.raw_captions)} rows can be read")

    def __len__(self) -> int:
        return len(self.raw_captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped = []
        while index in self.bad_rows:
            if self.on_bad_image == "fail":
                raise InputError(f"{self.bad_rows[index]} (--on_bad_image fail; use skip to train without it)")
            skipped.append(self.bad_rows[index])
            index = self.stand_in(index)
        entry = self.entries[index]
        variant = 1 if (self.preprocessor.random_flip and random.random() < 0.5) else 0
        caption = self.preprocessor.captions([self.raw_captions[index]], rows=[index])[0]
        example = {
            LATENT_KEY: entry.parameters[variant],
            "original_sizes": entry.original_size,
            "crop_top_lefts": entry.crop_top_lefts[variant],
            "target_sizes": entry.target_size,
            "input_ids_one": data.tokenize_prompt(self.preprocessor.tokenizer_one, [caption])[0],
            "input_ids_two": data.tokenize_prompt(self.preprocessor.tokenizer_two, [caption])[0],
            data.SKIPPED_KEY: skipped,
        }
        if self.preprocessor.debug_loss and entry.filename:  # as the uncached transform: --debug_loss only
            example["filenames"] = entry.filename
        return example


class CachingCollate:
    """Batches for the training step: cached latents and/or cached prompt embeddings."""

    def __init__(self, text_cache: TextEmbeddingCache | None) -> None:
        self.text_cache = text_cache

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if LATENT_KEY in examples[0]:
            batch: dict[str, Any] = {
                LATENT_KEY: torch.stack([e[LATENT_KEY] for e in examples]),
                "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
                "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
                "original_sizes": [tuple(e["original_sizes"]) for e in examples],
                "crop_top_lefts": [tuple(e["crop_top_lefts"]) for e in examples],
                "target_sizes": [tuple(e["target_sizes"]) for e in examples],
            }
            skipped = [problem for e in examples for problem in e.get(data.SKIPPED_KEY) or ()]
            if skipped:
                batch[data.SKIPPED_KEY] = skipped
            if all("filenames" in e for e in examples):  # --debug_loss, every image from a named file
                batch["filenames"] = [e["filenames"] for e in examples]
        else:
            batch = data.collate_fn(examples)
        if self.text_cache is not None:
            embeds, pooled = self.text_cache.lookup(batch["input_ids_one"], batch["input_ids_two"])
            batch["prompt_embeds"], batch["pooled_prompt_embeds"] = embeds, pooled
        return batch


# ----------------------------------------------------------------------------- entry point
@dataclass
class TrainingData:
    """What the dataloader is built from."""

    dataset: Any
    collate_fn: Any
    report: dict[str, Any]


def _unwrap(train_dataset: Any) -> tuple[Any, Any, str, str, Callable[[int], int] | None]:
    """(raw rows, preprocessor, source name, --on_bad_image, the stand-in of a bad row) of
    ``data.build_train_dataset``'s result."""
    guard = train_dataset if isinstance(train_dataset, data.BadImageGuard) else None
    transformed = guard.dataset if guard is not None else train_dataset
    preprocessor = transformed.format["format_kwargs"].get("transform")
    if not isinstance(preprocessor, data.SDXLPreprocessor):
        raise TypeError("caching needs the dataset of data.build_train_dataset (an SDXLPreprocessor transform)")
    source = guard.source if guard is not None else preprocessor.source
    on_bad_image = guard.on_bad_image if guard is not None else "fail"
    return transformed.with_format(None), preprocessor, source, on_bad_image, guard.stand_in if guard is not None else None


def prepare(args: argparse.Namespace, train_dataset: Any, components: Any, accelerator: Any) -> TrainingData:
    """The training dataset and collate function, with the caches the flags ask for computed."""
    if not (args.cache_latents or args.cache_text_embeddings):
        return TrainingData(train_dataset, data.collate_fn, {"latents": False, "text_embeddings": False})
    raw, preprocessor, source, on_bad_image, stand_in = _unwrap(train_dataset)
    raw_captions = raw[preprocessor.caption_column]
    report: dict[str, Any] = {"latents": bool(args.cache_latents), "text_embeddings": bool(args.cache_text_embeddings)}
    dataset = train_dataset
    text_cache = None
    # Caching must not shift the RNG streams training draws from (cached and uncached runs stay equal).
    with isolated_global_rngs():
        if args.cache_text_embeddings:
            started = time.perf_counter()
            text_cache = build_text_cache(raw_captions, preprocessor, components.text_encoders, accelerator, args.train_batch_size)
            report["captions"] = len(text_cache.entries)
            report["text_seconds"] = time.perf_counter() - started
            if accelerator.is_main_process:
                logger.info(f"Cached the text embeddings of {len(text_cache.entries)} captions in {report['text_seconds']:.1f} s.")
        if args.cache_latents:
            started = time.perf_counter()
            entries, bad = build_latent_cache(
                raw, preprocessor, components.vae, components.vae_dtype, accelerator, args.train_batch_size, source
            )
            dataset = CachedLatentsDataset(entries, bad, raw_captions, preprocessor, on_bad_image, stand_in)
            report["images"] = len(entries)
            report["orientations"] = 2 if preprocessor.random_flip else 1
            report["latent_seconds"] = time.perf_counter() - started
            if accelerator.is_main_process:
                logger.info(
                    f"Cached the latents of {len(entries)} images ({report['orientations']} orientation(s)) in"
                    f" {report['latent_seconds']:.1f} s."
                )
    return TrainingData(dataset, CachingCollate(text_cache), report)
