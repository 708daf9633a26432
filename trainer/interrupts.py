"""Graceful stop on SIGINT/SIGTERM: finish the current step, save a checkpoint and the LoRA, exit.

The handler only records the request; the training loop acts on it at the next optimizer-step boundary
(never between backward and ``optimizer.step()``, never mid-accumulation), so what gets saved is a
consistent state that ``--resume_from_checkpoint latest`` continues exactly.

* A second SIGINT (Ctrl-C twice) aborts at once with ``KeyboardInterrupt``: the escape hatch when
  saving itself hangs. Other repeats (e.g. the SIGTERM that ``torchrun`` forwards after a Ctrl-C) are
  ignored, so the save in progress completes.
* Launchers give workers a grace period before SIGKILL (``torchrun``/``accelerate launch``: 30 s by
  default; SLURM: ``KillWait``, 30 s); saving a LoRA checkpoint normally takes far less. Checkpoint writes
  are atomic (:mod:`trainer.atomic`), so even a SIGKILL during the save loses only that save.
* Dataloader workers get the signal too when it goes to the whole process group (Ctrl-C, SLURM):
  :class:`WorkerSignals` keeps them alive until the main process has saved.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Records SIGINT/SIGTERM for the loop; ``install()``/``restore()`` or use as a context manager."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A stop signal reached this process."""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            WorkerSignals.main_process_stopping()
            logger.warning(
                f"Received {name}: finishing the current step, then saving a checkpoint and the LoRA weights"
                " before exiting (Ctrl-C again aborts without saving)."
            )
        elif signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        else:
            logger.warning(f"Received {name} again: still saving, please wait.")

    def install(self) -> "GracefulStop":
        """Take over SIGINT/SIGTERM (only possible in the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            logger.debug("Not the main thread: SIGINT/SIGTERM keep their default behaviour.")
            return self
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


class WorkerSignals:
    """``worker_init_fn`` of the training DataLoader: its worker processes must outlive a stop signal.

    Ctrl-C reaches the whole process group, and SLURM sends SIGTERM to every process of a job step:
    dataloader workers that died of it would make the main process fail fetching the next batch instead
    of finishing its step and saving. So workers ignore SIGINT, and a SIGTERM while the main process is
    stopping gracefully (it got the same signal) is ignored too; the main process shuts them down
    afterwards as usual. Any other SIGTERM still terminates a worker as before (after waiting up to
    :attr:`GRACE` seconds for the main process to report a stop): that is how ``multiprocessing`` ends
    workers that are left over at interpreter exit.
    """

    RUNNING, STOPPING, EXITING = 0, 1, 2
    GRACE = 0.5  # seconds a worker waits to learn whether the main process got the signal too
    _instances: "weakref.WeakSet[WorkerSignals]" = weakref.WeakSet()

    def __init__(self) -> None:
        # Shared memory read by the workers (inherited when they fork, or passed when they spawn).
        self.state = multiprocessing.RawValue("i", self.RUNNING)
        WorkerSignals._instances.add(self)
        atexit.register(self._set, self.EXITING)  # leftover workers at exit: terminate() must work

    def _set(self, value: int) -> None:
        self.state.value = value

    @classmethod
    def main_process_stopping(cls) -> None:
        for instance in list(cls._instances):
            instance._set(cls.STOPPING)  # noqa: SLF001 - the class's own instances

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + self.GRACE
        while self.state.value == self.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.state.value == self.STOPPING:
            return  # a signal to the whole group: the main process stops gracefully and shuts us down
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # die of it, as without this handler
