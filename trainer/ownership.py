"""A run owns its ``--output_dir``: one run at a time, and a finished run's results are never overwritten by accident.

* **A lock while running.** The main process holds ``<output_dir>/.trainer.lock``: an ``flock`` (released
  by the kernel when the process dies, so a killed run never leaves it held) on a file naming the owner
  (host, pid, start time). A second run on the same machine finds the ``flock`` taken; a run on another
  machine sharing the folder (where ``flock`` may not reach across hosts) finds the file naming a live
  owner on another host. Either stops at once with one line naming the running one. A run that ends
  empties the file; one killed on another host leaves it naming that host (the message says to delete it).
* **Results are not replaced by a fresh run.** A run without ``--resume_from_checkpoint`` into a folder
  holding another run's results (its LoRA, ``summary.json`` or checkpoints) stops with exit status 2,
  unless ``--overwrite_output_dir`` says to replace them (as in transformers' Trainer): then the old
  checkpoints are removed first, so ``latest`` can never continue the old run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Iterator

from trainer import checkpointing
from trainer.errors import InputError

logger = logging.getLogger(__name__)

LOCK_FILE = ".trainer.lock"
ACQUIRE_ATTEMPTS = 20  # 50 ms apart: a second of patience for a concurrent look, none for a running run
SUMMARY_FILE = "summary.json"
RESULT_FILES = (checkpointing.LORA_FILE, SUMMARY_FILE)


def previous_results(output_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left in ``output_dir`` that a fresh run would replace: LoRA, summary, checkpoints."""
    root = Path(output_dir)
    found = [name for name in RESULT_FILES if (root / name).is_file()]
    return found + checkpointing.list_checkpoints(root)


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Preflight: the folder is not in use by a running run, and a fresh run does not replace a finished one."""
    owner = running_owner(output_dir)
    if owner is not None:
        raise InputError(_in_use(output_dir, owner))
    found = previous_results(output_dir)
    if found and not resume_from_checkpoint and not overwrite:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} in all)" if len(found) > 4 else "")
        raise InputError(
            f"--output_dir {output_dir} holds the results of another run ({shown}): pass --resume_from_checkpoint"
            " latest to continue it, --overwrite_output_dir to replace it, or choose another --output_dir"
        )


def remove_previous_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """``--overwrite_output_dir``: the old run's checkpoints go before the new run writes any."""
    removed = checkpointing.list_checkpoints(output_dir)
    for name in removed:
        shutil.rmtree(Path(output_dir, name))
    if removed:
        logger.warning(f"--overwrite_output_dir: removed the previous run's checkpoints {', '.join(removed)}")
    return removed


# ----------------------------------------------------------------------------- the lock
def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_owner(handle: IO[str]) -> dict[str, Any] | None:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


def _alive_elsewhere(owner: dict[str, Any] | None) -> bool:
    """The file names an owner on another host (its liveness cannot be checked from here)."""
    return owner is not None and owner.get("host") != socket.gethostname()


def _in_use(output_dir: str | os.PathLike, owner: dict[str, Any]) -> str:
    where = f"{owner.get('host')} pid {owner.get('pid')}, started {owner.get('started')}"
    lock = Path(output_dir, LOCK_FILE)
    return (
        f"--output_dir {output_dir} is in use by another run ({where}): wait for it to finish or choose another"
        f" --output_dir (if that run is dead, delete {lock})"
    )


def running_owner(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The owner of a run holding ``output_dir`` now, or None (looks without taking the lock)."""
    path = Path(output_dir, LOCK_FILE)
    if not path.is_file():
        return None
    with contextlib.suppress(OSError), open(path, "r+", encoding="utf-8") as handle:
        owner = _read_owner(handle)
        # Shared: the processes of one launch run preflight at the same time, and their looks must not
        # collide with each other (only with a holder's exclusive lock).
        if not _try_flock(handle, shared=True):
            return owner or {"host": "?", "pid": "?", "started": "?"}
        _unlock(handle)
        return owner if _alive_elsewhere(owner) else None
    return None


class OutputDirLock:
    """The lock of the module docstring; :meth:`acquire` raises :class:`InputError` when another run holds it."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self._handle: IO[str] | None = None

    def acquire(self) -> "OutputDirLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.output_dir / LOCK_FILE, "a+", encoding="utf-8")
        owner = _read_owner(handle)
        if not _try_flock(handle, attempts=ACQUIRE_ATTEMPTS) or _alive_elsewhere(owner):
            handle.close()
            raise InputError(_in_use(self.output_dir, owner or {"host": "?", "pid": "?", "started": "?"}))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_owner_record()) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def release(self) -> None:
        """Empty the file (a free lock) and let go; idempotent. The file stays: deleting it would let a
        waiting run lock a file nobody else sees."""
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        _unlock(self._handle)
        self._handle.close()
        self._handle = None


@contextlib.contextmanager
def owned(output_dir: str | os.PathLike, is_main_process: bool) -> Iterator[None]:
    """Hold the lock (main process only) for the ``with`` block."""
    lock = OutputDirLock(output_dir).acquire() if is_main_process else None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _try_flock(handle: IO[str], shared: bool = False, attempts: int = 1) -> bool:
    """Take the ``flock`` without waiting, trying ``attempts`` times (a look of :func:`running_owner` holds
    it for a moment)."""
    try:
        import fcntl
    except ImportError:  # Windows: the owner file alone
        return True
    for attempt in range(attempts):
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return False


def _unlock(handle: IO[str]) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
