"""trainer.data: Ascend's parquet layout and imagefolders load; preprocessing matches diffusers' SDXL recipe."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import data
from trainer.embedded_default import build_samples, build_tokenizers, write_parquet_dataset

# The dataset_infos.json of lambdalabs/pokemon-blip-captions as Ascend's README has users copy it
# (row count adapted to the small test set; the real file says 833).
POKEMON_INFOS = {
    "lambdalabs--pokemon-blip-captions": {
        "description": "",
        "citation": "",
        "homepage": "",
        "license": "",
        "features": {
            "image": {"decode": True, "id": None, "_type": "Image"},
            "text": {"dtype": "string", "id": None, "_type": "Value"},
        },
        "post_processed": None,
        "supervised_keys": None,
        "task_templates": None,
        "builder_name": None,
        "config_name": None,
        "version": None,
        "splits": {"train": {"name": "train", "num_bytes": 119417305.0, "num_examples": 833, "dataset_name": "pokemon-blip-captions"}},
        "download_checksums": None,
        "download_size": 99672355,
        "post_processing_size": None,
        "dataset_size": 119417305.0,
        "size_in_bytes": 219089660.0,
    }
}


def make_pokemon_layout(root: Path, rows: int, recorded_rows: int | None = None) -> Path:
    """``README.MD``, ``dataset_infos.json``, ``data/dataset_infos.json``, ``data/train-*.parquet``."""
    write_parquet_dataset(root, build_samples(rows), name="lambdalabs--pokemon-blip-captions")
    infos = json.loads(json.dumps(POKEMON_INFOS))
    infos["lambdalabs--pokemon-blip-captions"]["splits"]["train"]["num_examples"] = recorded_rows or rows
    for path in (root / "dataset_infos.json", root / "data" / "dataset_infos.json"):
        path.write_text(json.dumps(infos))
    parquet = next((root / "data").glob("*.parquet"))
    parquet.rename(parquet.with_name("train-00000-of-00001-566cc9b19d7203f8.parquet"))  # the hub file name
    return root


def make_imagefolder(root: Path, rows: int) -> Path:
    """Images plus ``metadata.jsonl`` mapping ``file_name`` to ``text``."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as metadata:
        for i, (image, caption) in enumerate(build_samples(rows)):
            image.save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption}) + "\n")
    return root


