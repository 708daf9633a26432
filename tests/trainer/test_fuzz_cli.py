"""Fuzzing the real CLI with what users actually type (issue 26): model folders, datasets, numeric and
choice flags, output folders, resume, signals and the environment.

Every case asserts what a user sees: the exit status, exactly one ``error:`` line naming the problem, no
traceback, and that nothing saved before changed (sha256 and mtime of every file of a finished run).
Cases that preflight refuses run ``trainer.sdxl_lora.cli`` in-process (it exits before loading anything:
milliseconds each); the few that need training share one finished tiny run; only what needs a second
process (a run holding the folder, Ctrl-C before training) starts one. The table of cases per family
is in docs/training.md ("Bad inputs").
"""
from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.trainer.finished_run import RUN, FinishedRun
from tests.trainer.runs import LORA_FILE, TINY, BackgroundRun, file_digests, summary
from tests.trainer.test_bad_inputs import run_cli, shapes_dataset
from trainer import checkpointing, ownership
from trainer.hooks import TrainingHooks


@pytest.fixture(scope="module")
def cache(assets: Any, assets_cache: Path) -> Path:
    return assets_cache


@pytest.fixture(autouse=True)
def _asset_cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPU_KERNELS_CACHE", str(cache))


@pytest.fixture(scope="module")
def finished(finished_run: FinishedRun) -> Path:
    """The session's finished tiny run (tests/trainer/finished_run.py): LoRA, its kohya copy, summary,
    checkpoint-2 and checkpoint-4 (the cases check it never changes); its upload failed at the end."""
    assert finished_run.returncode == 3, finished_run.stderr[-3000:]
    return finished_run.dir


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line]


def assert_one_line(status: int, stderr: str, expected_status: int, pattern: str) -> str:
    import re

    assert "Traceback" not in stderr, stderr[-3000:]
    # A process that ends by the signal itself (Popen's -N) exits N + 128 to the shell, as the trainer's 130/143.
    shell_status = 128 - status if status < 0 else status
    assert shell_status == expected_status, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def cli_or_argparse(argv: list[str]) -> tuple[int, str]:
    """``run_cli``, with argparse's own refusals (SystemExit 2, usage + ``prog: error: ...``) as a status."""
    import contextlib
    import io

    from trainer.args import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0), err.getvalue()
    return run_cli(argv)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    family: str
    name: str
    argv: Callable[[Path, Path, Any], list[str]]  # (tmp, finished run, assets) -> flags
    pattern: str
    status: int = 2
    env: tuple[tuple[str, str], ...] = ()


def _flags(*flags: str) -> Callable[[Path, Path, Any], list[str]]:
    return lambda tmp, done, assets: [*RUN, *flags, "--output_dir", str(tmp / "out")]


def _into_finished(*flags: str) -> Callable[[Path, Path, Any], list[str]]:
    return lambda tmp, done, assets: [*RUN, *flags, "--output_dir", str(done)]


def _model_with_own_unet(tmp: Path, assets: Any, linked: Callable[[str], bool]) -> Path:
    """The embedded pipeline as symlinks, but for a ``unet/`` folder whose files are linked where
    ``linked(name)`` and copied otherwise (the case then edits its copies)."""
    model = tmp / "model"
    (model / "unet").mkdir(parents=True)
    for part in assets.model_dir.iterdir():
        if part.name != "unet":
            (model / part.name).symlink_to(part)
    for part in (assets.model_dir / "unet").iterdir():
        if linked(part.name):
            (model / "unet" / part.name).symlink_to(part)
        else:
            shutil.copy(part, model / "unet" / part.name)
    return model


def _truncated_unet(tmp: Path, done: Path, assets: Any) -> list[str]:
    model = _model_with_own_unet(tmp, assets, lambda name: False)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    return [*RUN, "--pretrained_model_name_or_path", str(model), "--dataset_name", "embedded", "--output_dir", str(tmp / "out")]


