"""Checkpoints: ``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``.

A checkpoint is ``accelerator.save_state`` (LoRA layers in the diffusers format through the hooks of
:func:`trainer.models.register_checkpoint_hooks`, optimizer, LR scheduler, grad scaler, every process's
RNG states) plus ``trainer_state.json`` (step, data seed, process count, batch size), as diffusers lays
it out, with two guarantees diffusers' script does not give:

* **Atomic.** Every process writes into ``.checkpoint-<step>.partial``; once all are done the main
  process renames it to ``checkpoint-<step>``. A run killed mid-write (even SIGKILL) leaves only the
  hidden partial directory, which is ignored and cleaned up by the next run. Pruning renames before it
  deletes, so a checkpoint never disappears half-way either.
* **Resumable exactly.** With the data seed and the step, :mod:`trainer.sampling` reproduces the data
  order and augmentations, and the restored RNG states the noise and timesteps: a resumed run ends at
  the same LoRA weights as an uninterrupted one.

``--resume_from_checkpoint latest`` takes the newest *complete* checkpoint (one holding every file
listed by :func:`missing_files`); incomplete ``checkpoint-*`` directories (e.g. from a run of an older
version killed mid-save) are skipped with a warning.

Multi-node: ``--output_dir`` must be on a filesystem all nodes share (each process writes its own RNG
state into the checkpoint, and every process reads the checkpoint when resuming).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from trainer import atomic
from trainer.errors import InputError, one_line

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".checkpoint-"  # .checkpoint-<step>.partial (being written), .checkpoint-<step>.old (being removed)
STATE_FILE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
# --output_kohya_format: the same LoRA in the kohya key layout, named as diffusers' DreamBooth SDXL script names it.
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"
# What accelerate's save_state writes for this trainer (the model itself is replaced by the LoRA file).
REQUIRED_FILES = (LORA_FILE, "optimizer.bin", "scheduler.bin")

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING_NAME = re.compile(r"^\.checkpoint-(\d+)\.partial$")


# The flags that decide what a run trains (its weights' shapes and trajectory): ``latest`` resumes only a
# checkpoint whose run had the same. Not in it: the length of the run (--max_train_steps,
# --num_train_epochs: resuming to train longer is common), checkpointing, logging, validation, output,
# caching and compile flags, and the batch layout (trainer_state.json's own fields, warned about on resume).
RUN_IDENTITY_FLAGS = (
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant", "dataset_name",
    "dataset_config_name", "train_data_dir", "image_column", "caption_column", "max_train_samples", "resolution",
    "center_crop", "random_flip", "rank", "use_dora", "train_text_encoder", "learning_rate", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "snr_gamma", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "prediction_type", "noise_offset", "mixed_precision", "seed", "kernels", "geglu_approximate",
    "image_interpolation_mode",
    "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
)  # fmt: skip


def run_identity(args: Any) -> dict[str, Any]:
    """What identifies ``args``' run (:data:`RUN_IDENTITY_FLAGS`); local paths made absolute."""
    identity = {}
    for flag in RUN_IDENTITY_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and os.path.exists(value):
            value = os.path.abspath(value)
        identity[flag] = value
    if getattr(args, "embedded_model", False):
        identity["pretrained_model_name_or_path"] = "embedded"
    if getattr(args, "embedded_dataset", False):
        identity["dataset_name"] = "embedded"
    return identity


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--flag saved -> current`` for each identifying flag that differs (flags the checkpoint predates are skipped)."""
    return [f"--{flag} {saved[flag]} -> {current.get(flag)}" for flag in saved if flag in current and saved[flag] != current[flag]]


@dataclass
class TrainerState:
    """What ``trainer_state.json`` records next to accelerate's files."""

    global_step: int
    data_seed: int
    num_processes: int
    train_batch_size: int
    gradient_accumulation_steps: int
    run: dict[str, Any] | None = None  # run_identity() of the run that wrote it (None: an older checkpoint)

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState | None":
        path = checkpoint / STATE_FILE
        if not path.is_file():
            return None  # e.g. a checkpoint of diffusers' own script
        raw = json.loads(path.read_text(encoding="utf-8"))
        run = raw.get("run")
        return cls(**{f.name: int(raw[f.name]) for f in fields(cls) if f.name != "run"}, run=run if isinstance(run, dict) else None)


