"""Interrupted training and numerical faults lose nothing.

Subprocess runs of ``python -m trainer.sdxl_lora`` (tiny embedded model, 6 steps, a checkpoint every 2)
are killed with SIGKILL in the middle of a step and in the middle of a checkpoint write, stopped with
SIGTERM/SIGINT, or fed a NaN loss; the test-only entry point ``tests.trainer.fault_entry`` runs them with
hooks (``trainer.hooks``) that pause them at the exact point.
Resumed runs must end at the LoRA weights of the uninterrupted run, bit for bit.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.trainer.runs import LORA_FILE, TINY, BackgroundRun, file_digests, lora_bytes, run_trainer, summary
from trainer import atomic, checkpointing
from trainer.embedded_default import ensure_assets

EVERY_2 = [*TINY, "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def cache(assets_cache: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        ensure_assets()  # generated once, before subprocesses look for it
    return assets_cache


@pytest.fixture(scope="module")
def reference(uninterrupted_run: Path, cache: Path) -> Path:
    """The uninterrupted run every interrupted one is compared with: the same flags, run once in-process for
    this file and test_scale (tests/trainer/conftest.py; its checkpoint limit changes no weight)."""
    return uninterrupted_run


def _resume(out: Path, cache: Path) -> dict:
    result = run_trainer([*EVERY_2, "--resume_from_checkpoint", "latest", "--output_dir", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return summary(out)


def test_sigkill_mid_step_then_resume_reaches_the_uninterrupted_weights(tmp_path: Path, cache: Path, reference: Path) -> None:
    out = tmp_path / "out"
    run = BackgroundRun([*EVERY_2, "--output_dir", str(out)], cache, tmp_path / "logs", faults=["--pause_at_step", "5"])
    assert "paused in optimizer step 5" in run.wait_for_hook()
    run.kill()  # after backward of step 5, before its optimizer update
    assert checkpointing.complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / LORA_FILE).exists()

    resumed = _resume(out, cache)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["loss_history"] == summary(reference)["loss_history"][4:]
    assert lora_bytes(out) == lora_bytes(reference)


def test_sigkill_mid_checkpoint_write_leaves_no_corrupt_checkpoint(tmp_path: Path, cache: Path, reference: Path) -> None:
    out = tmp_path / "out"
    faults = ["--pause_in_checkpoint_write", "4"]
    run = BackgroundRun([*EVERY_2, "--output_dir", str(out)], cache, tmp_path / "logs", faults=faults)
    assert "paused writing checkpoint 4" in run.wait_for_hook()
    run.kill()  # the LoRA layers are written, the optimizer and RNG states are not
    partial = out / ".checkpoint-4.partial"
    assert (partial / LORA_FILE).is_file() and not (partial / "optimizer.bin").exists()
    assert checkpointing.list_checkpoints(out) == ["checkpoint-2"]  # checkpoint-4 never appeared
    assert checkpointing.latest_checkpoint(out) == "checkpoint-2"

    resumed = _resume(out, cache)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert not partial.exists()  # the leftover was cleaned up
    assert lora_bytes(out) == lora_bytes(reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_checkpoint_and_lora_then_exits_with_the_signal_code(
    tmp_path: Path, cache: Path, reference: Path, signum: signal.Signals
) -> None:
    """The signal goes to the whole process group, dataloader workers included (Ctrl-C in a terminal,
    SLURM's SIGTERM to every process of the job): the workers must not die before the main process saved."""
    out = tmp_path / "out"
    argv = [*EVERY_2, "--dataloader_num_workers", "2", "--output_dir", str(out)]
    run = BackgroundRun(argv, cache, tmp_path / "logs", faults=["--pause_at_step", "3"])
    run.wait_for_hook()
    run.send(signum, group=True)  # during step 3: it is finished, then saved
    assert run.wait() == 128 + signum, run.stderr()[-3000:]  # saved, but not finished: `train && upload` stops
    assert "Traceback" not in run.stderr()
    stopped = summary(out)
    assert stopped["interrupted"] == signum.name and stopped["last_step"] == 3 and stopped["steps"] == 3
    assert checkpointing.complete_checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert stopped["last_checkpoint"] == str(out / "checkpoint-3")
    assert (out / LORA_FILE).is_file()
    assert f"interrupted by {signum.name} after step 3" in run.stdout()

    if signum == signal.SIGTERM:  # the checkpoint the signal wrote resumes exactly (once is enough)
        resumed = _resume(out, cache)
        assert resumed["resumed_from"].endswith("checkpoint-3")
        assert lora_bytes(out) == lora_bytes(reference)


def test_non_finite_loss_stops_naming_the_step_and_keeps_earlier_outputs(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "out"
    first = run_trainer([*EVERY_2, "--max_train_steps", "2", "--output_dir", str(out)], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    before = file_digests(out)
    assert "checkpoint-2/optimizer.bin" in before and LORA_FILE in before

    failed = run_trainer(
        [*EVERY_2, "--resume_from_checkpoint", "latest", "--output_dir", str(out)], cache,
        faults=["--nan_loss_at_steps", "3"],
    )  # fmt: skip
    assert failed.returncode == 1
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Non-finite training loss (nan) at step 3"), error
    assert "Traceback" not in failed.stderr
    assert file_digests(out) == before  # last good checkpoint, LoRA file, summary: bytes and mtimes


# ----------------------------------------------------------------------------- building blocks
def test_lora_file_is_replaced_atomically(tmp_path: Path) -> None:
    (tmp_path / LORA_FILE).write_bytes(b"previous")

    def killed_midway(directory: Path) -> None:
        (directory / LORA_FILE).write_bytes(b"half")
        raise KeyboardInterrupt  # stands in for the process dying during the write

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_files(tmp_path, killed_midway)
    assert (tmp_path / LORA_FILE).read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [LORA_FILE]  # the temporary directory is gone too
    atomic.replace_files(tmp_path, lambda directory: (directory / LORA_FILE).write_bytes(b"new"))
    assert (tmp_path / LORA_FILE).read_bytes() == b"new"


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint's files in their real formats (a safetensors LoRA, torch.save archives), tiny."""
    import torch
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    names = list(checkpointing.REQUIRED_FILES) + ["random_states_0.pkl"]
    for name in names if complete else names[:1]:
        if name.endswith(".safetensors"):
            save_file({"lora_A": torch.randn(4, 3)}, str(path / name))
        else:
            torch.save({"step": step, "state": torch.randn(5)}, path / name)
    return path


def test_latest_skips_incomplete_and_temporary_checkpoints(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 12, complete=False)  # e.g. an older, non-atomic writer killed mid-save
    (tmp_path / ".checkpoint-14.partial").mkdir()
    assert checkpointing.list_checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-10", "checkpoint-12"]
    assert checkpointing.latest_checkpoint(tmp_path) == "checkpoint-10"  # numeric order, complete only
    assert checkpointing.find_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match="cannot be resumed from .missing optimizer.bin"):
        checkpointing.find_resume_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
    assert checkpointing.prune(tmp_path, 1) == ["checkpoint-2"]
    assert checkpointing.list_checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-12"]
    assert checkpointing.remove_stale_files(tmp_path) == [".checkpoint-14.partial"]
