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
import gc
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from trainer import caching, checkpointing, data, distributed, models, preflight, sampling
from trainer.args import parse_args, tracker_config
from trainer.guards import TrainingAborted, check_weights
from trainer.interrupts import GracefulStop
from trainer.loop import LoopConfig, StepContext, num_update_steps, train_loop
from trainer.metrics import build_summary, format_summary, peak_memory_bytes, plot_loss_curve, write_summary
from trainer.validation import generate_images, save_and_log

logger = logging.getLogger("trainer.sdxl_lora")

TRACKER_PROJECT = "text2image-fine-tune"  # diffusers' project name: same TensorBoard folder layout


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


def _check_args(args: argparse.Namespace) -> None:
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `huggingface-cli login` to authenticate with the Hub."
        )
    if torch.backends.mps.is_available() and args.mixed_precision == "bf16":
        raise ValueError("Mixed precision training with bfloat16 is not supported on MPS. Use fp16 or fp32 instead.")


def _limit_cpu_threads(args: argparse.Namespace, device: torch.device) -> None:
    """One intra-op thread for the embedded model on CPU, unless OMP_NUM_THREADS says otherwise.

    Its tensors are so small that per-op overhead dominates and a thread pool only adds barriers; worse,
    on a shared or oversubscribed machine a descheduled pool thread stalls every op (steps measured 5-50x
    slower with 2 threads than with 1 on a busy 2-core host).
    """
    if args.embedded_model and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _resolve_embedded(args: argparse.Namespace, accelerator: Any) -> None:
    """Point the model/dataset flags at the embedded assets where the user gave none."""
    if not (args.embedded_model or args.embedded_dataset):
        return
    from trainer.embedded_default import ensure_assets

    with accelerator.main_process_first():  # one process generates, the others then find the cache
        assets = ensure_assets()
    if args.embedded_model:
        args.pretrained_model_name_or_path = str(assets.model_dir)
    if args.embedded_dataset:
        args.dataset_name = str(assets.dataset_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and return the run summary (also written to ``<output_dir>/summary.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.utils.torch_utils import is_compiled_module
    from tqdm.auto import tqdm

    started = time.perf_counter()
    args = parse_args(argv)
    _check_args(args)
    # Bad flags, model folders and datasets raise preflight.InputError here, before anything is written.
    preflight.run(args)
    caching.check_flags(args)
    # torchrun / accelerate launch on a machine without an accelerator: gloo on CPU (needs the environment
    # set before the Accelerator exists).
    distributed.prepare_launch_environment()

    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    _configure_logging(accelerator)
    _limit_cpu_threads(args, accelerator.device)
    distributed.configure_device(accelerator.device)
    if args.seed is not None:
        set_seed(args.seed)

    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpointing.remove_stale_files(args.output_dir)  # partial checkpoints of a killed run
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    _resolve_embedded(args, accelerator)

    # ------------------------------------------------------------------ models
    components = models.load_components(args, accelerator.device, accelerator.mixed_precision)
    models.enable_attention_backends(components.unet, args)
    models.add_lora(components, args.rank, args.train_text_encoder)
    components.kernels_report = models.apply_kernels(components.unet, args.kernels == "on")

    def unwrap(model: Any) -> Any:
        model = accelerator.unwrap_model(model)
        return model._orig_mod if is_compiled_module(model) else model

    models.register_checkpoint_hooks(accelerator, components, args, unwrap)
    checkpointing.install_test_pause_hook(accelerator)  # test-only; inert unless its variable is set
    if args.gradient_checkpointing:
        models.enable_gradient_checkpointing(components, args.train_text_encoder)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes

    trainable = [components.unet] + (components.text_encoders if args.train_text_encoder else [])
    models.upcast_trainable_params(trainable, accelerator.mixed_precision)
    params_to_optimize = models.trainable_parameters(trainable)

    optimizer = _build_optimizer(args, params_to_optimize)

    # ------------------------------------------------------------------ data
    train_dataset = data.build_train_dataset(
        args, components.tokenizer_one, components.tokenizer_two, accelerator.main_process_first
    )
    # Every process reads the same (shared) output directory, so all find the same checkpoint.
    resume_from = checkpointing.find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    data_seed = _data_seed(args, accelerator, resume_from)
    training_data = caching.prepare(args, train_dataset, components, accelerator)
    train_dataloader, sampler = sampling.build_dataloader(
        training_data.dataset, args.train_batch_size, args.dataloader_num_workers, data_seed, training_data.collate_fn
    )
    skipped_images = data.SkippedImages()  # --on_bad_image skip: filled from the batches, see train_loop

    # ------------------------------------------------------------------ schedule
    overrode_max_train_steps = args.max_train_steps is None
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps(len(train_dataloader), args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * args.gradient_accumulation_steps,
        num_training_steps=args.max_train_steps * args.gradient_accumulation_steps,
    )
    if args.train_text_encoder:
        unet, text_encoder_one, text_encoder_two, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            components.unet, components.text_encoder_one, components.text_encoder_two, optimizer, train_dataloader, lr_scheduler
        )
        trainable_modules = [unet, text_encoder_one, text_encoder_two]
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            components.unet, optimizer, train_dataloader, lr_scheduler
        )
        text_encoder_one, text_encoder_two = components.text_encoder_one, components.text_encoder_two
        trainable_modules = [unet]
    # The dataloader may have been sharded across processes: recompute steps and epochs.
    updates_per_epoch = num_update_steps(len(train_dataloader), args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(args))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Kernels = {args.kernels} {components.kernels_report}")

    def trainer_state(step: int) -> checkpointing.TrainerState:
        return checkpointing.TrainerState(
            step, data_seed, accelerator.num_processes, args.train_batch_size, args.gradient_accumulation_steps
        )

    resume_point = checkpointing.load(accelerator, resume_from, updates_per_epoch, trainer_state(0)) if resume_from else None
    initial_global_step = resume_point.global_step if resume_point else 0
    first_epoch = resume_point.first_epoch if resume_point else 0
    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=initial_global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )

    validation_paths: list[str] = []
    autocast_dtype = components.weight_dtype if components.weight_dtype != torch.float32 else None

    def validate(epoch: int) -> None:
        if not (accelerator.is_main_process and args.all_validation_prompts and epoch % args.validation_epochs == 0):
            return
        # Validation draws random numbers: isolated, so a resumed run's training draws stay identical.
        with sampling.isolated_global_rngs():
            run_validation(epoch)

    def run_validation(epoch: int) -> None:
        from diffusers import StableDiffusionXLPipeline

        logger.info(
            f"Running validation... Generating {args.num_validation_images} images with prompts: {args.all_validation_prompts}."
        )
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            vae=components.vae,
            text_encoder=unwrap(text_encoder_one),
            text_encoder_2=unwrap(text_encoder_two),
            unet=unwrap(unet),
            revision=args.revision,
            variant=args.variant,
            **models.pipeline_dtype_kwargs(components.weight_dtype),
        )
        images = generate_images(
            pipeline,
            args.all_validation_prompts,
            args.num_validation_images,
            accelerator.device,
            args.seed,
            args.validation_inference_steps,
            autocast_dtype,
        )
        paths = save_and_log(images, Path(args.output_dir, "validation", f"epoch_{epoch:03d}"), accelerator, epoch, "validation")
        validation_paths.extend(str(p) for p in paths)
        del pipeline

    def save_checkpoint(step: int) -> None:
        """Called by every process; refuses to write weights that are already NaN/inf."""
        check_weights(params_to_optimize, step, f"checkpoint-{step}")
        checkpointing.save_checkpoint(accelerator, args.output_dir, trainer_state(step), args.checkpoints_total_limit)

    loop_config = LoopConfig(
        max_train_steps=args.max_train_steps,
        num_train_epochs=args.num_train_epochs,
        first_epoch=first_epoch,
        initial_global_step=initial_global_step,
        images_per_micro_step=args.train_batch_size * accelerator.num_processes,
        train_batch_size=args.train_batch_size,
        max_grad_norm=args.max_grad_norm,
        checkpointing_steps=args.checkpointing_steps,
        debug_loss=args.debug_loss,
        skip_batches=resume_point.skip_batches if resume_point else 0,
    )
    step_context = StepContext(
        unet=unet,
        vae=components.vae,
        text_encoders=[text_encoder_one, text_encoder_two],
        noise_scheduler=_with_prediction_type(components.noise_scheduler, args.prediction_type),
        weight_dtype=components.weight_dtype,
        separate_vae=args.pretrained_vae_model_name_or_path is not None,
        resolution=args.resolution,
        noise_offset=args.noise_offset,
        snr_gamma=args.snr_gamma,
        device=accelerator.device,
    )
    # From here on SIGINT/SIGTERM finish the current step, save a checkpoint and the LoRA, and exit 0.
    # The handlers stay until the LoRA file is written.
    stop = GracefulStop().install()
    try:
        history = train_loop(
            accelerator,
            loop_config,
            step_context,
            trainable_modules,
            optimizer,
            lr_scheduler,
            train_dataloader,
            params_to_optimize,
            progress_bar,
            on_epoch_end=validate,
            on_batch=skipped_images.record,
            save_checkpoint=save_checkpoint,
            stop_requested=lambda: stop.requested,
            set_epoch=sampler.set_epoch,
        )
        progress_bar.close()
        training_time = time.perf_counter() - started
        final_step = history.records[-1].step if history.records else initial_global_step
        interrupted = stop.signal_name or ("a signal to another process" if history.stopped_early else None)

        # ------------------------------------------------------------------ outputs
        peak, memory_kind = peak_memory_bytes(accelerator.device)
        peaks = accelerator.gather(torch.tensor([peak], device=accelerator.device, dtype=torch.int64)).tolist()
        bad_images = _gather_skipped_images(skipped_images)
        # DDP keeps the LoRA weights bit-identical on every process; the summary shows that it did.
        digests = distributed.gather_digests(accelerator, distributed.parameters_digest(params_to_optimize))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            check_weights(params_to_optimize, final_step, checkpointing.LORA_FILE)
            _save_lora_weights(
                Path(args.output_dir),
                unwrap(unet),
                unwrap(text_encoder_one) if args.train_text_encoder else None,
                unwrap(text_encoder_two) if args.train_text_encoder else None,
            )
    except TrainingAborted:
        stop.restore()
        accelerator.end_training()  # flush the trackers: the curve up to the fault is kept
        raise
    finally:
        stop.restore()  # the LoRA is on disk: a signal during final inference ends the process as usual

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        if len(set(digests)) > 1:
            logger.warning(f"The LoRA weights differ between processes (digests {digests}): DDP did not keep them in sync.")
        if interrupted:
            logger.warning(f"Stopped by {interrupted} after step {final_step}; resume with --resume_from_checkpoint latest.")
        # An interrupted run exits promptly: no final images, no upload of an unfinished LoRA.
        final_paths = [] if interrupted else _final_inference(args, accelerator, components, autocast_dtype, output_dir)
        loss_curve = plot_loss_curve(history.losses, output_dir / "loss_curve.png") if history.records else None
        last_checkpoint = checkpointing.latest_checkpoint(output_dir)
        summary = build_summary(
            history,
            global_batch=total_batch_size,
            num_devices=accelerator.num_processes,
            peak_memory=peaks,
            memory_kind=memory_kind,
            backends=models.backend_report(accelerator.device, args.kernels == "on", components.weight_dtype),
            extra={
                "device": str(accelerator.device),
                "mixed_precision": accelerator.mixed_precision,
                "kernels": components.kernels_report,
                "embedded_default": bool(args.embedded_model),
                "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                "dataset": args.dataset_name or args.train_data_dir,
                "lora_weights": str(output_dir / checkpointing.LORA_FILE),
                "validation_images": validation_paths + final_paths,
                "loss_curve": str(loss_curve) if loss_curve else None,
                "tensorboard_dir": str(logging_dir / TRACKER_PROJECT) if accelerator.log_with else None,
                "torch_threads": torch.get_num_threads(),
                "bad_images_skipped": len(bad_images),  # --on_bad_image skip: distinct rows, all devices
                "bad_images": bad_images,
                "first_step": initial_global_step,
                "last_step": final_step,
                "resumed_from": str(resume_from) if resume_from else None,
                "interrupted": interrupted,  # the signal that stopped the run early, else None
                "last_checkpoint": str(output_dir / last_checkpoint) if last_checkpoint else None,
                "data_seed": data_seed,
                "cache": training_data.report,
                "lora_digest_per_rank": digests,
                "training_wall_time_s": training_time,
                "total_wall_time_s": time.perf_counter() - started,
            },
        )
        write_summary(summary, output_dir)
        print(format_summary(summary), flush=True)
        if bad_images:  # the total, after the per-image warnings scrolled by
            logger.warning(f"{len(bad_images)} unreadable image(s) skipped (--on_bad_image skip); listed in summary.json")
        if args.push_to_hub and repo_id is not None and not interrupted:
            _push_to_hub(args, repo_id, final_paths)
    # Teardown on every process: drop the DDP wrappers (each holds the process group), then meet,
    # then destroy the group. Left to the wrappers' destructors after a peer has exited, the gloo
    # group's teardown can hang (pytorch/pytorch#75097; seen once on the 2-process CPU test).
    del step_context, trainable_modules
    unet = text_encoder_one = text_encoder_two = None  # noqa: F841 -- releases the wrappers
    accelerator.free_memory()
    gc.collect()  # now, not at exit: a wrapper may sit in a reference cycle
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _data_seed(args: argparse.Namespace, accelerator: Any, resume_from: Path | None) -> int:
    """Seed of the data order and augmentations (trainer.sampling): the checkpoint's when resuming, else
    ``--seed``, else a random one chosen by the main process (every process must use the same)."""
    saved = checkpointing.TrainerState.read(resume_from) if resume_from else None
    if saved is not None:
        return saved.data_seed
    if args.seed is not None:
        return int(args.seed)
    import secrets

    return distributed.broadcast_int(accelerator, secrets.randbits(62))


