"""Command line of ``python -m trainer.sdxl_lora``.

Every flag of diffusers' ``examples/text_to_image/train_text_to_image_lora_sdxl.py`` with the same name,
type and default, so existing launch scripts work unchanged, plus:

* the names Ascend's ModelZoo README documents: ``--vae_name`` (same as
  ``--pretrained_vae_model_name_or_path``) and ``--validation_prompts`` (one or more prompts);
* ``--kernels on|off``: train through ``npu_kernels.optimize`` (default) or with stock diffusers modules;
* ``--validation_inference_steps``: denoising steps of validation images (default: the pipeline's).
* ``--on_bad_image skip|fail``: what an undecodable image does (see ``trainer.preflight``).
* ``--cache_latents`` / ``--cache_text_embeddings``: run the frozen encoders once (see ``trainer.caching``).
* ``--compile`` / ``--compile_mode`` / ``--compile_backend`` / ``--logging_steps``: graph mode (see ``trainer.compiling``).
* ``--memory_plan`` / ``--ignore_memory_plan``: the planned peak memory (see ``trainer.memory_plan``).
* ``--output_kohya_format``: diffusers' DreamBooth SDXL flag, the LoRA also in the kohya key layout
  (see ``trainer.checkpointing.write_kohya_lora``).
* ``--enable_bucket`` / ``--min_bucket_reso`` / ``--max_bucket_reso`` / ``--bucket_reso_steps``: kohya
  sd-scripts' aspect-ratio buckets (see ``trainer.buckets``).

Unlike the diffusers script a run without any model or dataset flag is allowed: it trains the embedded
tiny SDXL-shaped pipeline on the embedded shapes dataset (a smoke test). Otherwise nothing is filled in
by omission: a dataset without ``--pretrained_model_name_or_path`` (or a model without a dataset) is an
error (``trainer.preflight``); ``--pretrained_model_name_or_path embedded`` / ``--dataset_name embedded``
ask for the embedded assets by name. Whenever the embedded model is used, the SDXL-sized defaults
(1024 px, batch 16, 100 epochs) that the user did not set are replaced by
:data:`trainer.embedded_default.EMBEDDED_OVERRIDES`, and the summary says so.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Sequence

from trainer.buckets import DEFAULT_BUCKET_RESO_STEPS, DEFAULT_MAX_BUCKET_RESO, DEFAULT_MIN_BUCKET_RESO, SIDE_MULTIPLE
from trainer.checkpointing import KOHYA_LORA_FILE
from trainer.compiling import COMPILE_BACKENDS, COMPILE_MODES
from trainer.embedded_default import EMBEDDED_OVERRIDES
from trainer.guards import DEFAULT_MAX_NONFINITE_STEPS

#: The value of --pretrained_model_name_or_path / --dataset_name that names the embedded assets.
EMBEDDED = "embedded"
#: npu_kernels.RECOMPUTE_LEVELS, written out so that parsing flags does not import the kernels
#: (tests/trainer/test_cli.py holds the two equal).
RECOMPUTE_LEVELS = ("none", "norms_and_text", "half_geglu_projection", "geglu_projection", "attention_projections")
#: diffusers' --image_interpolation_mode choices: the names of torchvision's ``InterpolationMode`` in the
#: order diffusers lists them (``dir()``), written out because torchvision is not a dependency here.
IMAGE_INTERPOLATION_MODES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")

DATASET_NAME_MAPPING: dict[str, tuple[str, str]] = {
    # diffusers' table (image column, caption column); the names Ascend's scripts use are added.
    "lambdalabs/naruto-blip-captions": ("image", "text"),
    "lambdalabs/pokemon-blip-captions": ("image", "text"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after every flag and keeps the epilog's line breaks."""


_DESCRIPTION = """\
SDXL LoRA fine-tuning: diffusers' train_text_to_image_lora_sdxl.py recipe (same flags, same semantics)
with npu_kernels' fused attention, GroupNorm+SiLU and GEGLU in the UNet.

Run without arguments to train the embedded tiny SDXL pipeline on a generated shapes dataset (a smoke
test). With a dataset, --pretrained_model_name_or_path is required."""

_EPILOG = (
    "embedded default: with no model and no dataset flag (or --pretrained_model_name_or_path embedded) a tiny\n"
    "SDXL-shaped pipeline is generated (cached under $NPU_KERNELS_CACHE or ~/.cache/npu_kernels) and these\n"
    "defaults replace the ones above unless given on the command line:\n"
    + "\n".join(f"  --{key} {value}" for key, value in EMBEDDED_OVERRIDES.items())
)


