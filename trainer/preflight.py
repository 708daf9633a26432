"""Preflight: every input problem that can be found without training, found before anything is written.

``python -m trainer.sdxl_lora`` calls :func:`run` right after parsing its flags, before the accelerator is
created, the output directory made or a model loaded. Each check raises :class:`InputError` with one line
that names the flag, file or column and says what was expected (:mod:`trainer.errors`); the CLI (``trainer.sdxl_lora.cli``)
prints it as ``error: <line>`` and exits with status 2, so a bad launch costs seconds and leaves the
output directory as it was.

What is checked:

* what to train: a dataset needs ``--pretrained_model_name_or_path`` and a model a dataset (the embedded
  assets only with neither, or by the name ``embedded``); no flag given as an empty string;
* flags: ``--resolution`` (a positive multiple of 8), ``--mixed_precision`` against the device,
  ``--output_dir`` / ``--logging_dir`` (creatable and writable), ``--resume_from_checkpoint`` (exists),
  ``--max_nonfinite_steps`` (at least 1), the caching flags (``trainer.caching.check_flags``);
* flags that need a library or device: ``--use_8bit_adam`` (bitsandbytes),
  ``--enable_xformers_memory_efficient_attention`` (xformers on CUDA), ``--enable_npu_flash_attention`` and
  ``--use_npu_fused_adamw`` (an Ascend NPU); ``--compile`` / ``--compile_mode`` (``trainer.compiling.check_flags``:
  reduce-overhead needs CUDA, an NPU needs torchair, a mode needs --compile), ``--logging_steps`` (at least 1);
* ``--push_to_hub`` (:func:`check_hub`): the Hub reachable and the token accepted, the one network check;
  ``--enable_bucket``'s settings (``trainer.buckets.check_flags``: at least one bucket, min <= max);
* the model: a local ``--pretrained_model_name_or_path`` has every SDXL subfolder with its config and
  weights; a local ``--vae_name`` is a diffusers ``AutoencoderKL``;
* the dataset: it exists and has rows, ``--image_column`` / ``--caption_column`` exist and hold images /
  captions, and no caption is missing (``None``) or an empty list.

Hub ids (``stabilityai/...``) of models and datasets are not looked up: that needs the network, and ``from_pretrained`` /
``load_dataset`` report their own errors. Unreadable images can only be found while reading them; see
``trainer.data.BadImageGuard`` and ``--on_bad_image``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from trainer import atomic, buckets, caching, checkpointing, compiling, data, flag_rules, ownership
from trainer.args import EMBEDDED
from trainer.errors import InputError, one_line

# datasets and pyarrow are imported inside the functions that use them: loading them takes seconds, and a
# bad flag must be reported without that wait.

# Columns of the embedded shapes dataset (trainer.embedded_default.write_parquet_dataset): checked
# without generating or loading it.
EMBEDDED_DATASET_COLUMNS = ("image", "text")

# Subfolders of an SDXL pipeline in diffusers layout, and the file each must hold (None: any file).
MODEL_SUBFOLDERS: dict[str, str | None] = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "tokenizer": None,
    "tokenizer_2": None,
    "scheduler": "scheduler_config.json",
}
WEIGHTED_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
VAE_CLASSES = ("AutoencoderKL",)  # what models.load_components loads --vae_name as
MAX_ROWS_LISTED = 5


@dataclass
class Checked:
    """What preflight found and the run uses: the loaded dataset (None for the embedded one, generated
    later), what identifies this run (``checkpointing.run_identity``) and the checkpoint to resume from."""

    dataset: Any
    identity: dict[str, Any]
    resume_from: Path | None


def run(args: argparse.Namespace) -> Checked:
    """Every preflight check, in the order a user would fix them: flags, model, dataset, then the
    checkpoint to resume from (damaged ones and those of another run configuration are refused)."""
    check_flags(args)
    check_model(args)
    dataset = check_dataset(args)
    identity = checkpointing.run_identity(args)
    resume_from = checkpointing.find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, identity)
    return Checked(dataset=dataset, identity=identity, resume_from=resume_from)


# ----------------------------------------------------------------------------- flags
def check_flags(args: argparse.Namespace) -> None:
    check_model_given(args)
    check_resolution(args.resolution)
    flag_rules.check(args)  # every numeric and choice flag in range
    if args.report_to == "wandb" and args.hub_token is not None:
        raise InputError(
            "--report_to wandb with --hub_token would expose your token: use `huggingface-cli login` instead of --hub_token"
        )
    check_on_bad_image(getattr(args, "on_bad_image", "skip"))
    requested, source = effective_mixed_precision(args.mixed_precision)
    device_type = training_device_type()
    check_mixed_precision(requested, source, device_type, bf16_supported)
    check_optional_features(args, device_type)
    compiling.check_flags(args, device_type)
    caching.check_flags(args)
    buckets.check_flags(args)
    check_output_dir(args.output_dir, "--output_dir")
    if os.path.isabs(args.logging_dir):  # a relative --logging_dir lives inside --output_dir
        check_output_dir(args.logging_dir, "--logging_dir")
    check_resume(args.resume_from_checkpoint, args.output_dir)
    if not args.memory_plan:  # a plan writes nothing: another run's results in --output_dir do not matter
        ownership.check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    check_hub(args)  # last: the only check that uses the network


def check_model_given(args: argparse.Namespace) -> None:
    """The embedded tiny pipeline only when nothing real is asked for, or when asked for by name.

    A dataset without a model would otherwise train the tiny random pipeline on real data: refused,
    naming the missing flag. (A real model without a dataset is refused by :func:`check_dataset`, after
    the model folder itself was checked.)
    """
    for flag in ("pretrained_model_name_or_path", "dataset_name", "train_data_dir", "output_dir", "logging_dir"):
        if getattr(args, flag, None) == "":
            raise InputError(f"--{flag} is empty: give a path or hub id (or leave the flag out)")
    if args.pretrained_model_name_or_path is None and not getattr(args, "embedded_model", False):
        given = f"--dataset_name {args.dataset_name}" if args.dataset_name is not None else f"--train_data_dir {args.train_data_dir}"
        raise InputError(
            f"--pretrained_model_name_or_path is required with {given} (e.g. stabilityai/stable-diffusion-xl-base-1.0;"
            f" --pretrained_model_name_or_path {EMBEDDED} trains the embedded tiny test pipeline on it)"
        )


def check_optional_features(args: argparse.Namespace, device_type: str) -> None:
    """Flags that need a library or a device this run does not have: one line each, before any download."""
    if args.use_8bit_adam and getattr(args, "use_npu_fused_adamw", False):
        raise InputError("--use_8bit_adam and --use_npu_fused_adamw exclude each other; choose one")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs the bitsandbytes library: pip install bitsandbytes")
    if getattr(args, "use_npu_fused_adamw", False) and device_type != "npu":
        raise InputError(f"--use_npu_fused_adamw needs an Ascend NPU (torch_npu); this run trains on the {device_type}")
    if args.enable_xformers_memory_efficient_attention and device_type != "cuda":
        # what diffusers' enable_xformers_memory_efficient_attention raises (as a traceback) off CUDA
        raise InputError(
            f"--enable_xformers_memory_efficient_attention needs a CUDA GPU (xformers' attention is GPU-only); this run"
            f" trains on the {device_type}"
        )
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise InputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers")
    if args.enable_npu_flash_attention and device_type != "npu":
        raise InputError(f"--enable_npu_flash_attention needs an Ascend NPU (torch_npu); this run trains on the {device_type}")
    if device_type == "mps" and args.mixed_precision == "bf16":
        raise InputError("--mixed_precision bf16 is not supported on MPS; use fp16 or no")


def check_resolution(resolution: int) -> None:
    # The VAE downsamples by 8: other sizes give latents that do not map back onto the pixels.
    if resolution <= 0 or resolution % 8:
        raise InputError(f"--resolution {resolution} is not a positive multiple of 8 (e.g. {max(8, resolution // 8 * 8)})")


def check_on_bad_image(policy: str) -> None:
    if policy not in ("skip", "fail"):  # argparse's choices already refuse others; here for main(argv) users
        raise InputError(f"--on_bad_image {policy!r}: expected 'skip' or 'fail'")


def effective_mixed_precision(flag: str | None) -> tuple[str, str]:
    """(precision, where it came from): the flag, else accelerate's config/launcher environment variable."""
    if flag is not None:
        return flag, f"--mixed_precision {flag}"
    from_env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return from_env, f"ACCELERATE_MIXED_PRECISION={from_env} (accelerate config)"