def _save_lora_weights(output_dir: Path, unet: Any, text_encoder_one: Any, text_encoder_two: Any) -> None:
    """``pytorch_lora_weights.safetensors`` as diffusers writes it, replacing any previous file atomically."""
    from trainer.atomic import replace_files

    replace_files(output_dir, lambda tmp: models.save_lora_weights(str(tmp), unet, text_encoder_one, text_encoder_two))


def _gather_skipped_images(skipped: data.SkippedImages) -> list[str]:
    """The bad images every process skipped, each once (all processes must call this)."""
    from accelerate.utils import gather_object

    return sorted(set(gather_object(list(skipped.problems))))


def _build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("To use 8-bit Adam, please install the bitsandbytes library: `pip install bitsandbytes`.") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def _with_prediction_type(noise_scheduler: Any, prediction_type: str | None) -> Any:
    """``--prediction_type`` overrides the scheduler's (diffusers sets it in the loop; once is enough)."""
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    return noise_scheduler


def _final_inference(
    args: argparse.Namespace, accelerator: Any, components: models.SDXLComponents, autocast_dtype: torch.dtype | None, output_dir: Path
) -> list[str]:
    """Reload the base pipeline, load the saved LoRA file into it and render the validation prompts."""
    if not (args.all_validation_prompts and args.num_validation_images > 0):
        return []
    from diffusers import StableDiffusionXLPipeline

    if accelerator.mixed_precision == "fp16":
        components.vae.to(components.weight_dtype)  # the pipeline decodes in the UNet's dtype
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        vae=components.vae,
        revision=args.revision,
        variant=args.variant,
        **models.pipeline_dtype_kwargs(components.weight_dtype),
    )
    import diffusers

    # Without text-encoder LoRA diffusers warns once per encoder that it found none: expected here.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        models.load_lora_into_pipeline(pipeline, str(output_dir))
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    if args.kernels == "on":
        import npu_kernels

        npu_kernels.optimize(pipeline.unet)
    images = generate_images(
        pipeline,
        args.all_validation_prompts,
        args.num_validation_images,
        accelerator.device,
        args.seed,
        args.validation_inference_steps,
        autocast_dtype,
    )
    step = args.max_train_steps
    return [str(p) for p in save_and_log(images, output_dir / "validation" / "final", accelerator, step, "test")]