def build_parser() -> argparse.ArgumentParser:
    """The parser. Help texts follow diffusers' where the flag is diffusers'."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sdxl_lora", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_HelpFormatter
    )
    add = parser.add_argument

    # ---------------------------------------------------------------- models
    add(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Path to pretrained model or model identifier from huggingface.co/models (diffusers layout)."
        f" Required with a dataset; '{EMBEDDED}' names the embedded tiny test pipeline (also what a run with no"
        " model and no dataset flag uses).",
    )
    add(
        "--pretrained_vae_model_name_or_path",
        "--vae_name",
        dest="pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Path to pretrained VAE model with better numerical stability (e.g. madebyollin/sdxl-vae-fp16-fix)."
        " More details: https://github.com/huggingface/diffusers/pull/4038. When given, the VAE runs in the"
        " mixed-precision dtype; otherwise the model's own VAE is kept in float32.",
    )
    add("--revision", type=str, default=None, help="Revision of pretrained model identifier from huggingface.co/models.")
    add(
        "--variant",
        type=str,
        default=None,
        help="Variant of the model files of the pretrained model identifier from huggingface.co/models, 'e.g.' fp16",
    )

    # ---------------------------------------------------------------- data
    add(
        "--dataset_name",
        type=str,
        default=None,
        help="The name of the Dataset (from the HuggingFace hub) to train on (could be your own, possibly private,"
        " dataset). It can also be a path pointing to a local copy of a dataset in your filesystem, or to a"
        " folder containing files that Datasets can understand, such as the layout of Ascend's README"
        " (README.MD, dataset_infos.json, data/*.parquet with image and text columns).",
    )
    add(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The config of the Dataset, leave as None if there's only one config.",
    )
    add(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder containing the training data. Folder contents must follow the structure described in"
        " https://huggingface.co/docs/datasets/image_dataset#imagefolder. In particular, a `metadata.jsonl` file"
        " must exist to provide the captions for the images. Ignored if `dataset_name` is specified.",
    )
    add("--image_column", type=str, default="image", help="The column of the dataset containing an image.")
    add(
        "--caption_column",
        type=str,
        default="text",
        help="The column of the dataset containing a caption or a list of captions.",
    )
    add(
        "--max_train_samples",
        type=int,
        default=None,
        help="For debugging purposes or quicker training, truncate the number of training examples to this value if set.",
    )
    add("--cache_dir", type=str, default=None, help="The directory where the downloaded models and datasets will be stored.")
    add(
        "--resolution",
        type=int,
        default=1024,
        help="The resolution for input images, all the images in the train/validation dataset will be resized to"
        " this resolution",
    )
    add(
        "--center_crop",
        default=False,
        action="store_true",
        help="Whether to center crop the input images to the resolution. If not set, the images will be randomly"
        " cropped. The images will be resized to the resolution first before cropping.",
    )
    add("--random_flip", action="store_true", help="whether to randomly flip images horizontally")
    add(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Number of subprocesses to use for data loading. 0 means that the data will be loaded in the main process.",
    )
    add(
        "--debug_loss",
        action="store_true",
        help="debug loss for each image, if filenames are available in the dataset",
    )

    # ---------------------------------------------------------------- validation
    add(
        "--validation_prompt",
        type=str,
        default=None,
        help="A prompt that is used during validation to verify that the model is learning.",
    )
    add(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="One or more validation prompts (Ascend's name); used together with --validation_prompt.",
    )
    add(
        "--num_validation_images",
        type=int,
        default=4,
        help="Number of images that should be generated during validation with each validation prompt.",
    )
    add(
        "--validation_epochs",
        type=int,
        default=1,
        help="Run fine-tuning validation every X epochs. The validation process consists of running the prompt"
        " `args.validation_prompt` multiple times: `args.num_validation_images`.",
    )
    add(
        "--validation_inference_steps",
        type=int,
        default=None,
        help="Denoising steps for validation images; None uses the pipeline's default (50), as diffusers does.",
    )

    # ---------------------------------------------------------------- output and logging
    add(
        "--output_dir",
        type=str,
        default="sd-model-finetuned-lora",
        help="The output directory where the model predictions and checkpoints will be written.",
    )
    add(
        "--logging_dir",
        type=str,
        default="logs",
        help="[TensorBoard](https://www.tensorflow.org/tensorboard) log directory, relative to --output_dir.",
    )
    add(
        "--report_to",
        type=str,
        default="tensorboard",
        help='The integration to report the results and logs to. Supported platforms are `"tensorboard"`'
        ' (default), `"wandb"` and `"comet_ml"`. Use `"all"` to report to all integrations.',
    )
    add(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the results of an earlier run in --output_dir (its LoRA, summary and checkpoints). Without it"
        " a new run into a folder holding another run's results stops (exit status 2) unless it resumes"
        " (--resume_from_checkpoint), as transformers' Trainer does.",
    )
    add("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    add("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    add(
        "--hub_model_id",
        type=str,
        default=None,
        help="The name of the repository to keep in sync with the local `output_dir`.",
    )

    # ---------------------------------------------------------------- training
    add("--seed", type=int, default=None, help="A seed for reproducible training.")
    add(
        "--train_text_encoder",
        action="store_true",
        help="Whether to train the text encoder. If set, the text encoder should be float32 precision.",
    )
    add("--train_batch_size", type=int, default=16, help="Batch size (per device) for the training dataloader.")
    add("--num_train_epochs", type=int, default=100, help="Number of passes over the dataset.")
    add(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform.  If provided, overrides num_train_epochs.",
    )
    add(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint of the training state every X updates. These checkpoints can be used both as final"
        " checkpoints in case they are better than the last checkpoint, and are also suitable for resuming"
        " training using `--resume_from_checkpoint`.",
    )
    add("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    add(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Whether training should be resumed from a previous checkpoint. Use a path saved by"
        ' `--checkpointing_steps`, or `"latest"` to automatically select the last available checkpoint.',
    )
    add(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of updates steps to accumulate before performing a backward/update pass.",
    )
    add(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    add(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="Initial learning rate (after the potential warmup period) to use.",
    )
    add(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.",
    )
    add(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial",'
        ' "constant", "constant_with_warmup"]',
    )
    add("--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler.")
    add(
        "--snr_gamma",
        type=float,
        default=None,
        help="SNR weighting gamma to be used if rebalancing the loss. Recommended value is 5.0. "
        "More details here: https://arxiv.org/abs/2303.09556.",
    )
    add(
        "--allow_tf32",
        action="store_true",
        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training. For more information,"
        " see https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices",
    )
    add("--use_8bit_adam", action="store_true", help="Whether or not to use 8-bit Adam from bitsandbytes.")
    add(
        "--use_npu_fused_adamw",
        action="store_true",
        help="Ascend NPU only: torch_npu.optim.NpuFusedAdamW (one fused update over all LoRA parameters) instead of"
        " torch.optim.AdamW.",
    )
    add(
        "--max_nonfinite_steps",
        type=int,
        default=DEFAULT_MAX_NONFINITE_STEPS,
        help="With --mixed_precision fp16 the gradient scaler skips a step whose loss is NaN/inf and training goes"
        " on; this many such steps in a row stop the run. Without fp16 the first non-finite loss stops it.",
    )
    add("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    add("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    add("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    add("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer")
    add("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    add(
        "--prediction_type",
        type=str,
        default=None,
        help="The prediction_type that shall be used for training. Choose between 'epsilon' or 'v_prediction' or"
        " leave `None`. If left to `None` the default prediction type of the scheduler:"
        " `noise_scheduler.config.prediction_type` is chosen.",
    )
    add(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Whether to use mixed precision. Choose between fp16 and bf16 (bfloat16). Default to the value of"
        " accelerate config of the current system or the flag passed with the `accelerate.launch` command. Use"
        " this argument to override the accelerate config.",
    )
    add("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    add(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers."
    )
    add("--enable_npu_flash_attention", action="store_true", help="Whether or not to use npu flash attention.")
    add("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    add("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")

    # ---------------------------------------------------------------- newer diffusers flags, the kohya file
    add(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=IMAGE_INTERPOLATION_MODES,
        help="The image interpolation method to use for resizing images (torchvision's InterpolationMode names,"
        " applied as torchvision applies them to PIL images: nearest_exact is PIL's nearest).",
    )
    add(
        "--output_kohya_format",
        action="store_true",
        help="Also write the LoRA in the kohya key layout (AUTOMATIC1111, ComfyUI, Forge, kohya sd-scripts) as"
        f" {KOHYA_LORA_FILE}, next to the diffusers file, in --output_dir and in every checkpoint (diffusers'"
        " convert_state_dict_to_kohya, as its DreamBooth SDXL script's flag of the same name).",
    )

    # ---------------------------------------------------------------- DoRA (diffusers' DreamBooth SDXL script)
    add(
        "--use_dora",
        action="store_true",
        help="Train a DoRA (Weight-Decomposed Low-Rank Adaptation, https://huggingface.co/papers/2402.09353):"
        " PEFT's LoraConfig(use_dora=True), as diffusers' train_dreambooth_lora_sdxl.py. The LoRA file then holds"
        " each layer's magnitude vector too; load_lora_weights reads it. With the kernels on, the DoRA layers run"
        " npu_kernels.dora_linear (row norms without forming W + s*B*A).",
    )

    # ---------------------------------------------------------------- npu_kernels
    add(
        "--kernels",
        type=str,
        default="on",
        choices=["on", "off"],
        help="on: the UNet runs npu_kernels' fused attention, GroupNorm+SiLU and GEGLU (npu_kernels.optimize);"
        " off: stock diffusers modules.",
    )

    add(
        "--geglu_approximate",
        type=str,
        default="none",
        choices=["none", "tanh"],
        help="GELU of the fused GEGLU (--kernels on): none = erf, what diffusers computes on CPU/GPU; tanh = what"
        " stock diffusers computes on Ascend NPU (npu_geglu approximate=1), to reproduce its numbers.",
    )
    add(
        "--recompute",
        type=str,
        default="none",
        choices=RECOMPUTE_LEVELS,
        help="(--kernels on) what the fused ops recompute in the backward instead of keeping it, from none (the"
        " default) to the most memory-frugal level (npu_kernels.optimize(recompute=...)); each level recomputes"
        " what the one before does and more. none: no GEMM (LayerNorm outputs from their inputs, the fused ops'"
        " elementwise maths). norms_and_text: + the text states' casts, cross-attention key/value from the 77 text"
        " tokens. half_geglu_projection: + the hidden half of"
        " each feed-forward's projection (half a GEMM more per feed-forward backward). geglu_projection: the whole projection"
        " (its 8x wider output is not kept; one more GEMM per feed-forward backward). attention_projections: +"
        " attention's query/key/value from the projections' input. Stands down inside --gradient_checkpointing"
        " blocks. Same values and gradients at every level (docs/training.md).",
    )
    add(
        "--recompute_geglu_projection",
        dest="recompute",
        action="store_const",
        const="geglu_projection",
        help="the older name of --recompute geglu_projection.",
    )

    # ---------------------------------------------------------------- graph mode (trainer.compiling)
    add(
        "--compile",
        action="store_true",
        help="torch.compile the whole UNet (fullgraph, static shapes; after npu_kernels.optimize). The first step"
        " compiles (reported apart as compile time); a partial last batch per epoch is dropped so that no shape"
        " changes mid-run. Validation uses the uncompiled UNet.",
    )
    add(
        "--compile_mode",
        type=str,
        default=None,
        choices=list(COMPILE_MODES),
        help="torch.compile mode with --compile (an error without it); None means default. reduce-overhead also"
        " captures the step in CUDA graphs (CUDA only).",
    )
    add(
        "--compile_backend",
        type=str,
        default=None,
        choices=list(COMPILE_BACKENDS),
        help="torch.compile backend with --compile: inductor generates fused kernels (the speed-up); aot_eager"
        " captures the same forward and backward graphs and runs them op by op (no code generation: compiles in"
        " seconds, for checking graph capture or bisecting an inductor problem). None means inductor, which on"
        " an Ascend NPU is torchair's backend.",
    )
    add(
        "--logging_steps",
        type=int,
        default=1,
        help="Read the loss on the host (progress bar, trackers, non-finite-loss check) every N optimizer steps;"
        " in between the device runs ahead without a synchronisation. Every step's loss is still recorded.",
    )

    # ---------------------------------------------------------------- bad inputs (trainer.preflight)
    add(
        "--on_bad_image",
        type=str,
        default="skip",
        choices=["skip", "fail"],
        help="An image that cannot be decoded (corrupt, truncated, missing file). skip: train on the next row"
        " instead, warn once per image and count them in summary.json; fail: stop with an error naming the"
        " row and file.",
    )

    # ---------------------------------------------------------------- caching (trainer.caching)
    add(
        "--cache_latents",
        action="store_true",
        help="Encode every image with the VAE once before training and sample the cached latent distribution in"
        " each step. --random_flip is honoured (both orientations are cached); a random crop is not (use"
        " --center_crop or square images).",
    )
    add(
        "--cache_text_embeddings",
        action="store_true",
        help="Run both text encoders once per distinct caption before training. Not with --train_text_encoder.",
    )
    # ---------------------------------------------------------------- aspect-ratio buckets (trainer.buckets)
    add(
        "--enable_bucket",
        action="store_true",
        help="Train each image at the bucket nearest to its aspect ratio (about --resolution^2 pixels, sides in"
        " steps of --bucket_reso_steps) instead of a --resolution square crop, as kohya sd-scripts' flag; SDXL's"
        " size and crop time ids get the real sizes. Every batch, on every process, is from one bucket.",
    )
    add(
        "--min_bucket_reso",
        type=int,
        default=DEFAULT_MIN_BUCKET_RESO,
        help="With --enable_bucket: the shortest side a bucket may have (kohya's flag).",
    )
    add(
        "--max_bucket_reso",
        type=int,
        default=DEFAULT_MAX_BUCKET_RESO,
        help="With --enable_bucket: the longest side a bucket may have (kohya's flag; its default, 1024, suits SD"
        " 1.x: at SDXL's 1024 px it would leave only the square with the full pixel count).",
    )
    add(
        "--bucket_reso_steps",
        type=int,
        default=DEFAULT_BUCKET_RESO_STEPS,
        help=f"With --enable_bucket: bucket sides are multiples of this (kohya's flag; a multiple of {SIDE_MULTIPLE}"
        " for SDXL).",
    )
    # ---------------------------------------------------------------- memory plan (trainer.memory_plan)
    add(
        "--memory_plan",
        action="store_true",
        help="Print the planned peak device memory of this configuration, item by item (one step traced on fake"
        " tensors: no weights are loaded), and exit. Every run prints the plan before loading its models.",
    )
    add(
        "--ignore_memory_plan",
        action="store_true",
        help="Train even when the memory plan exceeds the CUDA/NPU device's free memory (otherwise the run stops"
        " before loading weights and names the flags that would make it fit).",
    )
    return parser


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """Destinations the command line sets explicitly (a second parse in which every default is suppressed)."""
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse exposes no public way to list actions
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    namespace, _ = parser.parse_known_args(list(argv))
    return set(vars(namespace))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) and resolve what diffusers' ``parse_args`` resolves.

    Adds ``args.embedded_model`` / ``args.embedded_dataset`` (whether the embedded assets are used: named
    ``embedded``, or no model and no dataset flag at all) and ``args.all_validation_prompts``
    (``--validation_prompt`` then ``--validation_prompts``). A dataset without a model leaves
    ``embedded_model`` False with no model: ``trainer.preflight`` refuses that.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(argv)

    nothing_asked = args.pretrained_model_name_or_path is None and args.dataset_name is None and args.train_data_dir is None
    args.embedded_model = nothing_asked or args.pretrained_model_name_or_path == EMBEDDED
    no_dataset = args.dataset_name is None and args.train_data_dir is None
    args.embedded_dataset = args.dataset_name == EMBEDDED or (no_dataset and args.embedded_model)
    if args.embedded_model:
        for key, value in EMBEDDED_OVERRIDES.items():
            # --validation_prompt counts as choosing prompts: then the embedded prompts are not added.
            if key == "validation_prompts" and "validation_prompt" in explicit:
                continue
            if key not in explicit:
                setattr(args, key, copy.deepcopy(value))  # never share the module-level list

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank

    prompts = [args.validation_prompt] if args.validation_prompt else []
    prompts += list(args.validation_prompts or [])
    args.all_validation_prompts = prompts
    return args


def resolved(args: argparse.Namespace, **values: Any) -> argparse.Namespace:
    """A copy of ``args`` with ``values`` replaced: what the run resolved (the embedded assets' paths, the
    schedule, the scaled learning rate), leaving the parsed flags as the user typed them."""
    unknown = set(values) - set(vars(args))
    if unknown:
        raise AttributeError(f"not flags of this parser: {', '.join(sorted(unknown))}")
    return argparse.Namespace(**{**vars(args), **values})


_SECRET_FLAGS = ("hub_token",)


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` reduced to the scalar types TensorBoard's hparams accept (lists become strings),
    without secrets: trackers upload their config."""
    config: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in _SECRET_FLAGS:
            continue
        if isinstance(value, (list, tuple)):
            value = " | ".join(str(v) for v in value)
        if value is None or isinstance(value, (bool, int, float, str)):
            config[key] = value
        else:
            config[key] = str(value)
    return config
