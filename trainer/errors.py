"""The trainer's errors, their exit statuses and the one-line form the CLI prints.

Every module that can stop a run imports from here (and from nowhere else for its errors), so the
import graph stays a tree: ``errors`` imports nothing of the trainer.

* :class:`InputError` -- a bad flag, file, column or image, found before or while reading the data:
  ``error: <line>`` on stderr, exit status :data:`EXIT_INPUT_ERROR` (2, what argparse uses).
* :class:`TrainingAborted` -- the run cannot continue (non-finite loss or weights): ``error: <line>``,
  exit status :data:`EXIT_ABORTED` (1); nothing of the failed step was saved.
* :class:`OptionalStepFailed` -- validation, final images or upload failed after the LoRA and summary
  were saved: exit status :data:`EXIT_OPTIONAL_STEP_FAILED` (3), nothing deleted.
* A run stopped by SIGINT/SIGTERM saves, then exits with 128 + the signal number (:data:`EXIT_SIGNAL_BASE`);
  Ctrl-C before training has started exits 130 with one line.
"""
from __future__ import annotations

EXIT_INPUT_ERROR = 2  # what argparse uses for a bad command line
EXIT_ABORTED = 1
EXIT_OPTIONAL_STEP_FAILED = 3  # results saved, then validation / final images / upload failed
# Stopped by a signal after saving: 128 + the signal's number, what a shell reports for a process the
# signal killed (130 for SIGINT / Ctrl-C, 143 for SIGTERM), so `train && upload` does not upload.
EXIT_SIGNAL_BASE = 128


class InputError(ValueError):
    """A bad flag, file, column or image, described in one line (printed as ``error: ...``, exit status 2)."""


class TrainingAborted(RuntimeError):
    """The run cannot continue; the message says why and what was (not) saved. Exit status 1."""


class NonFiniteLossError(TrainingAborted):
    """A NaN/inf loss: at the first one (fp32/bf16), or after ``consecutive`` of them in a row (fp16,
    whose gradient scaler skips the steps in between)."""

    def __init__(self, step: int, epoch: int, loss: float, consecutive: int = 1) -> None:
        self.step, self.epoch, self.loss, self.consecutive = step, epoch, loss, consecutive
        if consecutive > 1:
            what = (
                f"Non-finite training loss ({loss}) in {consecutive} consecutive steps up to step {step} (epoch {epoch}):"
                " stopping (--max_nonfinite_steps). The gradient scaler skipped those steps, so the weights are those"
                " of the last finite step; nothing from them was saved."
            )
        else:
            what = (
                f"Non-finite training loss ({loss}) at step {step} (epoch {epoch}): stopping before the optimizer"
                " update. Nothing from this step was saved; earlier checkpoints and the LoRA file are untouched."
            )
        super().__init__(
            what + " Common causes: a learning rate too high, fp16 overflow (try --mixed_precision bf16 or an fp16-fix"
            " VAE via --vae_name), corrupt images. Resume with --resume_from_checkpoint latest after fixing it."
        )


class NonFiniteWeightsError(TrainingAborted):
    def __init__(self, step: int, what: str) -> None:
        self.step = step
        super().__init__(
            f"Non-finite LoRA weights after step {step}: refusing to write {what}. Earlier checkpoints and the"
            " LoRA file are untouched. Lower the learning rate or --max_grad_norm and resume from the last checkpoint."
        )


class OptionalStepFailed(RuntimeError):
    """A step after the results were saved (validation, final images, upload) failed: exit status 3."""


class DiskFullError(TrainingAborted):
    """A checkpoint or the LoRA could not be written for lack of space; the partial write was removed."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line.

    An error raised in a DataLoader worker comes back re-raised with the worker's traceback in its
    message ("Caught InputError in DataLoader worker process 0. Original Traceback ..."); its last line
    holds the original message.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(text.split())


def exit_status(error: BaseException) -> int | None:
    """The CLI's exit status for ``error``, or None for an error the CLI does not handle (a bug: traceback)."""
    if isinstance(error, InputError):
        return EXIT_INPUT_ERROR
    if isinstance(error, TrainingAborted):
        return EXIT_ABORTED
    if isinstance(error, OptionalStepFailed):
        return EXIT_OPTIONAL_STEP_FAILED
    return None


def format_error(error: BaseException) -> str:
    """``error: <one line>``, what the CLI prints on stderr."""
    return f"error: {one_line(error)}"