def _unet_config_of_another_model(tmp: Path, done: Path, assets: Any) -> list[str]:
    model = _model_with_own_unet(tmp, assets, lambda name: name != "config.json")
    config = json.loads((model / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = int(config["cross_attention_dim"]) * 2  # another text encoder's width
    (model / "unet" / "config.json").write_text(json.dumps(config))
    return [*RUN, "--pretrained_model_name_or_path", str(model), "--dataset_name", "embedded", "--output_dir", str(tmp / "out")]


def _dataset(tmp: Path, done: Path, assets: Any, *flags: str) -> list[str]:
    return [*RUN, "--pretrained_model_name_or_path", "embedded", "--dataset_name", str(shapes_dataset(tmp / "ds")),
            *flags, "--output_dir", str(tmp / "out")]  # fmt: skip


def _damaged_checkpoint(tmp: Path, done: Path, assets: Any) -> list[str]:
    out = tmp / "copy"
    shutil.copytree(done, out)
    optimizer = out / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    return [*RUN, "--resume_from_checkpoint", "checkpoint-4", "--output_dir", str(out)]


def _locked_by_another_host(tmp: Path, done: Path, assets: Any) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    owner = {"host": "node-17-" + socket.gethostname(), "pid": 4242, "started": "2026-01-01 00:00:00"}
    (out / ownership.LOCK_FILE).write_text(json.dumps(owner))
    return [*RUN, "--output_dir", str(out)]


NUMBERS = [
    ("train_batch_size", "0"), ("train_batch_size", "-1"), ("max_train_steps", "0"), ("max_train_steps", "-3"),
    ("num_train_epochs", "0"), ("learning_rate", "-0.0001"), ("learning_rate", "nan"), ("learning_rate", "inf"),
    ("rank", "0"), ("gradient_accumulation_steps", "0"), ("checkpointing_steps", "0"), ("checkpoints_total_limit", "0"),
    ("lr_warmup_steps", "-1"), ("max_grad_norm", "0"), ("adam_beta1", "1"), ("adam_beta2", "-0.5"), ("adam_epsilon", "0"),
    ("adam_weight_decay", "-1"), ("snr_gamma", "-5"), ("noise_offset", "-0.1"), ("validation_inference_steps", "0"),
    ("num_validation_images", "-1"), ("validation_epochs", "0"), ("dataloader_num_workers", "-2"), ("logging_steps", "0"),
    ("max_nonfinite_steps", "0"), ("max_train_samples", "0"),
]  # fmt: skip

CASES: list[Case] = [
    # model
    Case("model", "missing_folder", lambda t, d, a: [*RUN, "--pretrained_model_name_or_path", str(t / "nope"), "--dataset_name", "embedded",
                                                     "--output_dir", str(t / "out")],
         r"--pretrained_model_name_or_path \S+nope: no such directory"),
    Case("model", "truncated_weights", _truncated_unet, r"unet/\S+\.safetensors cannot be loaded \(.*truncated"),
    Case("model", "config_does_not_match_weights", _unet_config_of_another_model, r"unet/config.json does not match its weights \(\S+: the config builds \["),
    Case("model", "hub_id_offline", lambda t, d, a: [*RUN, "--pretrained_model_name_or_path", "someone/not-cached-sdxl", "--dataset_name", "embedded",
         "--output_dir", str(t / "out")], r"--pretrained_model_name_or_path someone/not-cached-sdxl is a hub id, HF_HUB_OFFLINE",
         env=(("HF_HUB_OFFLINE", "1"),)),
    Case("model", "vae_is_a_unet", lambda t, d, a: [*RUN, "--vae_name", str(a.model_dir / "unet"), "--output_dir", str(t / "out")],
         r"--vae_name \S+ is not a VAE"),
    Case("model", "empty_name", lambda t, d, a: [*RUN, "--pretrained_model_name_or_path", "", "--dataset_name", "embedded"],
         r"--pretrained_model_name_or_path is empty"),
    # dataset
    Case("dataset", "missing_folder", lambda t, d, a: [*RUN, "--pretrained_model_name_or_path", "embedded", "--dataset_name", str(t / "none"),
                                                       "--output_dir", str(t / "out")],
         r"--dataset_name \S+none: no such directory"),
    Case("dataset", "wrong_image_column", lambda t, d, a: _dataset(t, d, a, "--image_column", "img"), r"has no column 'img' \(--image_column\)"),
    Case("dataset", "caption_column_is_images", lambda t, d, a: _dataset(t, d, a, "--caption_column", "image"), r"caption column 'image'"),
    # numeric and choice flags
    *[Case("numeric flags", f"{flag}={value}", _flags(f"--{flag}", value), rf"^error: --{flag} {value}: expected ") for flag, value in NUMBERS],
    Case("numeric flags", "resolution_not_multiple_of_8", _flags("--resolution", "30"), r"--resolution 30 is not a positive multiple of 8"),
    Case("numeric flags", "batch_size_not_a_number", _flags("--train_batch_size", "two"), r"argument --train_batch_size: invalid int value"),
    Case("numeric flags", "lr_scheduler_unknown", _flags("--lr_scheduler", "cosinus"), r"--lr_scheduler 'cosinus': expected one of linear, cosine"),
    Case("numeric flags", "prediction_type_unknown", _flags("--prediction_type", "x0"), r"--prediction_type 'x0': expected one of epsilon"),
    Case("numeric flags", "tracker_unknown", _flags("--report_to", "mlflow"), r"--report_to 'mlflow': expected one of"),
    Case("numeric flags", "mixed_precision_unknown", _flags("--mixed_precision", "fp8"), r"argument --mixed_precision: invalid choice"),
    # output folder
    Case("output folder", "holds_a_finished_run", _into_finished(), r"holds the results of another run \(pytorch_lora_weights.safetensors, summary.json, checkpoint-2, checkpoint-4\)"),
    Case("output folder", "is_a_file", lambda t, d, a: [*RUN, "--output_dir", str(d / "summary.json")], r"--output_dir \S+summary.json exists and is not a directory"),
    Case("output folder", "empty_string", lambda t, d, a: [*RUN, "--output_dir", ""], r"--output_dir is empty"),
    Case("output folder", "locked_by_a_run_on_another_host", _locked_by_another_host, r"is in use by another run \(node-17-"),
    # resume
    Case("resume", "missing_checkpoint", _into_finished("--resume_from_checkpoint", "checkpoint-99"), r"--resume_from_checkpoint checkpoint-99 does not exist \(checkpoints in \S+: checkpoint-2, checkpoint-4\)"),
    Case("resume", "latest_of_another_rank", _into_finished("--resume_from_checkpoint", "latest", "--rank", "4"),
         r"latest: checkpoint-4 .* is of another run configuration \(--rank 8 -> 4\)"),
    Case("resume", "latest_of_another_learning_rate", _into_finished("--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"),
         r"another run configuration \(--learning_rate 0.005 -> 0.001\)"),
    Case("resume", "damaged_checkpoint_by_name", _damaged_checkpoint, r"checkpoint-4 cannot be resumed from \(optimizer.bin is damaged"),
    # environment
    Case("environment", "accelerate_fp16_on_cpu", _flags(), r"ACCELERATE_MIXED_PRECISION=fp16 .*fp16 needs a GPU or NPU", env=(("ACCELERATE_MIXED_PRECISION", "fp16"),)),
]  # fmt: skip
if importlib.util.find_spec("wandb") is None:
    CASES.append(Case("numeric flags", "tracker_not_installed", _flags("--report_to", "wandb"), r"--report_to wandb: the wandb library is not installed"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}:{c.name}" for c in CASES])
def test_refused_before_anything_loads(case: Case, tmp_path: Path, finished: Path, assets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    argv = case.argv(tmp_path, finished, assets)
    before, before_tmp = file_digests(finished), file_digests(tmp_path)
    started = time.perf_counter()
    status, stderr = cli_or_argparse(argv)
    assert_one_line(status, stderr, case.status, case.pattern)
    assert file_digests(finished) == before, "the finished run changed"
    assert file_digests(tmp_path) == before_tmp, "the refused run wrote something"
    assert time.perf_counter() - started < 60, "refused only after loading"  # a generous bound, not a timing claim


# ----------------------------------------------------------------------------- runs that train
def test_images_per_second_counts_the_images_of_partial_batches(finished: Path) -> None:
    """5 images in batches of 2 for 4 steps: 2 + 2 + 1 (partial) + 2 = 7 images, not 4 x 2."""
    result = summary(finished)
    assert result["images_measured"] == 7 and result["steps_measured"] == 4
    assert math.isclose(result["fps"], result["images_measured"] / result["seconds_measured"], rel_tol=1e-12)


def test_a_second_run_on_a_running_folder_stops_and_ctrl_c_before_training_is_one_line(tmp_path: Path, cache: Path) -> None:
    """Two processes started together (their start-up is most of the time): one holds its folder, paused in
    step 2, while a second run on that folder is refused; the other gets Ctrl-C while its models load."""
    held, early = tmp_path / "held", tmp_path / "early"
    first = BackgroundRun([*TINY, "--output_dir", str(held)], cache, tmp_path / "logs_held", faults=["--pause_at_step", "2"])
    loading = BackgroundRun([*TINY, "--output_dir", str(early)], cache, tmp_path / "logs_early",
                            faults=["--pause_before_models_load"])
    try:
        # Paused where the models load (waiting for a log line instead raced a fast load on a busy machine: the
        # run had finished when the signal came).
        loading.wait_for_hook()
        loading.send(signal.SIGINT)
        assert_one_line(loading.wait(), loading.stderr(), 130, r"^error: interrupted by Ctrl-C \(SIGINT\)")
        assert not (early / LORA_FILE).exists() and not checkpointing.list_checkpoints(early)

        first.wait_for_hook()
        status, stderr = run_cli([*TINY, "--output_dir", str(held)])
        assert_one_line(status, stderr, 2, rf"is in use by another run \({socket.gethostname()} pid {first.process.pid},")
    finally:
        first.kill()
        if loading.process.poll() is None:
            loading.kill()


def test_latest_falls_back_past_a_damaged_checkpoint(tmp_path: Path, finished: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    lora = out / "checkpoint-4" / LORA_FILE
    lora.write_bytes(lora.read_bytes()[:-64])  # cut short: the header promises more data than there is
    with caplog.at_level(logging.WARNING, logger="trainer.checkpointing"):
        status, stderr = run_cli([*RUN, "--resume_from_checkpoint", "latest", "--output_dir", str(out)])
    assert status == 0 and "Traceback" not in stderr, stderr[-3000:]
    skipped = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0] and "damaged" in skipped[0] and "truncated" in skipped[0]
    assert summary(out)["resumed_from"].endswith("checkpoint-2")


class _DiskFullAt(TrainingHooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def inside_checkpoint_write(self, step: int, directory: Path) -> None:
        if step == self.step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "optimizer.bin"))


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoints(tmp_path: Path) -> None:
    from trainer.sdxl_lora import cli

    out = tmp_path / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli([*RUN, "--output_dir", str(out)], hooks=_DiskFullAt(4))
    line = assert_one_line(status, err.getvalue(), 1, rf"^error: No space left to write checkpoint-4 in {out} \(\d+\.\d MiB free\)")
    assert "earlier checkpoints are kept" in line
    assert checkpointing.list_checkpoints(out) == ["checkpoint-2"] and checkpointing.damage(out / "checkpoint-2") is None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")], "a .partial was left"


def test_failing_optional_step_keeps_the_results_and_exits_3(
    tmp_path: Path, finished: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--overwrite_output_dir replaces a finished run (its checkpoints go first; its kohya file, with no
    --output_kohya_format now, too); the final images then fail: the new LoRA and summary are already
    saved. Tiny images (64 px) at --resolution 128: said once."""
    import trainer.sdxl_lora

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    old_summary = (out / "summary.json").read_bytes()

    def broken_final_inference(*args: Any) -> list[str]:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(trainer.sdxl_lora, "final_inference", broken_final_inference)
    with caplog.at_level(logging.WARNING):
        status, stderr = run_cli([*RUN, "--max_train_steps", "1", "--resolution", "128", "--overwrite_output_dir", "--output_dir", str(out)])
    assert_one_line(status, stderr, 3, r"^error: final validation images failed: division by zero \(the LoRA and summary.json are saved in ")
    assert (out / LORA_FILE).is_file() and (out / "summary.json").read_bytes() != old_summary
    assert not (out / checkpointing.KOHYA_LORA_FILE).exists()  # the old run's kohya copy: it no longer matched
    assert summary(out)["last_step"] == 1 and checkpointing.list_checkpoints(out) == []
    upscaled = [r for r in caplog.records if "are upscaled to it" in r.getMessage()]
    assert len(upscaled) == 1 and "--resolution 128" in upscaled[0].getMessage()


def test_a_failed_upload_keeps_the_finished_run_and_exits_3(finished_run: FinishedRun) -> None:
    """--push_to_hub to a Hub that refuses the upload (tests/trainer/fake_hub.py): preflight reached it and
    had the token accepted before training; the upload, after the final save, fails in one line, exit 3,
    and the LoRA, its kohya copy, the summary and the checkpoints stay."""
    from tests.trainer.fake_hub import REFUSAL
    from tests.trainer.finished_run import HUB_REPO

    assert_one_line(
        finished_run.returncode, finished_run.stderr, 3,
        rf"^error: upload to the hub failed: .*{REFUSAL}.* \(the LoRA and summary.json are saved in {finished_run.dir}\)$",
    )  # fmt: skip
    requests = finished_run.hub_requests
    asked = [r for r in requests if r in ("GET /api/whoami-v2", "POST /api/repos/create")]
    assert asked == ["GET /api/whoami-v2", "POST /api/repos/create"], requests  # the token checked, then the repo made
    assert any(f"/{HUB_REPO}/" in r and "/resolve/" not in r for r in requests), requests  # the upload was attempted
    done = finished_run.dir
    assert {LORA_FILE, checkpointing.KOHYA_LORA_FILE, "summary.json"} <= {p.name for p in done.iterdir()}
    assert checkpointing.list_checkpoints(done) == ["checkpoint-2", "checkpoint-4"]
    assert summary(done)["last_step"] == 4 and summary(done)["interrupted"] is None


def test_a_checkpoint_of_another_rank_without_its_run_record_is_one_line(tmp_path: Path, finished: Path) -> None:
    """A checkpoint that predates run records (or comes from diffusers' script) cannot be told apart in
    advance: its load fails with pages of "size mismatch", reported as one line."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for checkpoint in checkpointing.list_checkpoints(out):
        state_file = out / checkpoint / checkpointing.STATE_FILE
        state = json.loads(state_file.read_text())
        del state["run"]
        state_file.write_text(json.dumps(state))
    before = file_digests(out)
    status, stderr = run_cli([*RUN, "--resume_from_checkpoint", "latest", "--rank", "4", "--output_dir", str(out)])
    assert_one_line(status, stderr, 2, r"^error: Checkpoint \S+checkpoint-4 does not fit this run \(.*size mismatch")
    assert file_digests(out) == before
