"""``python -m trainer.sdxl_lora``: SDXL LoRA fine-tuning, diffusers' recipe with npu_kernels in the UNet.

Without arguments it trains the embedded tiny SDXL pipeline on a generated shapes dataset (well under a
minute on a laptop CPU). With diffusers' / Ascend's flags it trains SDXL base::

    python -m trainer.sdxl_lora --pretrained_model_name_or_path=/models/stable-diffusion-xl-base-1.0 \\
        --vae_name=/models/sdxl-vae-fp16-fix --dataset_name=/data/pokemon-blip-captions \\
        --resolution=1024 --random_flip --train_batch_size=1 --gradient_checkpointing \\
        --max_train_steps=1000 --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 \\
        --mixed_precision=fp16 --checkpointing_steps=500 --output_dir=sdxl-lora-output

Outputs in ``--output_dir``: ``pytorch_lora_weights.safetensors``, ``validation/`` images,
``loss_curve.png``, ``summary.json``, TensorBoard logs under ``--logging_dir`` and checkpoints.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import logging
import math
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from trainer import (
    atomic,
    buckets,
    caching,
    checkpointing,
    compiling,
    data,
    distributed,
    errors,
    metrics,
    models,
    optim,
    ownership,
    preflight,
    sampling,
)
from trainer.args import parse_args, resolved, tracker_config
from trainer.atomic import replace_files
from trainer.embedded_default import ensure_assets
from trainer.guards import check_weights
from trainer.hooks import TrainingHooks
from trainer.interrupts import GracefulStop
from trainer.loop import LoopCallbacks, LoopConfig, StepContext, num_update_steps, train_loop
from trainer.memory_plan import check as check_memory_plan
from trainer.validation import Validator, final_inference

logger = logging.getLogger("trainer.sdxl_lora")

TRACKER_PROJECT = "text2image-fine-tune"  # diffusers' project name: same TensorBoard folder layout


def main(argv: Sequence[str] | None = None, hooks: TrainingHooks | None = None) -> dict[str, Any]:
    """Train and return the run summary (also written to ``<output_dir>/summary.json``).

    ``hooks`` (default: none) is called at fixed points of the loop; see :mod:`trainer.hooks`.
    """
    started = time.perf_counter()
    args = parse_args(argv)
    # Bad flags, model folders, datasets and output folders raise errors.InputError here, before anything
    # is written.
    checked = preflight.run(args)
    if check_memory_plan(args):  # --memory_plan: the plan was all that was asked for
        return {}
    # torchrun / accelerate launch on a machine without an accelerator: gloo on CPU (needs the environment
    # set before the Accelerator exists).
    distributed.prepare_launch_environment()
    accelerator = _make_accelerator(args)
    with ownership.owned(args.output_dir, accelerator.is_main_process):  # one run at a time in --output_dir
        return _train(args, checked, accelerator, hooks or TrainingHooks(), started)


def _train(
    args: argparse.Namespace, checked: preflight.Checked, accelerator: Any, hooks: TrainingHooks, started: float
) -> dict[str, Any]:
    """:func:`main` once the flags are checked and the output folder is this run's."""
    from accelerate.utils import set_seed  # accelerate is heavy: --help and preflight errors stay fast
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    _configure_logging(accelerator)
    _limit_cpu_threads(args, accelerator.device)
    distributed.configure_device(accelerator.device)
    if args.allow_tf32:
        distributed.allow_reduced_precision_matmul(accelerator.device.type)
    if args.seed is not None:
        set_seed(args.seed)
    repo_id = _prepare_output_dir(args, accelerator)
    # From here on `config`: the flags with the embedded assets' paths filled in, and (below) the schedule.
    # `args` stays as parsed.
    config = _resolve_embedded(args, accelerator)

    # ------------------------------------------------------------------ models
    hooks.before_models_load()
    components = models.load_components(config, accelerator.device, accelerator.mixed_precision)
    models.enable_attention_backends(components.unet, config)
    models.add_lora(components, config.rank, config.train_text_encoder, config.use_dora)
    components.kernels_report = models.apply_kernels(
        components.unet, config.kernels == "on", config.geglu_approximate, config.recompute
    )
    unwrap = models.Unwrapper(accelerator)
    models.register_checkpoint_hooks(accelerator, components, config, unwrap)
    if config.output_kohya_format:  # after the LoRA save hook: converts the file it wrote
        checkpointing.register_kohya_export(accelerator)
    checkpointing.register_write_hook(accelerator, hooks.inside_checkpoint_write)
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(components, config.train_text_encoder)
    trainable = [components.unet] + (components.text_encoders if config.train_text_encoder else [])
    models.upcast_trainable_params(trainable, accelerator.mixed_precision)
    params_to_optimize = models.trainable_parameters(trainable)
    learning_rate = optim.scaled_learning_rate(config, accelerator.num_processes)
    optimizer = optim.build_optimizer(config, params_to_optimize, learning_rate)

    # ------------------------------------------------------------------ data
    train_dataset = data.build_train_dataset(
        config, components.tokenizer_one, components.tokenizer_two, accelerator.main_process_first, checked.dataset
    )
    # Every process reads the same (shared) output directory, so all find the same checkpoint.
    resume_from = checked.resume_from
    data_seed = _data_seed(config, accelerator, resume_from)
    training_data = caching.prepare(config, train_dataset, components, accelerator)
    bucketing = train_dataset.buckets  # --enable_bucket: each row's bucket (trainer.buckets), else None
    if config.compile and bucketing is None:  # one batch shape for the whole run: nothing recompiles mid-run
        compiling.full_batches_only(len(training_data.dataset), config.train_batch_size)
    bucket_sampler = buckets.BucketBatchSampler(bucketing, config.train_batch_size, accelerator.num_processes, data_seed) if bucketing else None
    train_dataloader, sampler = sampling.build_dataloader(
        training_data.dataset, config.train_batch_size, config.dataloader_num_workers, data_seed, training_data.collate_fn,
        drop_last=config.compile, batch_sampler=bucket_sampler,
    )  # fmt: skip
    skipped_images = data.SkippedImages()  # --on_bad_image skip: filled from the batches, see train_loop
    if bucketing:
        accelerator.register_for_checkpointing(bucket_sampler)  # checkpoints say which buckets their data order used
        skipped_images.record({data.SKIPPED_KEY: bucketing.unreadable})  # rows whose size could not be read
        logger.info("Buckets: " + "; ".join(buckets.describe(bucketing.report(config.train_batch_size, accelerator.num_processes))))

    # ------------------------------------------------------------------ schedule, devices
    overrode_max_train_steps = config.max_train_steps is None
    max_train_steps = config.max_train_steps
    if overrode_max_train_steps:
        max_train_steps = config.num_train_epochs * num_update_steps(len(train_dataloader), config.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * config.gradient_accumulation_steps,
        num_training_steps=max_train_steps * config.gradient_accumulation_steps,
    )
    run = _prepare(accelerator, config, components, optimizer, train_dataloader, lr_scheduler)
    # The dataloader may have been sharded across processes: recompute steps and epochs.
    updates_per_epoch = num_update_steps(len(run.dataloader), config.gradient_accumulation_steps)
    if overrode_max_train_steps:
        max_train_steps = config.num_train_epochs * updates_per_epoch
    config = resolved(
        config, learning_rate=learning_rate, max_train_steps=max_train_steps,
        num_train_epochs=math.ceil(max_train_steps / updates_per_epoch),
    )  # fmt: skip
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(config))
    total_batch_size = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    _log_run_start(config, len(train_dataset), total_batch_size, components.kernels_report)

    checkpoints = CheckpointWriter(accelerator, config, params_to_optimize, data_seed, checked.identity)
    resume_point = checkpointing.load(accelerator, resume_from, updates_per_epoch, checkpoints.state(0)) if resume_from else None
    initial_global_step = resume_point.global_step if resume_point else 0
    progress_bar = tqdm(
        range(0, config.max_train_steps), initial=initial_global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    validator = Validator(config, accelerator, components, unwrap, run.unet, run.text_encoders)
    loop_config = LoopConfig(
        max_train_steps=config.max_train_steps,
        num_train_epochs=config.num_train_epochs,
        first_epoch=resume_point.first_epoch if resume_point else 0,
        initial_global_step=initial_global_step,
        train_batch_size=config.train_batch_size,
        max_grad_norm=config.max_grad_norm,
        checkpointing_steps=config.checkpointing_steps,
        debug_loss=config.debug_loss,
        skip_batches=resume_point.skip_batches if resume_point else 0,
        max_nonfinite_steps=config.max_nonfinite_steps,
        logging_steps=config.logging_steps,
    )
    step_context = StepContext(
        # --compile: only the training step sees the compiled UNet; validation and saving use run.unet.
        unet=compiling.compile_unet(run.unet, config, accelerator.device.type) if config.compile else run.unet,
        vae=components.vae,
        text_encoders=run.text_encoders,
        noise_scheduler=_with_prediction_type(components.noise_scheduler, config.prediction_type),
        weight_dtype=components.weight_dtype,
        separate_vae=config.pretrained_vae_model_name_or_path is not None,
        resolution=config.resolution,
        noise_offset=config.noise_offset,
        snr_gamma=config.snr_gamma,
        device=accelerator.device,
    )

    # ------------------------------------------------------------------ train
    # From here on SIGINT/SIGTERM finish the current step, save a checkpoint and the LoRA, and exit 130/143.
    # The handlers stay until the LoRA file is written.
    optional = OptionalSteps()
    stop = GracefulStop().install()
    try:
        with npu_kernels_selections(count=not config.compile) as selections:  # which backend served each op
            history = train_loop(
                accelerator, loop_config, step_context, run.trainable_modules, run.optimizer, run.lr_scheduler,
                run.dataloader, params_to_optimize, progress_bar,
                callbacks=LoopCallbacks(
                    on_epoch_end=lambda epoch: optional.run(f"validation after epoch {epoch}", validator, epoch),
                    on_batch=skipped_images.record, save_checkpoint=checkpoints,
                    stop_requested=lambda: stop.requested, set_epoch=sampler.set_epoch,
                ),
                hooks=hooks,
            )  # fmt: skip
        progress_bar.close()
        training_time = time.perf_counter() - started
        final_step = history.records[-1].step if history.records else initial_global_step
        interrupted = stop.signal_name or ("a stop request (another process's signal)" if history.stopped_early else None)
        peak, memory_kind = metrics.peak_memory_bytes(accelerator.device)
        peaks = accelerator.gather(torch.tensor([peak], device=accelerator.device, dtype=torch.int64)).tolist()
        bad_images = _gather_skipped_images(skipped_images)
        # DDP keeps the LoRA weights bit-identical on every process; the summary shows that it did.
        digests = distributed.gather_digests(accelerator, distributed.parameters_digest(params_to_optimize))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            check_weights(params_to_optimize, final_step, checkpointing.LORA_FILE)
            _save_lora_weights(Path(config.output_dir), run, unwrap, config.train_text_encoder, config.output_kohya_format)
    except errors.TrainingAborted:
        stop.restore()
        accelerator.end_training()  # flush the trackers: the curve up to the fault is kept
        raise
    finally:
        stop.restore()  # the LoRA is on disk: a signal during final inference ends the process as usual

    # ------------------------------------------------------------------ outputs
    # The LoRA is on disk; the summary follows at once, before anything optional (final images, upload)
    # that could fail: a failure there is reported in one line and loses nothing.
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        output_dir = Path(config.output_dir)
        if len(set(digests)) > 1:
            logger.warning(f"The LoRA weights differ between processes (digests {digests}): DDP did not keep them in sync.")
        if interrupted:
            logger.warning(f"Stopped by {interrupted} after step {final_step}; resume with --resume_from_checkpoint latest.")
        loss_curve = metrics.plot_loss_curve(history.losses, output_dir / "loss_curve.png") if history.records else None
        last_checkpoint = checkpointing.latest_checkpoint(output_dir)
        facts = metrics.RunFacts(
            device=str(accelerator.device),
            mixed_precision=accelerator.mixed_precision,
            num_devices=accelerator.num_processes,
            global_batch=total_batch_size,
            peak_memory=peaks,
            memory_kind=memory_kind,
            kernels=components.kernels_report,
            backends=_backends_report(config, selections, accelerator.device.type),
            optimizer=optim.describe(run.optimizer),
            lora_weights=str(output_dir / checkpointing.LORA_FILE),
            validation_images=list(validator.paths),
            loss_curve=str(loss_curve) if loss_curve else None,
            tensorboard_dir=str(Path(config.output_dir, config.logging_dir, TRACKER_PROJECT)) if accelerator.log_with else None,
            bad_images=bad_images,
            first_step=initial_global_step,
            last_step=final_step,
            resumed_from=str(resume_from) if resume_from else None,
            interrupted=interrupted,
            last_checkpoint=str(output_dir / last_checkpoint) if last_checkpoint else None,
            data_seed=data_seed,
            cache=training_data.report,
            lora_digest_per_rank=digests,
            training_wall_time_s=training_time,
            total_wall_time_s=time.perf_counter() - started,
            compile_mode=compiling.compile_mode(config),
            compile_backend=compiling.compile_backend(config),
            buckets=bucketing.report(config.train_batch_size, accelerator.num_processes) if bucketing else None,
        )
        summary = metrics.run_summary(config, history, facts)
        metrics.write_summary(summary, output_dir)
        # An interrupted run exits promptly: no final images, no upload of an unfinished LoRA.
        final_paths = [] if interrupted else optional.run(
            "final validation images", final_inference, config, accelerator, components, output_dir, default=[]
        )
        if final_paths:
            facts.validation_images += final_paths
            summary = metrics.run_summary(config, history, facts)
            metrics.write_summary(summary, output_dir)
        print(metrics.format_summary(summary), flush=True)
        if bad_images:  # the total, after the per-image warnings scrolled by
            logger.warning(f"{len(bad_images)} unreadable image(s) skipped (--on_bad_image skip); listed in summary.json")
        if config.push_to_hub and repo_id is not None and not interrupted:
            optional.run("upload to the hub", _push_to_hub, config, repo_id, final_paths)
    _teardown(accelerator, run, step_context, validator)
    if optional.failures:
        raise errors.OptionalStepFailed(
            f"{'; '.join(optional.failures)} (the LoRA and summary.json are saved in {config.output_dir})"
        )
    return summary


# ----------------------------------------------------------------------------- the steps of main()
def _make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _configure_logging(accelerator: Any) -> None:
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(str(accelerator.state))
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    # Per-file "Loading weights" / "Writing model shards" bars would bury the training bar.
    datasets.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _limit_cpu_threads(args: argparse.Namespace, device: torch.device) -> None:
    """One intra-op thread for the embedded model on CPU, unless OMP_NUM_THREADS says otherwise.

    Its tensors are so small that per-op overhead dominates and a thread pool only adds barriers; worse,
    on a shared or oversubscribed machine a descheduled pool thread stalls every op.
    """
    if args.embedded_model and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _prepare_output_dir(args: argparse.Namespace, accelerator: Any) -> str | None:
    """Create ``--output_dir``, clear leftovers of a killed run (and with ``--overwrite_output_dir`` the previous
    run's checkpoints), create the hub repo; returns its id."""
    if not accelerator.is_main_process:
        return None
    os.makedirs(args.output_dir, exist_ok=True)
    checkpointing.remove_stale_files(args.output_dir)  # partial checkpoints of a killed run
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        ownership.remove_previous_checkpoints(args.output_dir)
    if not args.push_to_hub:
        return None
    from huggingface_hub import create_repo  # only for --push_to_hub

    repo_id = preflight.hub_repo_id(args)
    try:
        return create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # noqa: BLE001 - huggingface_hub's HTTP/network errors differ by release
        # Preflight reached the Hub and checked the token; e.g. no right to create in that namespace.
        raise errors.InputError(f"--push_to_hub: cannot create the Hub repository {repo_id} ({errors.one_line(error)})") from None


def _resolve_embedded(args: argparse.Namespace, accelerator: Any) -> argparse.Namespace:
    """``args`` with the model/dataset flags pointing at the embedded assets where they are used (see
    trainer.args); ``args`` itself is left as parsed."""
    if not (args.embedded_model or args.embedded_dataset):
        return resolved(args)
    with accelerator.main_process_first():  # one process generates, the others then find the cache
        assets = ensure_assets()
    paths = {}
    if args.embedded_model:
        paths["pretrained_model_name_or_path"] = str(assets.model_dir)
    if args.embedded_dataset:
        paths["dataset_name"] = str(assets.dataset_dir)
    return resolved(args, **paths)


@dataclass
class PreparedRun:
    """What ``accelerator.prepare`` returned: the objects the loop trains with."""

    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    trainable_modules: list[torch.nn.Module]
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any


def _prepare(
    accelerator: Any, args: argparse.Namespace, components: models.SDXLComponents, optimizer: Any, dataloader: Any, lr_scheduler: Any
) -> PreparedRun:
    if args.train_text_encoder:
        unet, te_one, te_two, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            components.unet, components.text_encoder_one, components.text_encoder_two, optimizer, dataloader, lr_scheduler
        )
        return PreparedRun(unet, [te_one, te_two], [unet, te_one, te_two], optimizer, dataloader, lr_scheduler)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(components.unet, optimizer, dataloader, lr_scheduler)
    return PreparedRun(unet, components.text_encoders, [unet], optimizer, dataloader, lr_scheduler)


