"""Bad inputs to ``python -m trainer.sdxl_lora``: one line naming the flag, file or column, exit status 2,
nothing written. Plus what is *not* an error: every image mode converted to the right RGB, list and
empty captions, corrupt images skipped and counted.

Every case builds its bad input in ``tmp_path`` and runs the CLI in-process (``trainer.sdxl_lora.cli``);
one runs it as a real subprocess. The tiny embedded model is reused from the session's asset cache.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from trainer import data, preflight
from trainer.errors import EXIT_INPUT_ERROR, InputError
from trainer.ownership import LOCK_FILE

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """datasets' Arrow cache, outside every case directory (whose contents must not change)."""
    import datasets

    datasets.utils.disable_progress_bars()
    return tmp_path_factory.mktemp("hf_datasets_cache")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``trainer.sdxl_lora.cli(argv)`` in-process: (exit status, stderr)."""
    import torch

    from trainer.sdxl_lora import cli

    err = io.StringIO()
    threads = torch.get_num_threads()
    _reset_accelerate()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = cli(argv)
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)
    return status, err.getvalue()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def encoded(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def rgb_png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (72, 64)) -> bytes:
    return encoded(Image.new("RGB", size, color))


def truncated(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def write_parquet(root: Path, columns: dict[str, list[Any]], features: dict[str, Any] | None = None) -> Path:
    """A dataset folder in the layout the trainer reads (``data/train-*.parquet``)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    if features is None:
        features = {"image": ImageFeature(), "text": Value("string")}
    table = {name: [{"bytes": v, "path": None} if isinstance(v, bytes) else v for v in values] for name, values in columns.items()}
    (root / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(table, features=Features(features)).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def shapes_dataset(root: Path, captions: list[Any] | None = None, caption_feature: Any = None) -> Path:
    """Three small RGB images with the given captions (default: plain strings)."""
    from datasets import Image as ImageFeature
    from datasets import Value

    captions = captions if captions is not None else ["a red square", "a red circle", "a red triangle"]
    features = {"image": ImageFeature(), "text": caption_feature or Value("string")}
    return write_parquet(root, {"image": [rgb_png() for _ in captions], "text": captions}, features)


def model_without(tmp: Path, assets: Any, missing: str) -> Path:
    """The embedded pipeline with one subfolder left out (symlinks: nothing copied)."""
    model = tmp / f"model_without_{missing}"
    model.mkdir()
    for part in assets.model_dir.iterdir():
        if part.name != missing:
            (model / part.name).symlink_to(part)
    return model


# ----------------------------------------------------------------------------- the table of bad inputs
@dataclass(frozen=True)
class Case:
    """One bad input: ``build(tmp, assets, monkeypatch)`` makes it and returns the extra flags."""

    name: str
    build: Callable[[Path, Any, pytest.MonkeyPatch], list[str]]
    message: str  # regular expression the one error line must match
    at_runtime: bool = False  # found while reading data (after the model loaded), not in preflight


def _dataset(root_name: str, **kwargs: Any) -> Callable[[Path, Any, pytest.MonkeyPatch], list[str]]:
    return lambda tmp, assets, mp: ["--dataset_name", str(shapes_dataset(tmp / root_name, **kwargs))]


def _device(device_type: str, bf16: bool = True) -> Callable[[pytest.MonkeyPatch], None]:
    """Pretend the run trains on ``device_type`` (whatever this machine has), so the case is deterministic."""

    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setattr(preflight, "training_device_type", lambda: device_type)
        mp.setattr(preflight, "bf16_supported", lambda _device_type: bf16)

    return patch


def _list_captions(tmp: Path, assets: Any, mp: pytest.MonkeyPatch, captions: list[Any]) -> list[str]:
    from datasets import Value

    try:
        from datasets import List  # datasets >= 4
    except ImportError:
        from datasets import Sequence as List
    return ["--dataset_name", str(shapes_dataset(tmp / "lists", captions=captions, caption_feature=List(Value("string"))))]


def _bad_image_parquet(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
    root = write_parquet(tmp / "corrupt", {"image": [rgb_png(), CORRUPT, rgb_png()], "text": ["a", "b", "c"]})
    # A DataLoader worker raises it: the line must still be the original one, not the worker's traceback.
    return ["--dataset_name", str(root), "--on_bad_image", "fail", "--dataloader_num_workers", "1"]


def _bad_image_folder(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
    folder = tmp / "folder"
    folder.mkdir()
    blobs = [rgb_png(), truncated(encoded(Image.new("RGB", (64, 64)), "JPEG")), rgb_png()]
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, blob in enumerate(blobs):
            (folder / f"{i:03d}.jpg").write_bytes(blob)
            metadata.write(json.dumps({"file_name": f"{i:03d}.jpg", "text": "a red square"}) + "\n")
    return ["--train_data_dir", str(folder), "--on_bad_image", "fail"]


def _vae_random_dir(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "random").mkdir()
    (tmp / "random" / "notes.txt").write_text("not a model")
    return ["--vae_name", str(tmp / "random")]


def _output_under_file(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "a_file").write_text("x")  # root ignores chmod; a path below a regular file cannot be created
    return ["--output_dir", str(tmp / "a_file" / "out")]


def _output_is_file(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "out.txt").write_text("x")
    return ["--output_dir", str(tmp / "out.txt")]


def _patched(patch: Callable[[pytest.MonkeyPatch], None], flags: list[str]) -> Callable[[Path, Any, pytest.MonkeyPatch], list[str]]:
    def build(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
        patch(mp)
        return flags

    return build


def _unreachable_hub(mp: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT pointing at a local port nobody listens on (what HF_ENDPOINT sets when huggingface_hub is
    imported): the Hub cannot be reached, whatever network this machine has."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")


def _mkdir(name: str, flag: str) -> Callable[[Path, Any, pytest.MonkeyPatch], list[str]]:
    def build(tmp: Path, assets: Any, mp: pytest.MonkeyPatch) -> list[str]:
        (tmp / name).mkdir()
        return [flag, str(tmp / name)]

    return build


CASES = [
    # dataset location and shape
    Case("dataset_missing", lambda tmp, a, mp: ["--dataset_name", str(tmp / "nope")], r"^--dataset_name \S+/nope: no such directory$"),
    Case("dataset_empty_dir", _mkdir("empty", "--dataset_name"), r"^--dataset_name \S+/empty has no data: expected data files"),
    Case("train_data_dir_missing", lambda tmp, a, mp: ["--train_data_dir", str(tmp / "nope")], r"^--train_data_dir \S+/nope: no such directory$"),
    Case("train_data_dir_empty", _mkdir("empty", "--train_data_dir"), r"^--train_data_dir \S+/empty has no data: expected images and a metadata.jsonl"),
    Case("caption_column_absent", lambda tmp, a, mp: [*_dataset("ds")(tmp, a, mp), "--caption_column", "txt"],
         r"^dataset \S+/ds has no column 'txt' \(--caption_column\); columns: image, text$"),
    Case("image_column_absent", lambda tmp, a, mp: [*_dataset("ds")(tmp, a, mp), "--image_column", "img"],
         r"^dataset \S+/ds has no column 'img' \(--image_column\); columns: image, text$"),
    Case("embedded_dataset_column_absent", lambda tmp, a, mp: ["--caption_column", "caption"],
         r"^the embedded dataset has no column 'caption' \(--caption_column\); columns: image, text$"),
    Case("image_column_not_images", lambda tmp, a, mp: [*_dataset("ds")(tmp, a, mp), "--image_column", "text"],
         r"^dataset \S+/ds: column 'text' \(--image_column\) holds string, expected images$"),
    Case("no_rows", lambda tmp, a, mp: ["--dataset_name", str(shapes_dataset(tmp / "zero", captions=[]))], r"^dataset \S+/zero has no rows$"),
    Case("max_train_samples_zero", lambda tmp, a, mp: [*_dataset("ds")(tmp, a, mp), "--max_train_samples", "0"],
         r"^--max_train_samples 0: expected at least 1 \(0 leaves no rows to train on\)$"),
    # captions
    Case("caption_none", _dataset("ds", captions=["a red square", None, "a red circle"]),
         r"^dataset \S+/ds: caption column 'text' is missing \(None\) in 1 of 3 rows: 1; give every row a caption"),
    Case("caption_empty_list", lambda tmp, a, mp: _list_captions(tmp, a, mp, [["a", "b"], ["c"], []]),
         r"^dataset \S+/lists: caption column 'text' is an empty list in 1 of 3 rows: 2;"),
    Case("caption_list_with_none", lambda tmp, a, mp: _list_captions(tmp, a, mp, [["a", None], ["c"], ["d"]]),
         r"^dataset \S+/lists: caption column 'text' has None inside the caption lists of rows 0$"),
    Case("caption_not_text", lambda tmp, a, mp: [
        "--dataset_name", str(write_parquet(tmp / "ints", {"image": [rgb_png()], "label": [3]}, _int_features())), "--caption_column", "label"],
         r"^dataset \S+/ints: caption column 'label' \(--caption_column\) holds int64, expected strings or lists of strings$"),
    # flags
    Case("resolution_not_multiple_of_8", lambda tmp, a, mp: ["--resolution", "100"], r"^--resolution 100 is not a positive multiple of 8"),
    Case("fp16_on_cpu", _patched(_device("cpu"), ["--mixed_precision", "fp16"]), r"^--mixed_precision fp16: fp16 needs a GPU or NPU and this run trains on the cpu"),
    Case("bf16_unsupported", _patched(_device("cuda", bf16=False), ["--mixed_precision", "bf16"]),
         r"^--mixed_precision bf16: this cuda device does not support bfloat16"),
    Case("output_dir_under_a_file", _output_under_file, r"^--output_dir \S+/a_file/out cannot be created: \S+/a_file is a file, not a directory$"),
    Case("output_dir_is_a_file", _output_is_file, r"^--output_dir \S+/out.txt exists and is not a directory$"),
    Case("resume_missing", lambda tmp, a, mp: ["--resume_from_checkpoint", "checkpoint-7"],
         r"^--resume_from_checkpoint checkpoint-7 does not exist \(no checkpoints in \S+/out\)$"),
    Case("xformers_off_cuda", _patched(_device("cpu"), ["--enable_xformers_memory_efficient_attention"]),
         r"^--enable_xformers_memory_efficient_attention needs a CUDA GPU \(xformers' attention is GPU-only\); this run trains on the cpu$"),
    # --push_to_hub: the Hub is checked before anything loads
    Case("push_to_hub_unreachable", _patched(_unreachable_hub, ["--push_to_hub"]),
         r"^--push_to_hub: cannot reach the Hub at http://127.0.0.1:\d+ \(\w*Error: .*\); check the network"),
    Case("push_to_hub_offline", _patched(lambda mp: mp.setenv("HF_HUB_OFFLINE", "1"), ["--push_to_hub"]),
         r"^--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded"),
    Case("hub_model_id_without_push_to_hub", lambda tmp, a, mp: ["--hub_model_id", "me/lora"],
         r"^--hub_model_id me/lora without --push_to_hub uploads nothing: add --push_to_hub or leave it out$"),
    Case("hub_model_id_invalid", lambda tmp, a, mp: ["--push_to_hub", "--hub_model_id", "me/lora/v2"],
         r"^--hub_model_id: 'me/lora/v2' is not a Hub repository id \("),
    # model folders
    Case("model_missing", lambda tmp, a, mp: ["--pretrained_model_name_or_path", str(tmp / "nope")],
         r"^--pretrained_model_name_or_path \S+/nope: no such directory$"),
    Case("model_without_unet", lambda tmp, a, mp: ["--pretrained_model_name_or_path", str(model_without(tmp, a, "unet"))],
         r"^--pretrained_model_name_or_path \S+/model_without_unet has no unet/ folder \(an SDXL pipeline in diffusers layout has unet/, vae/"),
    Case("model_without_text_encoder_2", lambda tmp, a, mp: ["--pretrained_model_name_or_path", str(model_without(tmp, a, "text_encoder_2"))],
         r"^--pretrained_model_name_or_path \S+ has no text_encoder_2/ folder"),
    Case("vae_is_a_unet", lambda tmp, a, mp: ["--vae_name", str(a.model_dir / "unet")],
         r"^--vae_name \S+/unet is not a VAE: its config.json has _class_name 'UNet2DConditionModel', expected 'AutoencoderKL'$"),
    Case("vae_is_a_random_dir", _vae_random_dir, r"^--vae_name \S+/random is not a VAE: it has no config.json"),
    Case("vae_is_a_pipeline", lambda tmp, a, mp: ["--vae_name", str(a.model_dir)], r"^--vae_name \S+ is a whole pipeline, not a VAE: pass \S+/vae$"),
    # images: only found while reading them
    Case("corrupt_image_fail", _bad_image_parquet,
         r"^\S+/corrupt: row 1: not an image PIL can read \(unknown format or corrupt header\) \(--on_bad_image fail;", at_runtime=True),
    Case("truncated_jpeg_fail", _bad_image_folder, r"^\S+/folder: row 1 \(\S+/001.jpg\): image file is truncated", at_runtime=True),
    Case("every_image_corrupt_skip", lambda tmp, a, mp: [
        "--dataset_name", str(write_parquet(tmp / "allbad", {"image": [CORRUPT, b"", CORRUPT], "text": ["a", "b", "c"]}))],
         r"^\S+/allbad: no image in its 3 rows can be read \(last: \S+/allbad: row \d: not an image PIL can read", at_runtime=True),
]


def _int_features() -> dict[str, Any]:
    from datasets import Image as ImageFeature
    from datasets import Value

    return {"image": ImageFeature(), "label": Value("int64")}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: Case, tmp_path: Path, assets: Any, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # The embedded model by name: a dataset alone is refused (test_dataset_without_model_is_refused); the
    # model cases below override it (the last flag wins).
    base = ["--pretrained_model_name_or_path", "embedded", "--output_dir", str(out), "--cache_dir", str(hf_cache), "--report_to", "none", "--resolution", "64",
            "--max_train_steps", "2", "--train_batch_size", "2", "--num_validation_images", "0"]  # fmt: skip
    argv = base + case.build(tmp_path, assets, monkeypatch)  # later flags win
    before = files_under(tmp_path)

    from trainer import models

    loaded = []  # preflight errors come before any model is loaded
    load_components = models.load_components
    monkeypatch.setattr(models, "load_components", lambda *a, **k: loaded.append(1) or load_components(*a, **k))
    status, stderr = run_cli(argv)

    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == EXIT_INPUT_ERROR, stderr
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert re.search(case.message, errors[0].removeprefix("error: ")), errors[0]
    if case.at_runtime:
        # Found mid-run: the output directory may have been created, but holds no file (the run's lock,
        # released and empty, aside: trainer.ownership).
        assert not [p for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    else:
        assert files_under(tmp_path) == before, "preflight wrote something"
        assert not loaded, f"{case.name}: the model was loaded before the error"


@pytest.mark.parametrize("token", ["revoked", "none"])
def test_push_to_hub_without_a_token_the_hub_accepts_is_one_line(
    token: str, tmp_path: Path, assets: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub is reachable (a local stand-in, tests/trainer/fake_hub.py) but the token is refused, or there
    is none: exit 2 before anything loads or is written."""
    from huggingface_hub import constants

    from tests.trainer.fake_hub import BAD_TOKEN, fake_hub

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))  # no `hf auth login` token either
    flags = ["--hub_token", BAD_TOKEN] if token == "revoked" else []
    out = tmp_path / "out"
    with fake_hub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        status, stderr = run_cli(["--push_to_hub", *flags, "--output_dir", str(out), "--report_to", "none"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == EXIT_INPUT_ERROR and len(errors) == 1 and "Traceback" not in stderr, stderr
    expected = r"the Hub at \S+ refused the token \(.+\)$" if token == "revoked" else r"needs a Hugging Face token with write access"
    assert re.search(rf"^error: --push_to_hub:? {expected}", errors[0]), errors[0]
    assert "POST /api/repos/create" not in hub.requests and not out.exists()


def test_main_raises_input_error_and_the_cli_runs_as_a_subprocess(tmp_path: Path) -> None:
    """``main(argv)`` raises (for callers); ``python -m trainer.sdxl_lora`` prints one line, exits 2."""
    from trainer.sdxl_lora import main

    with pytest.raises(InputError, match=r"^--resolution 100 is not a positive multiple of 8"):
        try:
            main(["--resolution", "100", "--output_dir", str(tmp_path / "out")])
        finally:
            _reset_accelerate()

    result = subprocess.run(
        [sys.executable, "-m", "trainer.sdxl_lora", "--resolution", "100", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --resolution 100 is not a positive multiple of 8 (e.g. 96)"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- image modes: not errors
def _sixteen_bit(values: list[int]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.uint16))  # mode I;16


def _palette(transparent_index: int | None = None) -> Image.Image:
    """Two pixels, palette colours 0 and 1; ``transparent_index`` makes one of them transparent (tRNS)."""
    image = Image.new("P", (2, 1))
    image.putpalette([10, 200, 30, 250, 5, 5])
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


# (name, image file bytes, mode PIL decodes it as, expected RGB of each pixel of the first row)
MODE_CASES = [
    ("grayscale_L", encoded(Image.new("L", (2, 1), 77)), "L", [(77, 77, 77)] * 2),
    ("bilevel_1", encoded(Image.new("1", (2, 1), 1)), "1", [(255, 255, 255)] * 2),
    ("palette_P", encoded(_palette()), "P", [(10, 200, 30), (250, 5, 5)]),
    ("palette_transparent", encoded(_palette(transparent_index=1)), "P", [(10, 200, 30), (255, 255, 255)]),
    ("rgba_transparent", encoded(Image.new("RGBA", (2, 1), (10, 20, 30, 0))), "RGBA", [(255, 255, 255)] * 2),
    ("rgba_half", encoded(Image.new("RGBA", (2, 1), (200, 0, 0, 128))), "RGBA", [(227, 127, 127)] * 2),
    ("rgba_opaque", encoded(Image.new("RGBA", (2, 1), (1, 2, 3, 255))), "RGBA", [(1, 2, 3)] * 2),
    ("gray_alpha_LA", encoded(Image.new("LA", (2, 1), (50, 0))), "LA", [(255, 255, 255)] * 2),
    ("cmyk_tiff", encoded(Image.new("CMYK", (2, 1), (0, 255, 0, 0)), "TIFF"), "CMYK", [(255, 0, 255)] * 2),
    ("sixteen_bit_png", encoded(_sixteen_bit([65535, 257, 32896, 0])), "I;16", [(255,) * 3, (1,) * 3, (128,) * 3, (0,) * 3]),
    ("sixteen_bit_tiff", encoded(_sixteen_bit([65535, 0]), "TIFF"), "I;16", [(255,) * 3, (0,) * 3]),
    ("rgb_jpeg", encoded(Image.new("RGB", (8, 8), (0, 0, 255)), "JPEG", quality=100), "RGB", None),
]


@pytest.mark.parametrize("name,blob,mode,expected", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_image_mode_becomes_the_right_rgb(name: str, blob: bytes, mode: str, expected: list | None) -> None:
    decoded = data.decode_image({"bytes": blob, "path": None})
    assert decoded.mode == mode
    rgb = data.to_rgb(decoded)
    assert rgb.mode == "RGB" and rgb.size == decoded.size
    pixels = [rgb.getpixel((x, 0)) for x in range(rgb.width)]
    if expected is None:  # lossy or quantised: compare with the source colour
        reference = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=int)
        assert np.abs(np.asarray(rgb, dtype=int) - reference).max() <= 2
    else:
        assert [tuple(int(c) for c in p) for p in pixels] == [tuple(e) for e in expected], name


def test_sixteen_bit_through_the_training_transform() -> None:
    """16-bit white is +1 and 16-bit mid-grey 0.0 in the pixel tensor (PIL's convert would make both white)."""
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[:, 4:] = 32896  # 128 in 8 bits
    decoded = data.decode_image({"bytes": encoded(Image.fromarray(values)), "path": None})
    pre = data.SDXLPreprocessor(None, None, "image", "text", resolution=8, center_crop=True)
    pixels = pre.transform_image(decoded)[0]
    assert pixels.shape == (3, 8, 8)
    assert float(pixels[:, :, :4].min()) == 1.0
    assert abs(float(pixels[:, :, 4:].mean()) - (128 / 255 * 2 - 1)) < 1e-6


@pytest.mark.parametrize(
    "name,value,reason",
    [
        ("corrupt_bytes", {"bytes": CORRUPT, "path": None}, "not an image PIL can read"),
        ("empty_bytes", {"bytes": b"", "path": None}, "not an image PIL can read"),
        ("truncated_png", {"bytes": truncated(encoded(Image.effect_noise((64, 64), 50))), "path": None}, "truncated"),
        ("truncated_jpeg", {"bytes": truncated(encoded(Image.new("RGB", (64, 64)), "JPEG")), "path": None}, "truncated"),
        ("missing_file", {"bytes": None, "path": "/nonexistent/x.png"}, "file not found"),
        ("null", None, "no image"),
    ],
)
def test_unreadable_images_raise_bad_image_error(name: str, value: Any, reason: str) -> None:
    with pytest.raises(data.BadImageError, match=reason):
        data.decode_image(value)


# ----------------------------------------------------------------------------- captions: what is accepted
@pytest.mark.parametrize(
    "caption,is_train,expected",
    [
        ("a red circle", True, {"a red circle"}),
        ("", True, {""}),  # allowed: that image trains unconditionally
        (["one", "two", "three"], True, {"one", "two", "three"}),  # random.choice while training, as diffusers
        (["one", "two"], False, {"one"}),
        (np.array(["x", "y"]), True, {"x", "y"}),
    ],
)
def test_accepted_captions(caption: Any, is_train: bool, expected: set[str]) -> None:
    random.seed(0)
    picks = {data.pick_caption(caption, is_train, "row 0") for _ in range(30)}
    assert picks == expected


@pytest.mark.parametrize(
    "caption,message",
    [(None, r"row 4 is missing \(None\)"), ([], r"row 4 is an empty list"), (3, r"row 4 should contain either strings or lists of strings")],
)
def test_refused_captions_name_the_row(caption: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        data.pick_caption(caption, True, "row 4")


# ----------------------------------------------------------------------------- bad images skipped and counted
def test_bad_images_are_skipped_counted_and_modes_converted_in_a_real_run(
    tmp_path: Path, assets: Any, hf_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Default --on_bad_image skip, through a DataLoader worker: every row is visited in the one epoch,
    the two bad ones are replaced, warned about and counted; the odd modes and captions train."""
    images = [
        rgb_png(),
        CORRUPT,
        encoded(_sixteen_bit([65535] * 64)),
        truncated(encoded(Image.new("RGB", (64, 64)), "JPEG")),
        encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 0))),
        encoded(Image.new("CMYK", (64, 64), (0, 255, 0, 0)), "TIFF"),
    ]
    captions = ["a red square", "a blue circle", "", "a green square", "a white square", "a yellow circle"]
    root = write_parquet(tmp_path / "mixed", {"image": images, "text": captions})
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "embedded", "--dataset_name", str(root), "--output_dir", str(out),
            "--cache_dir", str(hf_cache), "--report_to", "none", "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "3", "--num_validation_images", "0", "--dataloader_num_workers", "1"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        status, stderr = run_cli(argv)
    assert status == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["bad_images_skipped"] == 2
    assert [p.startswith(f"{root}: row {row}: ") for p, row in zip(summary["bad_images"], (1, 3))] == [True, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("skipped unreadable image" in w for w in warnings) == 2
    assert any("2 unreadable image(s) skipped" in w for w in warnings)


def test_on_bad_image_flag_defaults_to_skip() -> None:
    from trainer.args import build_parser, parse_args

    assert parse_args([]).on_bad_image == "skip"
    assert parse_args(["--on_bad_image", "fail"]).on_bad_image == "fail"
    help_text = " ".join(build_parser().format_help().split())
    block = help_text.rsplit("--on_bad_image {skip,fail}", 1)[1].split(" --")[0]  # the help entry, not the usage
    assert "(default: skip)" in block