def training_device_type() -> str:
    """The device type accelerate will train on ("cpu", "cuda", "npu", ...), in accelerate's order.

    Asked of accelerate's availability helpers rather than of ``PartialState()``: creating that state
    here would initialise the process group before the Accelerator's own settings could apply.
    """
    import accelerate.utils as accelerate_utils  # heavy: preflight of a bad flag stays fast without it

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    for device_type in ("mps", "mlu", "sdaa", "musa", "npu", "hpu"):
        available = getattr(accelerate_utils, f"is_{device_type}_available", None)
        if available is not None and available():
            return device_type
    if torch.cuda.is_available():
        return "cuda"
    is_xpu = getattr(accelerate_utils, "is_xpu_available", None)
    return "xpu" if is_xpu is not None and is_xpu() else "cpu"


def bf16_supported(device_type: str) -> bool:
    """Whether ``device_type`` trains in bfloat16 (CPU autocast does; older GPUs and NPUs may not)."""

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    npu = getattr(torch, "npu", None)
    if device_type == "npu" and npu is not None and hasattr(npu, "is_bf16_supported"):
        return bool(npu.is_bf16_supported())
    if device_type == "mps":
        return False  # also refused by trainer.sdxl_lora._check_args
    return True


def check_mixed_precision(requested: str, source: str, device_type: str, bf16_ok: Callable[[str], bool] = bf16_supported) -> None:
    """fp16 needs an accelerator (accelerate refuses it on CPU); bf16 a device that has it."""
    if requested == "fp16" and device_type == "cpu":
        raise InputError(f"{source}: fp16 needs a GPU or NPU and this run trains on the cpu; use bf16 or no")
    if requested == "bf16" and not bf16_ok(device_type):
        raise InputError(f"{source}: this {device_type} device does not support bfloat16; use fp16 or no")


