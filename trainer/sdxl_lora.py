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
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from trainer import data, models
from trainer.args import parse_args, tracker_config
from trainer.loop import LoopConfig, StepContext, num_update_steps, resume, train_loop
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
    if args.seed is not None:
        set_seed(args.seed)

    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
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
    train_dataloader = data.build_dataloader(train_dataset, args.train_batch_size, args.dataloader_num_workers)

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

    initial_global_step, first_epoch = resume(accelerator, args, updates_per_epoch)
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

    history = train_loop(
        accelerator,
        LoopConfig(
            max_train_steps=args.max_train_steps,
            num_train_epochs=args.num_train_epochs,
            first_epoch=first_epoch,
            initial_global_step=initial_global_step,
            images_per_micro_step=args.train_batch_size * accelerator.num_processes,
            train_batch_size=args.train_batch_size,
            max_grad_norm=args.max_grad_norm,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            output_dir=args.output_dir,
            debug_loss=args.debug_loss,
        ),
        StepContext(
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
        ),
        trainable_modules,
        optimizer,
        lr_scheduler,
        train_dataloader,
        params_to_optimize,
        progress_bar,
        on_epoch_end=validate,
    )
    progress_bar.close()
    training_time = time.perf_counter() - started

    # ------------------------------------------------------------------ outputs
    peak, memory_kind = peak_memory_bytes(accelerator.device)
    peaks = accelerator.gather(torch.tensor([peak], device=accelerator.device, dtype=torch.int64)).tolist()
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        models.save_lora_weights(
            str(output_dir),
            unwrap(unet),
            unwrap(text_encoder_one) if args.train_text_encoder else None,
            unwrap(text_encoder_two) if args.train_text_encoder else None,
        )
        final_paths = _final_inference(args, accelerator, components, autocast_dtype, output_dir)
        loss_curve = plot_loss_curve(history.losses, output_dir / "loss_curve.png") if history.records else None
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
                "lora_weights": str(output_dir / "pytorch_lora_weights.safetensors"),
                "validation_images": validation_paths + final_paths,
                "loss_curve": str(loss_curve) if loss_curve else None,
                "tensorboard_dir": str(logging_dir / TRACKER_PROJECT) if accelerator.log_with else None,
                "torch_threads": torch.get_num_threads(),
                "training_wall_time_s": training_time,
                "total_wall_time_s": time.perf_counter() - started,
            },
        )
        write_summary(summary, output_dir)
        print(format_summary(summary), flush=True)
        if args.push_to_hub and repo_id is not None:
            _push_to_hub(args, repo_id, final_paths)
    accelerator.end_training()
    return summary


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


if __name__ == "__main__":
    main()
