"""``--enable_bucket``: aspect-ratio buckets (trainer.buckets) -- the bucket sizes, each image's bucket,
resize and crop and time ids, one bucket per step on every process, bad settings, and runs on a
mixed-aspect image folder (generated here, loaded through ``datasets.load_dataset``): training, exact
resume, cached latents, and ``--compile`` with one graph per bucket and no recompilation after warm-up."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.trainer.runs import lora_bytes
from tests.trainer.test_e2e import run_main
from trainer import buckets, data, loop
from trainer.embedded_default import build_samples, build_tokenizers
from trainer.errors import InputError
from trainer.hooks import TrainingHooks
from trainer.sdxl_lora import cli

# (width, height) of the fixture's images: wide (2:1 and 5:2), tall (1:2) and square ones.
FIXTURE_SIZES = [(128, 64), (64, 128), (72, 72), (150, 60), (64, 128), (128, 64), (80, 80), (64, 128), (140, 70), (72, 72), (128, 64), (60, 120)]
# At --resolution 64 with sides 32..128 in steps of 32 the buckets are 96x32, 128x32, 64x64, 32x96 and
# 32x128 (width x height); the fixture fills three of them.
BUCKET_FLAGS = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32"]
EXPECTED_BUCKETS = {(96, 32): 5, (32, 96): 4, (64, 64): 3}  # (width, height): images
RUN_FLAGS = ["--random_flip", "--center_crop", "--checkpointing_steps", "2"]


def make_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """An imagefolder (PNG files + metadata.jsonl) of captioned shapes, one image per (width, height)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as metadata:
        for i, ((image, caption), size) in enumerate(zip(build_samples(len(sizes)), sizes)):
            image.resize(size, Image.BILINEAR).save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return root


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captioned shapes in mixed aspect ratios: three buckets."""
    return make_folder(tmp_path_factory.mktemp("mixed_aspect"), FIXTURE_SIZES)


def _argv(assets: Any, folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(assets.model_dir), "--train_data_dir", str(folder), "--resolution", "64",
        *BUCKET_FLAGS, "--train_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "5e-3", "--seed", "7",
        "--report_to", "none", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def _run(argv: list[str], hooks: TrainingHooks | None = None) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds stalls (what the embedded run does)
    try:
        if hooks is None:
            return run_main(argv)[0]
        from trainer.sdxl_lora import main

        return main(argv, hooks=hooks)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the buckets
def test_sdxl_buckets_are_kohyas_at_the_defaults() -> None:
    sizes = buckets.bucket_resolutions(1024, buckets.DEFAULT_MIN_BUCKET_RESO, buckets.DEFAULT_MAX_BUCKET_RESO, 64)
    # SDXL's well-known training sizes (height, width) are among them, both orientations.
    for size in [(1024, 1024), (832, 1216), (896, 1152), (768, 1344), (640, 1536)]:
        assert size in sizes and size[::-1] in sizes
    for height, width in sizes:
        assert height % 64 == 0 and width % 64 == 0 and 256 <= min(height, width) and max(height, width) <= 2048
        assert height * width <= 1024 * 1024
        # the tallest height for its width, or the widest width for its height (its transpose is the other)
        assert any((long + 64) * short > 1024 * 1024 or long + 64 > 2048 for long, short in [(height, width), (width, height)])
    assert buckets.bucket_resolutions(64, 32, 128, 32) == [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    grid = buckets.BucketGrid(tuple(buckets.bucket_resolutions(1024, 256, 2048, 64)))
    assert grid.target_size(1000, 1000) == (1024, 1024)
    assert grid.target_size(2000, 3000) == (832, 1216)  # 3:2 photo
    assert grid.target_size(3000, 2000) == (1216, 832)  # portrait: the transpose
    assert grid.target_size(4000, 100) == (2048, 256)  # beyond the most extreme bucket: that one
    for height, width in [(333, 517), (517, 333), (90, 1600)]:
        chosen = grid.target_size(height, width)
        error = abs(math.log(chosen[1] / chosen[0]) - math.log(width / height))
        assert all(error <= abs(math.log(w / h) - math.log(width / height)) for h, w in grid.sizes)


def test_bucket_resize_crops_least_and_time_ids_carry_the_sizes() -> None:
    grid = buckets.BucketGrid(tuple(buckets.bucket_resolutions(64, 32, 128, 32)))
    tokenizers = build_tokenizers()
    pre = data.SDXLPreprocessor(*tokenizers, "image", "text", resolution=64, center_crop=True, buckets=grid)
    image = Image.new("RGB", (150, 60))  # 5:2 -> bucket 96x32; covered at 96x38 (one side exact), 3 rows off each edge
    image.paste((255, 0, 0), (0, 0, 150, 7))
    pixels, original, crop = pre.transform_image(image)
    assert pixels.shape == (3, 32, 96) and original == (60, 150) and crop == (3, 0)
    assert data.resize_to_cover(image, 32, 96).size == (96, 38)
    torch.manual_seed(3)
    random_crop = data.SDXLPreprocessor(*tokenizers, "image", "text", resolution=64, buckets=grid).transform_image(image)[2]
    torch.manual_seed(3)  # RandomCrop.get_params' draws for a 32x96 crop of 38x96
    assert random_crop == (int(torch.randint(0, 7, (1,))), int(torch.randint(0, 1, (1,))))
    ids = loop.compute_time_ids([original], [crop], 64, torch.device("cpu"), torch.float32, [tuple(pixels.shape[1:])])
    assert ids.tolist() == [[60, 150, 3, 0, 32, 96]]
    square = data.SDXLPreprocessor(*tokenizers, "image", "text", resolution=64, center_crop=True)
    assert square.transform_image(image)[0].shape == (3, 64, 64)  # without buckets: the square, as before


def test_sizes_come_from_headers_with_exif_rotation_and_bad_files_follow_on_bad_image(tmp_path: Path) -> None:
    import io

    from datasets import Dataset

    photo = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo stored landscape
    Image.new("RGB", (120, 60)).save(photo, format="JPEG", exif=exif)
    value = {"bytes": photo.getvalue(), "path": None}
    assert data.image_size(value) == (120, 60) == data.decode_image(value).size[::-1]  # (height, width)
    with pytest.raises(data.BadImageError, match="not an image"):
        data.image_size({"bytes": b"not an image", "path": None})
    rows = Dataset.from_dict({"image": [value, {"bytes": b"junk", "path": None}], data.ROW_COLUMN: [0, 1]})
    grid = buckets.BucketGrid(((32, 96), (64, 64), (96, 32)))
    skipped = data.assign_buckets(rows, "image", grid, "skip", "photos")
    assert skipped.rows == [2, None] and skipped.unreadable == ["photos: row 1: not an image PIL can read (unknown format or corrupt header)"]
    with pytest.raises(InputError, match=r"photos: row 1: not an image .*--on_bad_image fail"):
        data.assign_buckets(rows, "image", grid, "fail", "photos")


# ----------------------------------------------------------------------------- the sampler
def _assignment(counts: dict[int, int]) -> buckets.BucketAssignment:
    grid = buckets.BucketGrid(((32, 96), (64, 64), (96, 32)))
    rows = [b for b, n in counts.items() for _ in range(n)]
    return buckets.BucketAssignment(grid, [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))], [])


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_every_step_of_every_process_trains_one_bucket(processes: int) -> None:
    from accelerate.data_loader import BatchSamplerShard

    assignment = _assignment({0: 7, 1: 3, 2: 11})
    sampler = buckets.BucketBatchSampler(assignment, batch_size=2, num_processes=processes, seed=5)
    sampler.set_epoch(4)
    # accelerate's own sharding, as accelerator.prepare applies it to the dataloader
    shards = [list(BatchSamplerShard(sampler, processes, rank, even_batches=True)) for rank in range(processes)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) * processes == len(sampler)
    for step in zip(*shards):
        rows = [row for batch in step for _, row in batch]
        assert all(len(batch) == 2 for batch in step)  # full batches: one shape per bucket
        assert len({assignment.rows[row] for row in rows}) == 1  # one bucket at this step, on every process
        assert {epoch for batch in step for epoch, _ in batch} == {4}
    seen = [row for shard in shards for batch in shard for _, row in batch]
    assert set(seen) == set(range(len(assignment.rows)))  # every image each epoch (a few twice, to fill batches)
    assert sampler.batches(4) == buckets.BucketBatchSampler(assignment, 2, processes, seed=5).batches(4)  # seeded
    assert sampler.batches(5) != sampler.batches(4)


def test_bad_row_stand_in_stays_in_its_bucket() -> None:
    assignment = buckets.BucketAssignment(buckets.BucketGrid(((32, 96), (64, 64))), [0, 1, 0, 1, 1, None], ["row 5: truncated"])
    assert [assignment.stand_in(r) for r in range(5)] == [2, 3, 0, 4, 1]
    assert assignment.report(batch_size=2, num_processes=1) == [
        {"width": 96, "height": 32, "images": 2, "steps_per_epoch": 1},
        {"width": 64, "height": 64, "images": 3, "steps_per_epoch": 2},
    ]


def test_checkpointed_sampler_state_refuses_other_buckets() -> None:
    sampler = buckets.BucketBatchSampler(_assignment({0: 4, 1: 4}), batch_size=2, num_processes=1, seed=5)
    state = sampler.state_dict()
    assert state == {"seed": 5, "assignment": _assignment({0: 4, 1: 4}).digest(), "batches_per_epoch": 4}
    sampler.load_state_dict(state)  # the same buckets: resumes
    changed = buckets.BucketBatchSampler(_assignment({0: 5, 1: 3}), batch_size=2, num_processes=1, seed=5)
    with pytest.raises(InputError, match="put the images in other buckets"):
        changed.load_state_dict(state)


# ----------------------------------------------------------------------------- bad settings: one line, exit 2
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--min_bucket_reso", "512", "--max_bucket_reso", "256"], "--min_bucket_reso 512 is above --max_bucket_reso 256"),
        ([], "--enable_bucket: no bucket fits any image"),  # 64 px with sides of at least 256
        (["--min_bucket_reso", "32", "--bucket_reso_steps", "48"], "--bucket_reso_steps 48: expected a multiple of 32"),
        (["--bucket_reso_steps", "0"], "--bucket_reso_steps 0: expected at least 1"),
    ],
)
def test_impossible_bucket_settings_stop_before_anything_is_written(flags, expected, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status = cli(["--output_dir", str(out), "--resolution", "64", "--enable_bucket", *flags])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------- runs on mixed aspect ratios
@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory: pytest.TempPathFactory, assets: Any, mixed_folder: Path) -> Path:
    """4 steps with --random_flip and --center_crop (as --cache_latents needs), a checkpoint every 2."""
    out = tmp_path_factory.mktemp("bucket_run")
    _run(_argv(assets, mixed_folder, out, *RUN_FLAGS))
    return out


def test_mixed_aspect_run_trains_and_lists_its_buckets(bucket_run: Path) -> None:
    summary = json.loads((bucket_run / "summary.json").read_text())
    assert summary["steps"] == 4 and all(math.isfinite(loss) for loss in summary["loss_history"])
    used = {(b["width"], b["height"]): b["images"] for b in summary["buckets"]}
    assert used == EXPECTED_BUCKETS
    assert [b["steps_per_epoch"] for b in summary["buckets"]] == [3, 2, 2]  # batches of 2, the last filled up


def test_mixed_aspect_run_resumes_exactly(tmp_path: Path, assets: Any, mixed_folder: Path, bucket_run: Path) -> None:
    out = tmp_path / "resumed"
    _run(_argv(assets, mixed_folder, out, *RUN_FLAGS, "--max_train_steps", "3"))
    resumed = _run(_argv(assets, mixed_folder, out, *RUN_FLAGS, "--resume_from_checkpoint", "latest"))
    reference = json.loads((bucket_run / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["loss_history"] == reference["loss_history"][2:]
    assert lora_bytes(out) == lora_bytes(bucket_run)


def test_cached_latents_train_as_uncached_in_buckets(tmp_path: Path, assets: Any, mixed_folder: Path, bucket_run: Path) -> None:
    """Each image encoded once at its bucket's size (both orientations): the uncached run's losses."""
    cached = _run(_argv(assets, mixed_folder, tmp_path / "cached", *RUN_FLAGS, "--cache_latents"))
    plain = json.loads((bucket_run / "summary.json").read_text())
    assert cached["cache"]["images"] == len(FIXTURE_SIZES) and cached["cache"]["orientations"] == 2
    assert cached["buckets"] == plain["buckets"]
    torch.testing.assert_close(torch.tensor(cached["loss_history"]), torch.tensor(plain["loss_history"]), rtol=1e-5, atol=1e-6)


class _RecompileGuardAfterWarmup(TrainingHooks):
    """Turns dynamo's ``error_on_recompile`` on once every bucket has had its first (compiling) step."""

    def __init__(self, shapes: int) -> None:
        self.shapes, self.seen, self.guarded_steps = shapes, set(), 0

    def on_batch(self, step: int, batch: dict[str, Any]) -> None:
        shape = tuple(batch["pixel_values"].shape)
        warm = len(self.seen) == self.shapes and shape in self.seen  # every bucket compiled, this one too
        self.seen.add(shape)
        torch._dynamo.config.error_on_recompile = warm
        self.guarded_steps += warm