def check_output_dir(path: str, flag: str) -> None:
    """``path`` is a directory or can be made one, and is writable (checked without writing anything)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise InputError(f"{flag} {path} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path} is not writable (no write permission on {existing})")


def check_resume(value: str | None, output_dir: str) -> None:
    """A named checkpoint must exist: as given, or as ``<output_dir>/<name>`` where diffusers looks.

    ``latest`` with no checkpoint yet is fine (diffusers then starts a new run): restart scripts pass it
    from the first launch on.
    """
    if not value or value == "latest":
        return
    name = os.path.basename(value.rstrip("/\\"))
    if os.path.isdir(value) or os.path.isdir(os.path.join(output_dir, name)):
        return
    existing = checkpointing.list_checkpoints(output_dir)
    found = f"checkpoints in {output_dir}: {', '.join(existing)}" if existing else f"no checkpoints in {output_dir}"
    raise InputError(f"--resume_from_checkpoint {value} does not exist ({found})")


# ----------------------------------------------------------------------------- the Hub (--push_to_hub)
HUB_TIMEOUT_S = 10.0  # for the reachability probe: an unreachable Hub must not stall the launch


def hub_repo_id(args: argparse.Namespace) -> str:
    """The repository ``--push_to_hub`` uploads to: ``--hub_model_id``, else ``--output_dir``'s name (diffusers' rule)."""
    return args.hub_model_id or Path(args.output_dir).name


def check_hub(args: argparse.Namespace) -> None:
    """``--push_to_hub`` can upload at the end: a valid repository id, the Hub reachable, a token it accepts.

    Checked now, so that an upload that cannot happen stops the launch in one line (exit status 2) instead
    of failing after the training (diffusers' script meets the network first in ``create_repo``, with a
    traceback). ``--hub_model_id`` without ``--push_to_hub`` would upload nothing: refused too.
    """
    if args.hub_model_id is not None and not args.push_to_hub:
        raise InputError(f"--hub_model_id {args.hub_model_id} without --push_to_hub uploads nothing: add --push_to_hub or leave it out")
    if not args.push_to_hub:
        return
    from huggingface_hub import HfApi, constants, get_session, get_token  # the network client: --push_to_hub only
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = hub_repo_id(args)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        flag = "--hub_model_id" if args.hub_model_id else "--push_to_hub (named after --output_dir; pass --hub_model_id)"
        raise InputError(f"{flag}: {repo_id!r} is not a Hub repository id ({one_line(error)})") from None
    later = "or train without --push_to_hub and upload --output_dir afterwards (hf upload)"
    if hub_offline():
        raise InputError(f"--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, {later}")
    endpoint = constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - requests' or httpx's network errors, by huggingface_hub release
        raise InputError(
            f"--push_to_hub: cannot reach the Hub at {endpoint} ({type(error).__name__}: {one_line(error)}); check the"
            f" network (or HF_ENDPOINT), {later}"
        ) from None
    token = args.hub_token or get_token()
    if not token:
        raise InputError("--push_to_hub needs a Hugging Face token with write access: `hf auth login` (or HF_TOKEN), or --hub_token")
    try:
        HfApi(endpoint=endpoint).whoami(token=token)
    except HfHubHTTPError as error:
        raise InputError(f"--push_to_hub: the Hub at {endpoint} refused the token ({one_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - network errors, as above
        raise InputError(f"--push_to_hub: cannot reach the Hub at {endpoint} ({type(error).__name__}: {one_line(error)}); {later}") from None


# ----------------------------------------------------------------------------- model
def looks_local(name: str) -> bool:
    """Whether a model/dataset name means a local path rather than a hub id (``owner/name``)."""
    if os.path.exists(name):
        return True
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name.count("/") > 1 or "\\" in name


def check_model(args: argparse.Namespace) -> None:
    vae = args.pretrained_vae_model_name_or_path
    check_hub_ids_offline(args)
    if not getattr(args, "embedded_model", False) and args.pretrained_model_name_or_path and looks_local(args.pretrained_model_name_or_path):
        # Validation builds the whole pipeline, which needs model_index.json; training alone does not.
        need_index = bool(getattr(args, "all_validation_prompts", None)) and args.num_validation_images > 0
        check_model_dir(args.pretrained_model_name_or_path, need_vae=vae is None, need_model_index=need_index)
    if vae is not None and looks_local(vae):
        check_vae_dir(vae)


def check_model_dir(path: str, need_vae: bool = True, need_model_index: bool = False) -> None:
    """An SDXL pipeline in diffusers layout: every subfolder with its config, the models with weights."""
    flag = "--pretrained_model_name_or_path"
    root = Path(path).expanduser()
    _require_directory(root, flag, path)
    layout = ", ".join(f"{name}/" for name in MODEL_SUBFOLDERS)
    for sub, required_file in MODEL_SUBFOLDERS.items():
        if sub == "vae" and not need_vae:
            continue
        folder = root / sub
        if not folder.is_dir():
            raise InputError(f"{flag} {path} has no {sub}/ folder (an SDXL pipeline in diffusers layout has {layout})")
        if required_file is not None and not (folder / required_file).is_file():
            raise InputError(f"{flag} {path}: {sub}/ has no {required_file}")
        if required_file is None and not any(folder.iterdir()):
            raise InputError(f"{flag} {path}: {sub}/ is empty")
        if required_file is not None:
            _read_config(folder / required_file, flag)
        if sub in WEIGHTED_SUBFOLDERS and not _has_weights(folder):
            raise InputError(f"{flag} {path}: {sub}/ has no weights (*.safetensors or *.bin)")
        if sub in WEIGHTED_SUBFOLDERS:
            check_weight_files(folder, flag)
            check_config_matches_weights(folder, flag)
    if need_model_index and not (root / "model_index.json").is_file():
        raise InputError(f"{flag} {path} has no model_index.json, which validation needs to build the pipeline")


def check_vae_dir(path: str) -> None:
    """``--vae_name`` must be a diffusers ``AutoencoderKL`` folder, not a UNet, a pipeline or anything else."""
    flag = "--vae_name"
    root = Path(path).expanduser()
    _require_directory(root, flag, path)
    config_path = root / "config.json"
    if not config_path.is_file():
        if (root / "vae" / "config.json").is_file():
            raise InputError(f"{flag} {path} is a whole pipeline, not a VAE: pass {root / 'vae'}")
        raise InputError(f"{flag} {path} is not a VAE: it has no config.json (expected a diffusers AutoencoderKL folder)")
    class_name = _read_config(config_path, flag).get("_class_name")
    if class_name not in VAE_CLASSES:
        raise InputError(f"{flag} {path} is not a VAE: its config.json has _class_name {class_name!r}, expected 'AutoencoderKL'")
    if not _has_weights(root):
        raise InputError(f"{flag} {path} has no weights (*.safetensors or *.bin)")
    check_weight_files(root, flag)


def _require_directory(root: Path, flag: str, shown: str) -> None:
    if not root.exists():
        raise InputError(f"{flag} {shown}: no such directory")
    if not root.is_dir():
        raise InputError(f"{flag} {shown} is a file, expected a directory")


def _read_config(path: Path, flag: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{flag}: {path} is not valid JSON ({one_line(error)})") from None
    if not isinstance(config, dict):
        raise InputError(f"{flag}: {path} is not a JSON object")
    return config


def check_weight_files(folder: Path, flag: str) -> None:
    """Each ``*.safetensors`` file is whole (header and data sizes agree): a truncated download is found
    here, in one line, rather than by ``from_pretrained`` after the other models have loaded."""
    for file in sorted(folder.glob("*.safetensors")):
        problem = atomic.file_damage(file)
        if problem:
            raise InputError(f"{flag}: {file} cannot be loaded ({problem}); download it again")


def check_config_matches_weights(folder: Path, flag: str) -> None:
    """The model ``config.json`` describes has the shapes its ``*.safetensors`` files hold.

    Builds the model on the meta device (no memory, no weights read) and compares each tensor shape with
    the safetensors headers: a config from another model (or a hand-edited one) is found here, in one
    line, instead of as pages of "size mismatch" after the other models loaded. ``.bin`` weights are not
    checked (reading their shapes means unpickling them).
    """
    held = _safetensors_shapes(folder)
    if not held:
        return
    expected = _meta_model_shapes(folder)
    if expected is None:
        return
    for key, shape in held.items():
        if key in expected and expected[key] != shape:
            raise InputError(
                f"{flag}: {folder}/config.json does not match its weights ({key}: the config builds {expected[key]},"
                f" the file holds {shape})"
            )


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    import struct

    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        shapes.update({key: list(entry["shape"]) for key, entry in header.items() if key != "__metadata__"})
    return shapes


def _meta_model_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Parameter shapes of the model ``folder/config.json`` names (diffusers or transformers class), built
    without memory; None when the class is not one of theirs."""
    from accelerate import init_empty_weights

    config = _read_config(folder / "config.json", "--pretrained_model_name_or_path")
    with init_empty_weights():
        if "_class_name" in config:
            import diffusers

            model_class = getattr(diffusers, str(config["_class_name"]), None)
            if model_class is None:
                return None
            model = model_class.from_config(model_class.load_config(str(folder)))
        else:
            import transformers

            names = config.get("architectures") or []
            model_class = getattr(transformers, str(names[0]), None) if names else None
            if model_class is None:
                return None
            model = model_class(transformers.AutoConfig.from_pretrained(str(folder)))
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (huggingface_hub's spellings of true)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_ids_offline(args: argparse.Namespace) -> None:
    """With ``HF_HUB_OFFLINE`` set, a hub id must already be in the cache: said before anything loads."""
    if not hub_offline():
        return
    from huggingface_hub import snapshot_download

    names = [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path), ("--vae_name", args.pretrained_vae_model_name_or_path)]
    for flag, name in names:
        if not name or name == EMBEDDED or looks_local(name) or (flag != "--vae_name" and getattr(args, "embedded_model", False)):
            continue
        try:
            snapshot_download(name, revision=args.revision, cache_dir=args.cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - huggingface_hub's "not in the cache" errors vary by release
            raise InputError(
                f"{flag} {name} is a hub id, HF_HUB_OFFLINE is set and it is not in the cache: download it first"
                " (or unset HF_HUB_OFFLINE) or pass a local folder"
            ) from None


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- dataset
def check_dataset(args: argparse.Namespace) -> Any:
    """Load the dataset as training will and check it; returns it (None for the embedded dataset), and the
    run trains on that object (``trainer.data.build_train_dataset(..., loaded=...)``): loaded once."""
    if getattr(args, "embedded_dataset", False):
        check_columns(EMBEDDED_DATASET_COLUMNS, args, "the embedded dataset")
        return None
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            f"--dataset_name or --train_data_dir is required with --pretrained_model_name_or_path"
            f" {args.pretrained_model_name_or_path} (--dataset_name {EMBEDDED} trains on the embedded shapes dataset)"
        )
    check_dataset_location(args.dataset_name, args.train_data_dir)
    source = dataset_source(args)
    dataset = load_dataset_or_explain(args, source)
    check_columns(dataset.column_names, args, f"dataset {source}")
    check_image_column(dataset, args.image_column, source)
    check_captions(dataset, args.caption_column, source)
    check_rows(len(dataset), args.max_train_samples, source)
    return dataset