def _push_to_hub(args: argparse.Namespace, repo_id: str, image_paths: list[str]) -> None:
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
        from_training=True,
        license="creativeml-openrail-m",
        base_model=args.pretrained_model_name_or_path,
        model_description=description,
        inference=True,
    )
    tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "diffusers", "diffusers-training", "lora"]
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))
    upload_folder(
        repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training", ignore_patterns=["step_*", "epoch_*"]
    )


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.sdxl_lora``: :func:`main`, with a bad input reported as one line.

    A :class:`~trainer.preflight.InputError` (bad flag, file, column or image) prints
    ``error: <what and where>`` on stderr and returns exit status 2, with no traceback; ``main(argv)``
    itself raises it, for callers and tests.
    """
    try:
        main(argv)
    except preflight.InputError as error:
        _close_progress_bars()
        print(f"error: {preflight.one_line(error)}", file=sys.stderr, flush=True)
        return preflight.EXIT_STATUS
    except TrainingAborted as error:  # e.g. a non-finite loss: nothing of the failed step was saved
        _close_progress_bars()
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def _close_progress_bars() -> None:
    """End an open tqdm bar's line (an image error stops the run mid-bar), so the error starts its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # the registry tqdm itself iterates this way
        bar.close()


if __name__ == "__main__":
    sys.exit(cli())