def _log_run_start(args: argparse.Namespace, num_examples: int, total_batch_size: int, kernels_report: dict[str, Any]) -> None:
    logger.info("***** Running training *****")
    if args.embedded_model:
        logger.warning(
            "Training the EMBEDDED TINY PIPELINE (random weights, a smoke test; not SDXL)"
            + (" on your dataset" if not args.embedded_dataset else "")
            + ". Pass --pretrained_model_name_or_path to train a real model."
        )
    logger.info(f"  Num examples = {num_examples}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Kernels = {args.kernels} {kernels_report}")


class CheckpointWriter:
    """``save_checkpoint(step)`` for the loop (every process), refusing to write NaN/inf weights; each
    checkpoint records ``identity`` (``checkpointing.run_identity``), which ``latest`` compares."""

    def __init__(
        self, accelerator: Any, args: argparse.Namespace, params: list[torch.nn.Parameter], data_seed: int, identity: dict[str, Any]
    ) -> None:
        self.accelerator, self.args, self.params, self.data_seed, self.identity = accelerator, args, params, data_seed, identity

    def state(self, step: int) -> checkpointing.TrainerState:
        return checkpointing.TrainerState(
            step, self.data_seed, self.accelerator.num_processes, self.args.train_batch_size,
            self.args.gradient_accumulation_steps, run=self.identity,
        )  # fmt: skip

    def __call__(self, step: int) -> None:
        check_weights(self.params, step, f"checkpoint-{step}")
        checkpointing.save_checkpoint(self.accelerator, self.args.output_dir, self.state(step), self.args.checkpoints_total_limit)