def dataset_source(args: argparse.Namespace) -> str:
    return str(args.dataset_name if args.dataset_name is not None else args.train_data_dir)


def check_dataset_location(dataset_name: str | None, train_data_dir: str | None) -> None:
    """A local ``--dataset_name`` / the ``--train_data_dir`` exists, is a directory and holds data files."""
    if dataset_name is not None:
        if looks_local(dataset_name):
            _require_data_directory(dataset_name, "--dataset_name", "data files (e.g. data/*.parquet, or images with a metadata.jsonl)")
        return
    if train_data_dir is not None:
        _require_data_directory(train_data_dir, "--train_data_dir", "images and a metadata.jsonl with their captions")


def _require_data_directory(path: str, flag: str, expected: str) -> None:
    root = Path(path).expanduser()
    _require_directory(root, flag, path)
    if not data.has_data_files(str(root)):
        raise InputError(f"{flag} {path} has no data: expected {expected}")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Generating train split" bars before the run has started (the error must stand alone)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def load_dataset_or_explain(args: argparse.Namespace, source: str) -> Any:
    """``trainer.data.load_train_dataset``, with "not found"/"empty" failures turned into InputError."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetNotFoundError


    flag = "--dataset_name" if args.dataset_name is not None else "--train_data_dir"
    try:
        with _quiet_datasets():
            return data.load_train_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for a split with zero rows
            raise InputError(f"dataset {source} has no rows") from None
        raise InputError(f"{flag} {source}: cannot load the dataset ({one_line(error)})") from None
    except (DatasetNotFoundError, EmptyDatasetError, OSError) as error:  # OSError: missing files, offline hub
        raise InputError(f"{flag} {source}: cannot load the dataset ({one_line(error)})") from None


def check_columns(column_names: Sequence[str], args: argparse.Namespace, what: str) -> None:
    columns = ", ".join(column_names)
    for flag in ("image_column", "caption_column"):
        name = getattr(args, flag)
        if name is not None and name not in column_names:
            raise InputError(f"{what} has no column {name!r} (--{flag}); columns: {columns}")


def check_image_column(dataset: Any, column: str, source: str) -> None:
    """The image column is a ``datasets.Image`` feature (parquet/imagefolder images), as diffusers needs."""
    from datasets import Image

    feature = dataset.features[column]
    if isinstance(feature, Image):
        return
    raise InputError(f"dataset {source}: column {column!r} (--image_column) holds {_describe(feature)}, expected images")


def check_captions(dataset: Any, column: str, source: str) -> None:
    """Captions are strings or non-empty lists of strings, none missing.

    An empty string is a valid caption (that image trains unconditionally, as SDXL's empty prompt); a
    missing one (``None``) is refused rather than guessed: it is usually a broken metadata file.
    Checked on the Arrow column, so no image is decoded.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    kind = values.type
    where = f"dataset {source}: caption column {column!r}"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        _refuse_rows(pc.is_null(values), where, "missing (None)", len(values))
        return
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_text(kind.value_type):
        _refuse_rows(pc.is_null(values), where, "missing (None)", len(values))
        _refuse_rows(pc.equal(pc.list_value_length(values), 0), where, "an empty list", len(values))
        if pc.list_flatten(values).null_count:
            rows = [i for i, row in enumerate(values.to_pylist()) if row and any(c is None for c in row)]
            raise InputError(f"{where} has None inside the caption lists of rows {_rows(rows)}")
        return
    raise InputError(f"{where} (--caption_column) holds {_describe(dataset.features[column])}, expected strings or lists of strings")


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _refuse_rows(mask: Any, where: str, what: str, total: int) -> None:
    import pyarrow.compute as pc

    rows = pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()
    if rows:
        hint = '; give every row a caption ("" trains that image unconditionally)'
        raise InputError(f"{where} is {what} in {len(rows)} of {total} rows: {_rows(rows)}{hint}")


def _rows(rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_LISTED])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > MAX_ROWS_LISTED else "")


def _describe(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    return str(dtype) if isinstance(dtype, str) and dtype != "list" else type(feature).__name__


def check_rows(num_rows: int, max_train_samples: int | None, source: str) -> None:
    if num_rows == 0:
        raise InputError(f"dataset {source} has no rows")
    if max_train_samples is not None and max_train_samples <= 0:
        raise InputError(f"--max_train_samples {max_train_samples} leaves no rows to train on")