def test_ascend_parquet_layout_loads(tmp_path: Path) -> None:
    root = make_pokemon_layout(tmp_path / "pokemon-blip-captions", rows=6)
    assert {p.name for p in root.iterdir()} == {"README.MD", "dataset_infos.json", "data"}
    dataset = data.load_train_dataset(str(root), None, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 6
    assert dataset.column_names == ["image", "text"]
    row = dataset[0]
    assert isinstance(row["image"], Image.Image) and row["text"].startswith("a ")


def test_ascend_layout_with_stale_row_count_still_loads(tmp_path: Path) -> None:
    """A copy whose dataset_infos.json says 833 rows but holds fewer: loads (with a warning)."""
    root = make_pokemon_layout(tmp_path / "pokemon", rows=5, recorded_rows=833)
    assert len(data.load_train_dataset(str(root), None, cache_dir=str(tmp_path / "cache"))) == 5


def test_imagefolder_loads(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "folder", rows=5)
    dataset = data.load_train_dataset(None, str(root), cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 5
    assert set(dataset.column_names) >= {"image", "text"}
    assert isinstance(dataset[0]["image"], Image.Image)


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.MD").write_text("nothing")
    with pytest.raises(FileNotFoundError, match="without data files"):
        data.load_train_dataset(str(tmp_path / "empty"), None)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_train_dataset(None, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="Need either a dataset name or a training folder"):
        data.load_train_dataset(None, None)


def test_column_validation() -> None:
    args = argparse.Namespace(dataset_name="x", image_column="image", caption_column="caption")
    with pytest.raises(ValueError, match="--caption_column' value 'caption' needs to be one of: image, text"):
        data.resolve_columns(["image", "text"], args)
    args = argparse.Namespace(dataset_name="lambdalabs/pokemon-blip-captions", image_column=None, caption_column=None)
    assert data.resolve_columns(["text", "image"], args) == ("image", "text")


@pytest.mark.parametrize("size,expected", [((80, 64), (80, 64)), ((64, 80), (64, 80)), ((300, 200), (96, 64)), ((200, 301), (64, 96))])
def test_resize_shorter_side_matches_torchvision_rule(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert data.resize_shorter_side(Image.new("RGB", size), 64).size == expected


@pytest.fixture(scope="module")
def tokenizers() -> tuple:
    return build_tokenizers()


def _preprocessor(tokenizers: tuple, **kwargs: object) -> data.SDXLPreprocessor:
    return data.SDXLPreprocessor(tokenizers[0], tokenizers[1], "image", "text", resolution=64, **kwargs)


def test_original_size_is_height_width_and_crop_top_left_enters_time_ids(tokenizers: tuple) -> None:
    image = Image.new("RGB", (160, 64), (0, 0, 0))  # wide: resized to 160x64, random crop along x
    torch.manual_seed(0)
    pixels, original_size, (y1, x1) = _preprocessor(tokenizers).transform_image(image)
    assert original_size == (64, 160)
    assert pixels.shape == (3, 64, 64)
    torch.manual_seed(0)  # RandomCrop.get_params draws y then x with torch.randint
    assert (y1, x1) == (int(torch.randint(0, 1, (1,))), int(torch.randint(0, 97, (1,))))
    center = _preprocessor(tokenizers, center_crop=True).transform_image(image)[2]
    assert center == (0, 48)


def test_flip_happens_before_crop(tokenizers: tuple) -> None:
    """Left half red, right half blue, cropped at the left edge: after a flip-then-crop the crop is blue."""
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 0, 255), (64, 0, 128, 64))
    pre = _preprocessor(tokenizers, random_flip=True, center_crop=False)
    for seed in range(20):
        random.seed(seed)
        flipped = random.random() < 0.5
        random.seed(seed)
        torch.manual_seed(seed)
        pixels, _, (_, x1) = pre.transform_image(image)
        # Which colour the crop shows is decided by the flipped image, not flipped after cropping.
        source = image.transpose(Image.FLIP_LEFT_RIGHT) if flipped else image
        expected = data.to_normalized_tensor(source.crop((x1, 0, x1 + 64, 64)))
        torch.testing.assert_close(pixels, expected)


def test_pixels_are_normalized_to_minus_one_one(tokenizers: tuple) -> None:
    pixels = _preprocessor(tokenizers, center_crop=True).transform_image(Image.new("RGB", (64, 64), (255, 0, 128)))[0]
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


def test_batch_collation_and_tokenization(tokenizers: tuple) -> None:
    samples = build_samples(3)
    examples = {"image": [s[0] for s in samples], "text": [s[1] for s in samples[:2]] + [[samples[2][1], "other"]]}
    random.seed(0)
    out = _preprocessor(tokenizers)(examples)
    batch = data.collate_fn([{k: out[k][i] for k in out} for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["input_ids_one"].shape == batch["input_ids_two"].shape == (3, 77)
    assert all(len(size) == 2 and len(crop) == 2 for size, crop in zip(batch["original_sizes"], batch["crop_top_lefts"]))
    ids = batch["input_ids_one"][0].tolist()
    words = tokenizers[0].convert_ids_to_tokens(ids[: len(samples[0][1].split()) + 2])
    assert words[0] == "<|startoftext|>" and words[-1] == "<|endoftext|>"
    assert [w.removesuffix("</w>") for w in words[1:-1]] == samples[0][1].split()  # one token per caption word
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>
    assert batch["input_ids_two"][0, -1].item() == tokenizers[1].convert_tokens_to_ids("!")
    assert batch["input_ids_one"][0, -1].item() == tokenizers[0].eos_token_id
    with pytest.raises(ValueError, match="should contain either strings or lists of strings"):
        _preprocessor(tokenizers)({"image": [samples[0][0]], "text": [3]})


def test_pixel_tensor_matches_numpy_reference() -> None:
    array = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    tensor = data.to_normalized_tensor(Image.fromarray(array))
    torch.testing.assert_close(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1)