class OptionalSteps:
    """Runs the steps a run can do without (validation, final images, upload): a failure is logged in one
    line and remembered, the run goes on, and :func:`main` raises :class:`~trainer.errors.OptionalStepFailed`
    once the results are saved (the CLI's exit status 3)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def run(self, what: str, step: Callable[..., Any], *args: Any, default: Any = None) -> Any:
        try:
            return step(*args)
        except Exception as error:  # noqa: BLE001 - any failure of an optional step must not lose the run
            line = f"{what} failed: {errors.one_line(error)}"
            logger.error(line)
            self.failures.append(line)
            return default


def npu_kernels_selections(count: bool = True) -> Any:
    """``npu_kernels.backends.count_selections()``: the (op, backend) decisions made while training.

    Not under ``--compile`` (``count=False``, an empty counter): the decisions are made while dynamo traces,
    and a counter that grows would fail dynamo's guards and recompile the UNet at every step.
    """
    if not count:
        return contextlib.nullcontext(collections.Counter())
    from npu_kernels import backends  # npu_kernels imports its kernels (slow): only once training starts

    return backends.count_selections()


def _backends_report(args: argparse.Namespace, selections: Any, device_type: str) -> dict[str, Any]:
    """summary.json's ``backends``: stock modules, the compiled graph's routes (--compile) or the counted calls."""
    if args.kernels != "on":
        return models.stock_backends()
    if args.compile:
        return compiling.compiled_routes(device_type)
    return metrics.backends_served(selections)


def _teardown(accelerator: Any, run: PreparedRun, step_context: StepContext, validator: Validator) -> None:
    """On every process: drop the DDP wrappers (each holds the process group), meet, destroy the group.

    Left to the wrappers' destructors after a peer has exited, the gloo group's teardown can hang
    (pytorch/pytorch#75097; seen once on the 2-process CPU test).
    """
    run.unet = run.optimizer = run.dataloader = run.lr_scheduler = None
    run.text_encoders.clear()
    run.trainable_modules.clear()
    step_context.unet = step_context.text_encoders = None
    validator.unet, validator.text_encoders = None, []
    accelerator.free_memory()
    gc.collect()  # now, not at exit: a wrapper may sit in a reference cycle
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _data_seed(args: argparse.Namespace, accelerator: Any, resume_from: Path | None) -> int:
    """Seed of the data order and augmentations (trainer.sampling): the checkpoint's when resuming, else
    ``--seed``, else a random one chosen by the main process (every process must use the same)."""
    saved = checkpointing.TrainerState.read(resume_from) if resume_from else None
    if saved is not None:
        return saved.data_seed
    if args.seed is not None:
        return int(args.seed)
    return distributed.broadcast_int(accelerator, secrets.randbits(62))


def _save_lora_weights(
    output_dir: Path, run: PreparedRun, unwrap: models.Unwrapper, with_text_encoders: bool, kohya: bool
) -> None:
    """``pytorch_lora_weights.safetensors`` as diffusers writes it (and with ``kohya`` its kohya-layout copy,
    ``--output_kohya_format``), replacing any previous file atomically."""
    text_encoders = [unwrap(m) for m in run.text_encoders] if with_text_encoders else [None, None]

    def write(tmp: Path) -> None:
        models.save_lora_weights(str(tmp), unwrap(run.unet), *text_encoders)
        if kohya:
            checkpointing.write_kohya_lora(tmp)

    try:
        replace_files(output_dir, write)
    except OSError as error:  # e.g. a full disk: the temporary copy is gone, a previous LoRA file untouched
        raise atomic.write_failed(error, checkpointing.LORA_FILE, output_dir) from None
    stale_kohya = output_dir / checkpointing.KOHYA_LORA_FILE
    if not kohya and stale_kohya.is_file():  # an earlier run's (--overwrite_output_dir): not this LoRA
        stale_kohya.unlink()
        logger.warning(f"Removed {stale_kohya}: it held an earlier run's LoRA (pass --output_kohya_format for a new one)")


def _gather_skipped_images(skipped: data.SkippedImages) -> list[str]:
    """The bad images every process skipped, each once (all processes must call this)."""
    from accelerate.utils import gather_object  # accelerate is heavy: imported where used, see main()

    return sorted(set(gather_object(list(skipped.problems))))


def _with_prediction_type(noise_scheduler: Any, prediction_type: str | None) -> Any:
    """``--prediction_type`` overrides the scheduler's (diffusers sets it in the loop; once is enough)."""
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    return noise_scheduler


def _push_to_hub(args: argparse.Namespace, repo_id: str, image_paths: list[str]) -> None:
    # Only for --push_to_hub.
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    from huggingface_hub import upload_folder

    images = "".join(f"![img_{i}](./{os.path.relpath(p, args.output_dir)})\n" for i, p in enumerate(image_paths))
    description = (
        f"# LoRA text2image fine-tuning - {repo_id}\n\nThese are LoRA adaption weights for"
        f" {args.pretrained_model_name_or_path}. The weights were fine-tuned on the {args.dataset_name} dataset."
        f" You can find some example images in the following.\n\n{images}\n"
        f"LoRA for the text encoder was enabled: {args.train_text_encoder}.\n\n"
        f"Special VAE used for training: {args.pretrained_vae_model_name_or_path}.\n"
    )
    card = load_or_create_model_card(
        repo_id_or_path=repo_id,
        token=args.hub_token,
        from_training=True,
        license="creativeml-openrail-m",
        base_model=args.pretrained_model_name_or_path,
        model_description=description,
        inference=True,
    )
    tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "diffusers", "diffusers-training", "lora"]
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))
    # diffusers' ignore patterns, plus this trainer's lock file and staging leftovers (never results).
    ignore = ["step_*", "epoch_*", ownership.LOCK_FILE, ".tmp-*", f"{checkpointing.STAGING_PREFIX}*"]
    upload_folder(
        repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training", ignore_patterns=ignore,
        token=args.hub_token,
    )