# ----------------------------------------------------------------------------- listing
def checkpoint_step(name: str) -> int | None:
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """``checkpoint-<step>`` directories in ``output_dir`` (complete or not), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if checkpoint_step(n) is not None and os.path.isdir(os.path.join(output_dir, n))]
    return sorted(names, key=lambda name: checkpoint_step(name) or 0)


def missing_files(checkpoint: str | os.PathLike) -> list[str]:
    """Files a resumable checkpoint must hold that ``checkpoint`` lacks (empty: complete)."""
    path = Path(checkpoint)
    required = list(REQUIRED_FILES)
    state = None
    try:
        state = TrainerState.read(path)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        required.append(STATE_FILE)  # present but unreadable: torn
    processes = state.num_processes if state is not None else 1
    required += [f"random_states_{rank}.pkl" for rank in range(processes)]
    return [name for name in required if not (path / name).is_file()]


def complete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    return [name for name in list_checkpoints(output_dir) if not missing_files(Path(output_dir, name))]


def damage(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (missing or damaged files), or None when it can.

    Reads each file's structure, not its tensors: a safetensors header whose data runs past the end of
    the file, a ``torch.save`` archive that is cut short or fails its checksums.
    """
    path = Path(checkpoint)
    missing = missing_files(path)
    if missing:
        return f"missing {', '.join(missing)}"
    for file in sorted(path.iterdir()):
        problem = atomic.file_damage(file)
        if problem:
            return f"{file.name} is damaged ({problem})"
    return None


def latest_checkpoint(output_dir: str | os.PathLike, identity: dict[str, Any] | None = None) -> str | None:
    """Name of the newest checkpoint that is complete, undamaged and (with ``identity``) of the same run
    configuration, warning about each newer one it skips and why.

    Raises :class:`InputError` when checkpoints exist but every complete one is of another configuration.
    """
    refused: list[tuple[str, list[str]]] = []
    for name in reversed(list_checkpoints(output_dir)):
        problem = damage(Path(output_dir, name))
        if problem is None and identity is not None:
            differences = _identity_differences(Path(output_dir, name), identity)
            if differences:
                refused.append((name, differences))
                problem = f"another run configuration: {'; '.join(differences)}"
        if problem is None:
            return name
        logger.warning(f"Skipping checkpoint {name}: {problem}.")
    if refused:
        name, differences = refused[0]
        raise InputError(
            f"--resume_from_checkpoint latest: {name} (the newest usable checkpoint in {output_dir}) is of another run"
            f" configuration ({'; '.join(differences)}): resume with the same flags, or use --overwrite_output_dir"
            " to start afresh"
        )
    return None


def _identity_differences(checkpoint: Path, identity: dict[str, Any]) -> list[str]:
    state = TrainerState.read(checkpoint)
    if state is None or state.run is None:
        return []  # written before runs were identified (or by diffusers' script): cannot tell
    return identity_differences(state.run, identity)


# ----------------------------------------------------------------------------- saving
def save_checkpoint(accelerator: Any, output_dir: str | os.PathLike, state: TrainerState, total_limit: int | None) -> Path:
    """Write ``checkpoint-<state.global_step>`` atomically, then prune to ``total_limit``.

    Called by every process (each saves its RNG state; the main process the rest).
    """
    output = Path(output_dir)
    final = output / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = output / f"{STAGING_PREFIX}{state.global_step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            atomic.write_text_atomically(staging / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)  # never a .partial left: earlier checkpoints stay as they were
        raise atomic.write_failed(error, f"checkpoint-{state.global_step}", output) from None
    accelerator.wait_for_everyone()  # every process's files are in the staging directory
    if accelerator.is_main_process:
        atomic.publish_directory(staging, final)
        logger.info(f"Saved state to {final}")
        prune(output, total_limit)
    accelerator.wait_for_everyone()  # nobody races ahead to a resume/prune while the rename is pending
    return final


