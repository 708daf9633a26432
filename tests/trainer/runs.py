"""Helpers of the trainer's tests: tiny runs of ``python -m trainer.sdxl_lora`` in-process (:func:`run_main`)
or in a subprocess (to launch, signal or kill them) and comparisons of their outputs."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tests.trainer.fault_entry import MARKER
from trainer.ownership import LOCK_FILE

REPO = Path(__file__).resolve().parents[2]
LORA_FILE = "pytorch_lora_weights.safetensors"

#: A run of a few seconds: embedded model and dataset, 8 samples in batches of 2 (4 steps per epoch, so
#: 6 steps cross an epoch boundary), random flip and random crop on (the embedded defaults), seed 42.
TINY = [
    "--max_train_samples", "8", "--train_batch_size", "2", "--max_train_steps", "6",
    "--num_validation_images", "0", "--report_to", "none",
]  # fmt: skip


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run must start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(argv: Sequence[str]) -> tuple[dict[str, Any], str, str]:
    """``trainer.sdxl_lora.main(argv)`` in this process, stdout/stderr captured: (summary, stdout, stderr)."""
    import torch

    from trainer.sdxl_lora import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # the embedded run pins 1 thread; give later tests theirs back
    _reset_accelerate()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            summary = main(list(argv))
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)
    return summary, out.getvalue(), err.getvalue()


def trainer_env(cache: Path, **extra: str) -> dict[str, str]:
    """The test process's environment for a trainer subprocess: the shared asset cache, the repository importable."""
    env = dict(os.environ)
    env["NPU_KERNELS_CACHE"] = str(cache)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def trainer_command(argv: Sequence[str], faults: Sequence[str] = ()) -> list[str]:
    """``python -m trainer.sdxl_lora argv``, or with ``faults`` the test-only entry point that injects them
    (``tests/trainer/fault_entry.py``: e.g. ``["--pause_at_step", "5"]``)."""
    if faults:
        return [sys.executable, "-m", "tests.trainer.fault_entry", *faults, "--", *argv]
    return [sys.executable, "-m", "trainer.sdxl_lora", *argv]


def run_trainer(
    argv: Sequence[str], cache: Path, timeout: float = 300, faults: Sequence[str] = (), **env: str
) -> subprocess.CompletedProcess:
    """The trainer (see :func:`trainer_command`) to completion."""
    return subprocess.run(
        trainer_command(argv, faults),
        cwd=REPO, env=trainer_env(cache, **env), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. An ignored or blocked SIGINT survives exec (a
    shell starts background jobs with it ignored; a library may block it in the test process), and Python then
    installs no KeyboardInterrupt handler or never sees the signal: in two CI rehearsals a Ctrl-C test's run got
    the signal and trained to the end (exit 0, not 130)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class BackgroundRun:
    """A trainer subprocess whose stderr goes to a file, so the test can wait for a test-hook line."""

    def __init__(self, argv: Sequence[str], cache: Path, log_dir: Path, faults: Sequence[str] = (), **env: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        self._stdout, self._stderr = open(self.stdout_path, "w"), open(self.stderr_path, "w")
        self.process = subprocess.Popen(
            trainer_command(argv, faults),
            cwd=REPO, env=trainer_env(cache, **env), stdout=self._stdout, stderr=self._stderr,
            start_new_session=True,  # its own process group: signal it and its dataloader workers together
            preexec_fn=_default_sigint,
        )  # fmt: skip

    def wait_for_hook(self, timeout: float = 180) -> str:
        """Block until the test hook announced itself; return its line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr_path.read_text(errors="replace").splitlines():
                if MARKER in line:
                    return line
            if self.process.poll() is not None:
                raise AssertionError(f"trainer exited ({self.process.returncode}) before its test hook:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"no test hook within {timeout} s:\n{self.stderr()[-3000:]}")

    def send(self, signum: int, group: bool = False) -> None:
        """``signum`` to the trainer, or (``group``) to it and its children, as Ctrl-C or SLURM do."""
        if group:
            os.killpg(self.process.pid, signum)
        else:
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.process.wait(timeout=60)
        self._close()

    def wait(self, timeout: float = 180) -> int:
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def _close(self) -> None:
        self._stdout.close()
        self._stderr.close()


def summary(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "summary.json").read_text())


def file_digests(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) of every file below ``root`` (but the run lock, which every run
    writes: ``trainer.ownership``)."""
    return {
        str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != LOCK_FILE
    }


def lora_bytes(output_dir: Path) -> bytes:
    """The tensors of the LoRA file (safetensors' header also stores metadata, compared separately)."""
    from safetensors.torch import load_file

    tensors = load_file(output_dir / LORA_FILE)
    return b"".join(key.encode() + tensors[key].numpy().tobytes() for key in sorted(tensors))