def cli(argv: Sequence[str] | None = None, hooks: TrainingHooks | None = None) -> int:
    """``python -m trainer.sdxl_lora``: :func:`main`, with a bad input or an aborted run reported as one line.

    An :class:`~trainer.errors.InputError` (bad flag, file, column or image) prints ``error: <what and
    where>`` on stderr and returns exit status 2; a :class:`~trainer.errors.TrainingAborted` (e.g. a
    non-finite loss, a full disk) exit status 1; :class:`~trainer.errors.OptionalStepFailed` 3; a run
    stopped by SIGINT/SIGTERM (after saving) 130/143; Ctrl-C before training 130. No traceback in any
    case. ``main(argv)`` itself raises the errors.
    """
    try:
        summary = main(argv, hooks=hooks)
    except (errors.InputError, errors.TrainingAborted, errors.OptionalStepFailed) as error:
        _close_progress_bars()
        print(errors.format_error(error), file=sys.stderr, flush=True)
        status = errors.exit_status(error)
        assert status is not None
        return status
    except KeyboardInterrupt:  # Ctrl-C before training (or a second one while saving)
        _close_progress_bars()
        print(
            "error: interrupted by Ctrl-C (SIGINT); files saved before are intact (saves are atomic)", file=sys.stderr, flush=True
        )
        return errors.EXIT_SIGNAL_BASE + signal.SIGINT
    interrupted = summary.get("interrupted")
    if interrupted:  # saved, but unfinished: not 0, so that `train && upload` stops here
        return errors.EXIT_SIGNAL_BASE + (signal.SIGINT if interrupted == "SIGINT" else signal.SIGTERM)
    return 0


def _close_progress_bars() -> None:
    """End an open tqdm bar's line (an image error stops the run mid-bar), so the error starts its own."""
    from tqdm import tqdm  # tqdm is already loaded when a bar is open; not needed for an early error

    for bar in list(getattr(tqdm, "_instances", ())):  # the registry tqdm itself iterates this way
        bar.close()


if __name__ == "__main__":
    sys.exit(cli())