def prune(output_dir: str | os.PathLike, total_limit: int | None) -> list[str]:
    """Keep the newest ``total_limit`` complete checkpoints; older ones are removed (renamed first)."""
    if total_limit is None or total_limit < 1:
        return []
    complete = complete_checkpoints(output_dir)
    removing = complete[: max(0, len(complete) - total_limit)]
    if removing:
        logger.info(f"{len(complete)} checkpoints exist, keeping {total_limit}; removing {', '.join(removing)}")
    for name in removing:
        doomed = Path(output_dir, f"{STAGING_PREFIX}{checkpoint_step(name)}.old")
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(Path(output_dir, name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removing


def remove_stale_files(output_dir: str | os.PathLike) -> list[str]:
    """Delete what killed writes left behind (partial checkpoints, half-removed ones, LoRA temp dirs).

    Main process only, before training starts.
    """
    removed = atomic.remove_stale(output_dir, (STAGING_PREFIX, ".tmp-"))
    if removed:
        logger.info(f"Removed leftovers of an interrupted run: {', '.join(sorted(removed))}")
    return removed


# ----------------------------------------------------------------------------- resuming
@dataclass
class ResumePoint:
    """Where a resumed run continues: ``skip_batches`` batches of ``first_epoch`` were already used."""

    checkpoint: Path
    global_step: int
    first_epoch: int
    skip_batches: int


def find_resume_checkpoint(
    resume_from: str | None, output_dir: str | os.PathLike, identity: dict[str, Any] | None = None
) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` designates, or None to start afresh.

    ``latest``: the newest complete checkpoint in ``output_dir``. A path: that directory if it exists,
    else (as diffusers) ``output_dir/<its basename>``; a missing one starts a new run, as in diffusers,
    but an incomplete one is an error rather than a silently different run.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        name = latest_checkpoint(output_dir, identity)
        if name is None:
            logger.warning(f"No complete checkpoint in {output_dir}: starting a new training run.")
            return None
        return Path(output_dir, name)
    path = Path(resume_from)
    if not path.is_dir():
        path = Path(output_dir, os.path.basename(resume_from.rstrip("/")))
    if not path.is_dir():
        logger.warning(f"Checkpoint '{resume_from}' does not exist. Starting a new training run.")
        return None
    problem = damage(path)
    if problem:
        raise InputError(  # a bad --resume_from_checkpoint: one line, exit status 2
            f"Checkpoint {path} cannot be resumed from ({problem}): it was probably being written when the run"
            " was killed. Resume from an earlier one, or use --resume_from_checkpoint latest."
        )
    differences = _identity_differences(path, identity) if identity is not None else []
    if differences:
        raise InputError(
            f"Checkpoint {path} is of another run configuration ({'; '.join(differences)}): resume with the same flags"
        )
    return path


def checkpoint_global_step(checkpoint: Path) -> int:
    state = TrainerState.read(checkpoint)
    if state is not None:
        return state.global_step
    step = checkpoint_step(checkpoint.name)
    if step is None:
        raise ValueError(f"Cannot tell the step of checkpoint {checkpoint}: no {STATE_FILE} and not named checkpoint-<step>.")
    return step


def load(accelerator: Any, checkpoint: Path, updates_per_epoch: int, current: TrainerState) -> ResumePoint:
    """``accelerator.load_state`` and the position in the data to continue from."""
    accelerator.print(f"Resuming from checkpoint {checkpoint}")
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, ValueError, KeyError, OSError) as error:  # e.g. "size mismatch": another --rank
        raise InputError(
            f"Checkpoint {checkpoint} does not fit this run ({one_line(error)[:300]}): resume with the flags it was"
            " written with, or start afresh with --overwrite_output_dir"
        ) from None
    global_step = checkpoint_global_step(checkpoint)
    saved = TrainerState.read(checkpoint)
    if saved is not None:
        changed = [
            f"{name} {getattr(saved, name)} -> {getattr(current, name)}"
            for name in ("num_processes", "train_batch_size", "gradient_accumulation_steps")
            if getattr(saved, name) != getattr(current, name)
        ]
        if changed:
            logger.warning(
                f"Resuming with a different setup ({'; '.join(changed)}): training continues, but the data order"
                " is not the one the interrupted run would have seen."
            )
    return ResumePoint(
        checkpoint=checkpoint,
        global_step=global_step,
        first_epoch=global_step // updates_per_epoch,
        skip_batches=(global_step % updates_per_epoch) * current.gradient_accumulation_steps,
    )


# ----------------------------------------------------------------------------- the kohya file
def write_kohya_lora(directory: str | os.PathLike) -> Path:
    """Write :data:`KOHYA_LORA_FILE` from the diffusers-format :data:`LORA_FILE` in ``directory``.

    Exactly what diffusers' DreamBooth SDXL script does for ``--output_kohya_format``: the saved file read
    back, ``convert_all_state_dict_to_peft`` then ``convert_state_dict_to_kohya`` (``lora_unet_*`` /
    ``lora_te1_*`` / ``lora_te2_*`` keys with ``lora_down`` / ``lora_up`` and an ``alpha`` per module).
    ``directory`` is a staging directory (a checkpoint's, or the final LoRA's in ``trainer.atomic.replace_files``),
    published once both files are written.
    """
    # diffusers: heavy, and not needed for --help or a preflight error
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(directory / LORA_FILE)))
    save_file(kohya, str(directory / KOHYA_LORA_FILE))
    return directory / KOHYA_LORA_FILE


def register_kohya_export(accelerator: Any) -> None:
    """``--output_kohya_format`` for checkpoints: registered after the LoRA save hook
    (trainer.models.register_checkpoint_hooks), it adds the kohya file next to the checkpoint's LoRA file
    (main process; inside the staging directory, so it is published with the rest of the checkpoint)."""

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            write_kohya_lora(output_dir)

    accelerator.register_save_state_pre_hook(hook)


# ----------------------------------------------------------------------------- write hook
def register_write_hook(accelerator: Any, inside_write: Callable[[int, Path], None]) -> None:
    """Call ``inside_write(step, staging_directory)`` in the middle of each checkpoint write: registered
    after the LoRA save hook (trainer.models.register_checkpoint_hooks), it runs once the LoRA layers are
    in the staging directory and before accelerate writes the optimizer, scheduler and RNG states.
    (trainer.hooks.TrainingHooks.inside_checkpoint_write; a no-op unless a test supplies hooks.)"""

    def hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        match = _STAGING_NAME.match(Path(output_dir).name)
        if match:
            inside_write(int(match.group(1)), Path(output_dir))

    accelerator.register_save_state_pre_hook(hook)