@pytest.fixture(scope="module")
def small_unet_model(tmp_path_factory: pytest.TempPathFactory, assets: Any) -> Any:
    """The embedded pipeline with a smaller UNet (two levels, one layer each; same conditioning), saved as
    real files: dynamo traces it in a fraction of the embedded UNet's time, and a compile test traces once
    per bucket."""
    import shutil
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    model_dir = tmp_path_factory.mktemp("small_unet") / "model"
    shutil.copytree(assets.model_dir, model_dir)
    shutil.rmtree(model_dir / "unet")
    config = UNet2DConditionModel.load_config(str(assets.model_dir / "unet"))
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(
        config, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, transformer_layers_per_block=1, attention_head_dim=(2, 4),
    ).save_pretrained(str(model_dir / "unet"))  # fmt: skip
    return SimpleNamespace(model_dir=model_dir)


def test_compiled_buckets_compile_once_each(tmp_path: Path, small_unet_model: Any) -> None:
    """--compile (aot_eager: dynamo's capture and guards without inductor's code generation, as
    test_compile.py) on two buckets of one batch each: steps 1-2 (epoch 0) compile one graph per bucket,
    step 3 (epoch 1) runs under error_on_recompile; the losses are the eager run's."""
    from torch._dynamo.utils import counters

    folder = make_folder(tmp_path / "two_buckets", [(128, 64), (72, 72), (140, 70), (80, 80)])  # 96x32 and 64x64
    flags = ["--random_flip", "--max_train_steps", "3"]
    eager = _run(_argv(small_unet_model, folder, tmp_path / "eager", *flags))
    hooks = _RecompileGuardAfterWarmup(shapes=2)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = _run(_argv(small_unet_model, folder, tmp_path / "compiled", *flags, "--compile", "--compile_backend", "aot_eager"), hooks)
    finally:
        torch._dynamo.config.error_on_recompile = False
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
    assert [(b["width"], b["height"]) for b in compiled["buckets"]] == [(96, 32), (64, 64)]
    assert graphs == 2 and hooks.guarded_steps == 1  # step 3 reused its bucket's graph under error_on_recompile
    for step, (e, c) in enumerate(zip(eager["loss_history"], compiled["loss_history"], strict=True), start=1):
        assert abs(c - e) <= 1e-5 * abs(e), f"step {step}: compiled {c} vs eager {e}"
