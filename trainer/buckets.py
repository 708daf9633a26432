"""``--enable_bucket``: aspect-ratio buckets, with kohya sd-scripts' flag names.

Without buckets every image is resized and cropped to a ``--resolution`` square (diffusers' recipe). With
them (kohya sd-scripts, SimpleTuner and OneTrainer do this; SDXL itself was trained so):

* **The buckets** (:func:`bucket_resolutions`): sizes of about ``--resolution``² pixels whose sides are
  multiples of ``--bucket_reso_steps`` between ``--min_bucket_reso`` and ``--max_bucket_reso`` (kohya's
  ``make_bucket_resolutions``: for each width, the tallest height that keeps the area within
  ``resolution``², plus the transposes and the square).
* **Each image** goes to the bucket nearest to its aspect ratio (:meth:`BucketGrid.nearest`; distance
  in log-ratio, so a 2:1 and a 1:2 image are treated alike), is resized to cover it and cropped as
  little as possible (center crop with ``--center_crop``, else a random crop: ``trainer.data``). SDXL's
  time ids then carry the real sizes: ``original_size`` the image's, ``crops_coords_top_left`` the crop,
  ``target_size`` the bucket's.
* **Every batch is from one bucket, on every process** (:class:`BucketBatchSampler`): per epoch each
  bucket's rows are shuffled and cut into groups of ``batch size x processes`` (the last group filled up
  with rows of the same bucket from its start, so every batch has the full size: one shape per bucket
  for ``--compile``), the groups are shuffled, and accelerate hands batch ``k`` to process
  ``k % processes``, so at each step all processes train one bucket. The order depends only on
  ``(data seed, epoch)``, so a resumed run skips the consumed batches and continues exactly
  (:mod:`trainer.sampling`, :mod:`trainer.checkpointing`).

Unlike kohya, ``--max_bucket_reso`` defaults to 2048, what SDXL configs for sd-scripts pass: kohya's
argparse default (1024, sized for SD 1.x) would cap every bucket at 1024 px per side, so at SDXL's
1024 px only the square would keep the full pixel count. ``--bucket_no_upscale`` is not offered.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from trainer.errors import InputError
from trainer.sampling import SampleKey, derive_seed

logger = logging.getLogger(__name__)

DEFAULT_MIN_BUCKET_RESO = 256  # kohya's
DEFAULT_MAX_BUCKET_RESO = 2048  # see the module docstring
DEFAULT_BUCKET_RESO_STEPS = 64  # kohya's
#: Bucket sides must divide by the VAE's 8 times the SDXL UNet's two down-samplings (kohya checks the same
#: for SDXL: ``verify_bucket_reso_steps(32)``); other sizes would be interpolated inside the UNet.
SIDE_MULTIPLE = 32

Size = tuple[int, int]  # (height, width), the order of SDXL's time ids


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """Every bucket (height, width), sorted: sides multiples of ``step`` within ``[min_reso, max_reso]``,
    area at most ``resolution``² and, for each width, the largest such height (kohya's rule)."""
    area = resolution * resolution
    top = max_reso // step * step
    sizes: set[Size] = set()
    square = resolution // step * step
    if min_reso <= square <= max_reso:
        sizes.add((square, square))
    for width in range(-(-min_reso // step) * step, top + 1, step):
        height = min(top, area // width // step * step)
        if height >= min_reso:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


@dataclass(frozen=True)
class BucketGrid:
    """The buckets of a run and the choice of one per image size."""

    sizes: tuple[Size, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BucketGrid":
        return cls(tuple(bucket_resolutions(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)))

    def nearest(self, height: int, width: int) -> int:
        """Index of the bucket closest to the aspect ratio of a ``height`` x ``width`` image."""
        ratio = math.log(width / height)
        return min(range(len(self.sizes)), key=lambda i: abs(math.log(self.sizes[i][1] / self.sizes[i][0]) - ratio))

    def target_size(self, height: int, width: int) -> Size:
        """The (height, width) an image of that size is trained at."""
        return self.sizes[self.nearest(height, width)]


def check_flags(args: argparse.Namespace) -> None:
    """One-line errors for bucket settings that cannot work (only with ``--enable_bucket``, as kohya
    ignores the other bucket flags without it)."""
    if not getattr(args, "enable_bucket", False):
        return
    step, low, high = args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso
    if step % SIDE_MULTIPLE:
        raise InputError(
            f"--bucket_reso_steps {step}: expected a multiple of {SIDE_MULTIPLE} (the VAE's 8 x the SDXL UNet's 4),"
            f" e.g. {max(SIDE_MULTIPLE, step // SIDE_MULTIPLE * SIDE_MULTIPLE)}"
        )
    if low > high:
        raise InputError(f"--min_bucket_reso {low} is above --max_bucket_reso {high}")
    if not bucket_resolutions(args.resolution, low, high, step):
        raise InputError(
            f"--enable_bucket: no bucket fits any image: none of about {args.resolution}x{args.resolution} pixels"
            f" (--resolution) has both sides multiples of --bucket_reso_steps {step} between --min_bucket_reso {low}"
            f" and --max_bucket_reso {high}; keep --resolution between the two"
        )


# ----------------------------------------------------------------------------- the dataset's buckets
@dataclass
class BucketAssignment:
    """Which bucket each row of the training dataset trains in (None: its image cannot be read)."""

    grid: BucketGrid
    rows: list[int | None]
    unreadable: list[str]  # why the rows without a bucket have none (one line each)

    @classmethod
    def of_sizes(cls, grid: BucketGrid, sizes: Sequence[Size | None], unreadable: Sequence[str] = ()) -> "BucketAssignment":
        return cls(grid, [None if size is None else grid.nearest(*size) for size in sizes], list(unreadable))

    def members(self) -> dict[int, list[int]]:
        """Bucket index -> its rows (ascending), for the buckets that have any, in bucket order."""
        found: dict[int, list[int]] = {}
        for row, bucket in enumerate(self.rows):
            if bucket is not None:
                found.setdefault(bucket, []).append(row)
        return dict(sorted(found.items()))

    def stand_in(self, row: int) -> int:
        """The row that replaces an unusable ``row`` (``--on_bad_image skip``): the next of its bucket, so
        the batch keeps one shape."""
        bucket = self.rows[row]
        members = self.members().get(bucket, []) if bucket is not None else []
        if not members:
            return (row + 1) % len(self.rows)
        later = [m for m in members if m > row]
        return later[0] if later else members[0]

    def digest(self) -> str:
        """SHA-256 of the buckets and the rows in each: equal digests, equal data order for a seed."""
        return hashlib.sha256(repr((self.grid.sizes, self.rows)).encode()).hexdigest()

    def report(self, batch_size: int, num_processes: int) -> list[dict[str, int]]:
        """summary.json's ``buckets``: per bucket used, its size, its images and its steps per epoch."""
        group = batch_size * num_processes
        return [
            {"width": self.grid.sizes[b][1], "height": self.grid.sizes[b][0], "images": len(rows), "steps_per_epoch": -(-len(rows) // group)}
            for b, rows in self.members().items()
        ]


# ----------------------------------------------------------------------------- the sampler
class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, row)`` keys, each from one bucket, ``num_processes`` consecutive batches from
    the same bucket (accelerate gives batch ``k`` to process ``k % num_processes``); the order of epoch
    ``e`` depends only on ``(seed, e)``. Every batch holds ``batch_size`` keys (see the module docstring).
    """

    def __init__(self, assignment: BucketAssignment, batch_size: int, num_processes: int, seed: int) -> None:
        self.members = list(assignment.members().values())
        if not self.members:
            raise InputError(f"--enable_bucket: no image of the dataset can be read ({'; '.join(assignment.unreadable[:3])})")
        self.batch_size, self.num_processes, self.seed = batch_size, num_processes, seed
        self.assignment_digest = assignment.digest()
        self.drop_last = False  # read by accelerate: every batch is full
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[SampleKey]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0xB0C4E7))
        size = self.batch_size * self.num_processes
        groups: list[list[int]] = []
        for rows in self.members:
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            count = -(-len(order) // size)
            padded = (order * -(-count * size // len(order)))[: count * size]  # the last group filled from the start
            groups += [padded[g * size : (g + 1) * size] for g in range(count)]
        shuffled = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        return [[(epoch, row) for row in group[b : b + self.batch_size]] for group in shuffled for b in range(0, size, self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """What the data order depends on besides the epoch and step (``accelerator.register_for_checkpointing``
        stores it in each checkpoint; the step and the data seed are in ``trainer_state.json``)."""
        return {"seed": self.seed, "assignment": self.assignment_digest, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming: refuse a checkpoint whose run put the images in other buckets (another dataset or
        bucket settings), since its data order cannot be continued."""
        mine = self.state_dict()
        if state.get("assignment") != mine["assignment"]:
            raise InputError(
                "--enable_bucket: the checkpoint's run put the images in other buckets (the dataset or its images"
                " changed), so its data order cannot be continued; resume with the same data or start afresh"
            )
        if state.get("seed") != mine["seed"]:
            logger.warning(f"Resuming with data seed {mine['seed']} instead of the checkpoint's {state.get('seed')}.")

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return sum(-(-len(rows) // (self.batch_size * self.num_processes)) for rows in self.members) * self.num_processes


def describe(report: Sequence[dict[str, int]]) -> list[str]:
    """One line per bucket used (kohya logs the same), for the log and the final summary."""
    return [f"bucket {r['width']}x{r['height']}: {r['images']} images, {r['steps_per_epoch']} steps per epoch" for r in report]
