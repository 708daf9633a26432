"""The memory plan: the peak device memory of one training step of this run, predicted before any weight loads.

``python -m trainer.sdxl_lora <flags> --memory_plan`` prints it and exits; every other run prints it in its
preflight and, on a CUDA GPU or an Ascend NPU, stops (exit 2, one line) when it will not fit in the device's
free memory, naming the flags that would make it fit (``--ignore_memory_plan`` runs anyway).

How it is measured, not estimated: the run's four models are built from their configs under PyTorch's
``FakeTensorMode`` (tensors with shape, dtype and device but no storage), prepared by the trainer's own
functions (:mod:`trainer.models`: dtypes, PEFT LoRA, ``npu_kernels.optimize``, gradient checkpointing;
:mod:`trainer.optim`: the optimizer), and one step -- :func:`trainer.loop.training_loss` on a batch of the
run's resolution and size (pixels and token ids, or the cached latents / embeddings), backward, gradient
clipping, the optimizer update -- runs on them under ``torch.distributed._tools.mem_tracker.MemTracker``
(without its module hooks: see :func:`_mem_tracker`), which follows every storage the step allocates and
frees and records the peak by kind. No per-layer
formula: a change in an op, a flag or diffusers changes the plan by itself. The optimizer's states are
created first (one update with zero gradients), so the step traced is a steady-state one.

What it leaves out: the allocator's fragmentation (a margin, :data:`ALLOCATOR_SLACK`, on devices with a
caching allocator), the fp16 gradient scaler's scalars, ``--compile`` (the eager step is planned) and
8-bit / NPU-fused AdamW (planned as ``torch.optim.AdamW``). The trace runs on fake CUDA tensors on a CUDA
machine and on fake CPU tensors elsewhere (an NPU's plan is the CPU kernels'); npu_kernels' PyTorch backend
serves the ops while tracing, which saves for the backward what every backend saves (the kernel contract).
The VAE and the text encoders stay on the device with the caching flags too (the trainer keeps them for
validation); what caching removes is their work, and its memory, in every step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from trainer import loop, models, optim, preflight, sdxl_configs
from trainer.args import RECOMPUTE_LEVELS
from trainer.embedded_default import ensure_assets
from trainer.errors import InputError, one_line

logger = logging.getLogger(__name__)

#: Margin for the caching allocator's fragmentation (reserved minus allocated memory), as a share of the
#: step's activations and temporaries: it depends on the order of allocations, which a trace does not
#: reproduce. benchmarks/memory_plan_accuracy.py reports the measured reserved memory on a GPU.
ALLOCATOR_SLACK = 0.10
DEVICES_WITH_CACHING_ALLOCATOR = ("cuda", "npu", "xpu")
GIB = 1024**3

#: Changes that lower a run's peak, tried in this order when it does not fit: (flags shown, overrides). The
#: recompute levels (``trainer.args.RECOMPUTE_LEVELS``, least to most frugal) come first: they cost the least
#: step time.
MEMORY_SAVING_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    *((f"--recompute {level}", {"kernels": "on", "recompute": level}) for level in RECOMPUTE_LEVELS[1:]),
    ("--gradient_checkpointing", {"gradient_checkpointing": True}),
    ("--cache_latents --cache_text_embeddings", {"cache_latents": True, "cache_text_embeddings": True}),
    ("--mixed_precision bf16", {"mixed_precision": "bf16"}),
)


# ----------------------------------------------------------------------------- the configs of the run's models
@dataclass(frozen=True)
class ModelConfigs:
    """What builds the run's models without their weights: diffusers config dicts, transformers configs."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[tuple[type, Any], ...]  # (class, config) of text_encoder/ and text_encoder_2/
    scheduler: dict[str, Any]


def _is_local(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def model_configs(args: argparse.Namespace) -> ModelConfigs:
    """The configs of the models ``args`` trains: read from a local folder (the embedded pipeline's too), or
    SDXL base's own (:mod:`trainer.sdxl_configs`) for its hub names; other hub names from the hub's cache."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # heavy: only when planning
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = str(ensure_assets().model_dir) if args.embedded_model else args.pretrained_model_name_or_path
    vae_name = args.pretrained_vae_model_name_or_path
    known = model == sdxl_configs.SDXL_BASE and not _is_local(model)
    try:
        if known:
            classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
            unet = dict(sdxl_configs.SDXL_UNET_CONFIG)
            text_encoders = tuple((classes[name], CLIPTextConfig(**config)) for name, config in sdxl_configs.SDXL_TEXT_ENCODER_CONFIGS)
            scheduler = dict(sdxl_configs.SDXL_SCHEDULER_CONFIG)
        else:
            unet = dict(UNet2DConditionModel.load_config(model, subfolder="unet", revision=args.revision))
            text_encoders = tuple(
                (cls, cls.config_class.from_pretrained(model, subfolder=sub, revision=args.revision))
                for sub in ("text_encoder", "text_encoder_2")
                for cls in [models.text_encoder_class(model, args.revision, sub)]
            )
            scheduler = dict(DDPMScheduler.load_config(model, subfolder="scheduler"))
        if vae_name is None:
            vae = dict(sdxl_configs.SDXL_VAE_CONFIG) if known else dict(AutoencoderKL.load_config(model, subfolder="vae", revision=args.revision))
        elif vae_name in (sdxl_configs.SDXL_VAE_FP16_FIX, sdxl_configs.SDXL_BASE) and not _is_local(vae_name):
            vae = dict(sdxl_configs.SDXL_VAE_CONFIG)
        else:
            vae = dict(AutoencoderKL.load_config(vae_name))
    except (OSError, ValueError) as error:
        raise InputError(
            f"memory plan: cannot read the model configs of {model} ({one_line(error)}); pass a local model folder"
            " or download the model first"
        ) from None
    return ModelConfigs(unet=unet, vae=vae, text_encoders=text_encoders, scheduler=scheduler)


# ----------------------------------------------------------------------------- one step
@dataclass
class PreparedStep:
    """The run's models, optimizer and trainable parameters as the trainer prepares them, and what a step needs."""

    components: models.SDXLComponents
    optimizer: Any
    params: list[torch.nn.Parameter]
    mixed_precision: str
    device: torch.device

    @property
    def frozen_modules(self) -> dict[str, list[torch.nn.Module]]:
        return {"UNet": [self.components.unet], "text encoders": self.components.text_encoders, "VAE": [self.components.vae]}


def _planning_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the optimizer flags the plan cannot build swapped for torch.optim.AdamW (see module doc)."""
    planned = copy.copy(args)
    planned.use_8bit_adam = False
    planned.use_npu_fused_adamw = False
    return planned


def prepare_step(
    args: argparse.Namespace, configs: ModelConfigs, device: torch.device, mixed_precision: str, fake_mode: Any = None
) -> PreparedStep:
    """Build the models from ``configs`` on ``device`` and prepare them as ``trainer.sdxl_lora.main`` does; the
    optimizer's states exist afterwards.

    With a ``FakeTensorMode`` the models are built and prepared on the meta device and then given fake storage
    on ``device`` (as torchtitan's memory estimation does: a fake parameter cannot be cast or moved again);
    without one, real random-init models are built on ``device`` (the accuracy measurement).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    weight_dtype = models.weight_dtype_for(mixed_precision)
    # As models.load_components: SDXL's own VAE stays float32, a separate (fp16-fix) VAE runs in weight_dtype.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path is not None else torch.float32
    noise_scheduler = DDPMScheduler.from_config(configs.scheduler)
    with torch.device("meta" if fake_mode is not None else device):
        unet = UNet2DConditionModel.from_config(configs.unet)
        vae = AutoencoderKL.from_config(configs.vae)
        text_encoders = [cls(config) for cls, config in configs.text_encoders]
        for module, dtype in ((unet, weight_dtype), (vae, vae_dtype), *((te, weight_dtype) for te in text_encoders)):
            module.requires_grad_(False)
            module.to(dtype=dtype) if fake_mode is not None else module.to(device=device, dtype=dtype)
        components = models.SDXLComponents(
            tokenizer_one=None, tokenizer_two=None, text_encoder_one=text_encoders[0], text_encoder_two=text_encoders[1],
            vae=vae, unet=unet, noise_scheduler=noise_scheduler, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
        )  # fmt: skip
        models.add_lora(components, args.rank, args.train_text_encoder, getattr(args, "use_dora", False))
        components.kernels_report = models.apply_kernels(
            unet, args.kernels == "on", args.geglu_approximate, args.recompute
        )
        if args.gradient_checkpointing:
            models.enable_gradient_checkpointing(components, args.train_text_encoder)
        trainable = [unet] + (components.text_encoders if args.train_text_encoder else [])
        for module in trainable:
            module.train()
        models.upcast_trainable_params(trainable, mixed_precision)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        if fake_mode is not None:
            for module in (unet, vae, *text_encoders):
                _to_fake_storage(module, device)
        params = models.trainable_parameters(trainable)
        optimizer = optim.build_optimizer(_planning_args(args), params, args.learning_rate)
        for param in params:  # one update creates the optimizer's states: the step traced is a steady-state one
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for module in trainable:
        _forward_as_accelerate_prepares(module, device.type, mixed_precision)
    return PreparedStep(components, optimizer, params, mixed_precision, device)


def _to_fake_storage(module: torch.nn.Module, device: torch.device) -> None:
    """``module.to_empty(device=device)`` under a ``FakeTensorMode``, several times faster: ``to_empty`` calls
    ``empty_like`` on each meta tensor, which the fake mode first converts to a fake tensor (a bypass of its
    cache); a fresh ``empty_strided`` of the same layout is a plain factory call."""
    module._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))  # noqa: SLF001 (to_empty's own route)


def _forward_as_accelerate_prepares(module: torch.nn.Module, device_type: str, mixed_precision: str) -> None:
    """What ``accelerator.prepare`` does to a trained model's forward under mixed precision: autocast, outputs
    converted to float32."""
    if mixed_precision not in ("fp16", "bf16"):
        return
    from accelerate.utils import convert_outputs_to_fp32

    forward, dtype = module.forward, models.weight_dtype_for(mixed_precision)

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = convert_outputs_to_fp32(autocast_forward)


def step_batch(args: argparse.Namespace, prepared: PreparedStep) -> dict[str, Any]:
    """A batch as the run's dataloader yields it (on the host): pixels and token ids, or with the caching
    flags the cached latent distribution and prompt embeddings (:mod:`trainer.caching`)."""
    components, size, resolution = prepared.components, args.train_batch_size, args.resolution
    batch: dict[str, Any] = {"original_sizes": [(resolution, resolution)] * size, "crop_top_lefts": [(0, 0)] * size}
    vae_config = components.vae.config
    if args.cache_latents:
        latent = resolution // 2 ** (len(vae_config.block_out_channels) - 1)
        shape = (size, 2 * vae_config.latent_channels, latent, latent)
        batch["latent_parameters"] = torch.randn(shape, dtype=components.vae_dtype)
    else:
        batch["pixel_values"] = torch.randn(size, 3, resolution, resolution)
    tokens = components.text_encoder_one.config.max_position_embeddings
    if args.cache_text_embeddings:
        width = sum(te.config.hidden_size for te in components.text_encoders)
        batch["prompt_embeds"] = torch.randn(size, tokens, width, dtype=components.weight_dtype)
        pooled = components.text_encoder_two.config.projection_dim
        batch["pooled_prompt_embeds"] = torch.randn(size, pooled, dtype=components.weight_dtype)
    else:
        batch["input_ids_one"] = batch["input_ids_two"] = torch.zeros(size, tokens, dtype=torch.int64)
    return batch


def run_step(args: argparse.Namespace, prepared: PreparedStep) -> None:
    """One optimizer step as ``trainer.loop.train_loop`` runs it (one micro-step, no accumulation)."""
    components, device = prepared.components, prepared.device
    context = loop.StepContext(
        unet=components.unet, vae=components.vae, text_encoders=components.text_encoders,
        noise_scheduler=components.noise_scheduler, weight_dtype=components.weight_dtype,
        separate_vae=args.pretrained_vae_model_name_or_path is not None, resolution=args.resolution,
        noise_offset=args.noise_offset, snr_gamma=args.snr_gamma, device=device,
    )  # fmt: skip
    loss = loop.training_loss(context, step_batch(args, prepared))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(prepared.params, args.max_grad_norm)
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)


def _mem_tracker(trainable: list[torch.nn.Parameter]) -> Any:
    """A ``MemTracker`` that records the step's peak only, without module hooks, and hooks the gradients of
    ``trainable`` only.

    MemTracker's per-module statistics come from global module hooks (its ``ModTracker``). A global hook
    changes the step itself: npu_kernels' fused layers (the LoRA fast path, the GEGLU projection recompute)
    cannot skip a hook, so with one installed they run their unfused path and the plan would be that
    step's, not the run's. The step's peak needs none of them: the storages come from the dispatch mode,
    the gradients from tensor hooks, the optimizer states from optimizer hooks. MemTracker would also keep
    every module's own peak, walking all modules at every op, and register a gradient hook on every
    parameter, which raises for a frozen one (all of a LoRA run's base weights).
    """
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
    from torch.distributed._tools.mod_tracker import ModTracker

    class BackwardFlagOnly(ModTracker):
        """``is_bw`` (what MemTracker labels activations and temporaries by), without the global hooks."""

        def __enter__(self) -> BackwardFlagOnly:
            return self

        def __exit__(self, *args: Any) -> None:
            pass

    class StepPeakMemTracker(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self._mod_tracker = BackwardFlagOnly()
            for param in trainable:
                def track(grad: torch.Tensor) -> None:
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                self._param_to_grad_hook_handles[param] = (  # removed by MemTracker on exit
                    param.register_hook(track), param.register_post_accumulate_grad_hook(lambda p: track(p.grad))
                )

        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

    return StepPeakMemTracker()


def tracked_step_peak(args: argparse.Namespace, prepared: PreparedStep) -> dict[str, int]:
    """MemTracker's snapshot of ``prepared.device`` at the step's peak: bytes per kind and ``Total``."""
    tracker = _mem_tracker(prepared.params)
    components = prepared.components
    tracker.track_external(components.unet, components.vae, *components.text_encoders, prepared.optimizer)
    with tracker:
        run_step(args, prepared)
    snapshots = tracker.get_tracker_snapshot("peak")
    on_device = [snap for device, snap in snapshots.items() if torch.device(device).type == prepared.device.type]
    peak = max(on_device, key=lambda snap: snap["Total"])
    return {getattr(kind, "value", kind): int(value) for kind, value in peak.items()}  # "Optstate", "Gradient", ...


@contextlib.contextmanager
def tracing_ops(args: argparse.Namespace) -> Iterator[None]:
    """npu_kernels' PyTorch backend while tracing (fake tensors cannot enter Triton or torch_npu kernels)."""
    if args.kernels != "on":
        yield
        return
    import npu_kernels  # imports its kernels (seconds): only for runs that use them

    with npu_kernels.use_backend("torch"):
        yield


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """The predicted peak of one step, item by item (bytes); ``total`` is what must fit on the device."""

    description: str
    items: list[tuple[str, int]] = field(default_factory=list)
    traced_on: str = "cpu"
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(value for _, value in self.items)

    @property
    def tracked_peak(self) -> int:
        """The peak of allocated memory (``torch.cuda.max_memory_allocated``'s meaning): all but the slack."""
        return sum(value for name, value in self.items if not name.startswith("allocator slack"))

    def format(self) -> str:
        lines = [f"Memory plan ({self.description}; one step traced on fake {self.traced_on} tensors in {self.seconds:.1f} s):"]
        lines += [f"  {name:<56} {format_bytes(value):>10}" for name, value in self.items]
        lines.append(f"  {'planned peak':<56} {format_bytes(self.total):>10}")
        return "\n".join(lines)


def format_bytes(value: int) -> str:
    """``12.34 GiB``, or ``56.7 MiB`` below a GiB."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def describe(args: argparse.Namespace, mixed_precision: str) -> str:
    """The flags that shape the plan, in a few words."""
    words = [f"{args.resolution} px", f"batch {args.train_batch_size}", "fp32" if mixed_precision == "no" else mixed_precision,
             f"kernels {args.kernels}", f"rank {args.rank}"]  # fmt: skip
    if getattr(args, "recompute", "none") != "none":
        words.append(f"recompute {args.recompute}")
    flags = ("gradient_checkpointing", "cache_latents", "cache_text_embeddings", "train_text_encoder")
    words += [name for name in flags if getattr(args, name, False)]
    return ", ".join(words)


def trace_device(device_type: str) -> torch.device:
    """Where the fake step runs: the run's CUDA device type on a CUDA machine (its autocast rules and
    attention kernels), else the CPU."""
    return torch.device("cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


def _frozen_bytes(modules: list[torch.nn.Module]) -> dict[str, int]:
    """Bytes of frozen parameters and buffers per dtype name."""
    per_dtype: dict[str, int] = {}
    other = 0  # integer buffers (token position ids): counted with the weights' main dtype
    for module in modules:
        for tensor in [p for p in module.parameters() if not p.requires_grad] + list(module.buffers()):
            size = tensor.numel() * tensor.element_size()
            if tensor.is_floating_point():
                per_dtype[_dtype_name(tensor.dtype)] = per_dtype.get(_dtype_name(tensor.dtype), 0) + size
            else:
                other += size
    if per_dtype:
        main = max(per_dtype, key=lambda name: per_dtype[name])
        per_dtype[main] += other
    return per_dtype


def plan_items(args: argparse.Namespace, prepared: PreparedStep, peak: dict[str, int], slack_fraction: float) -> list[tuple[str, int]]:
    """The peak split into the items users act on; they add up to the tracked peak plus the slack."""
    items = []
    unused = {"text encoders": args.cache_text_embeddings, "VAE": args.cache_latents}
    for name, modules in prepared.frozen_modules.items():
        note = ", resident but idle" if unused.get(name) else ""
        for dtype, value in _frozen_bytes(modules).items():
            items.append((f"{name}: frozen weights ({dtype}{note})", value))
    lora = sum(p.numel() * p.element_size() for p in prepared.params)
    lora_dtypes = "/".join(sorted({_dtype_name(p.dtype) for p in prepared.params}))
    states = peak.get("Optstate", 0)
    items += [
        (f"LoRA parameters ({lora_dtypes})", lora),
        ("LoRA gradients (live at the peak)", peak.get("Gradient", 0)),
        (f"{type(prepared.optimizer).__name__} states", states),
    ]
    activations = max(peak["Total"] - sum(value for _, value in items), 0)
    items.append(("activations and temporaries of one step", activations))
    if slack_fraction:
        items.append((f"allocator slack ({slack_fraction:.0%} of activations)", int(activations * slack_fraction)))
    return items


def make_plan(args: argparse.Namespace, device_type: str, configs: ModelConfigs | None = None) -> MemoryPlan:
    """Trace one step of ``args``'s run on fake tensors and return its plan (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    configs = configs or model_configs(args)
    mixed_precision, _ = preflight.effective_mixed_precision(args.mixed_precision)
    device = trace_device(device_type)
    # Non-fake inputs are allowed: the noise scheduler's tables and libraries' small constants are real.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with tracing_ops(args):
        prepared = prepare_step(args, configs, device, mixed_precision, fake_mode)
        with fake_mode:
            peak = tracked_step_peak(args, prepared)
    slack = ALLOCATOR_SLACK if device_type in DEVICES_WITH_CACHING_ALLOCATOR else 0.0
    items = plan_items(args, prepared, peak, slack)
    return MemoryPlan(describe(args, mixed_precision), items, device.type, time.perf_counter() - started)


# ----------------------------------------------------------------------------- preflight
def device_free_memory(device_type: str, local_rank: int = -1) -> int | None:
    """Free memory of this process's CUDA / NPU device in bytes; None where there is no such figure (CPU)."""
    index = max(local_rank, 0)
    if device_type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(index)[0])
    npu = getattr(torch, "npu", None)
    if device_type == "npu" and npu is not None and hasattr(npu, "mem_get_info"):
        return int(npu.mem_get_info(index)[0])
    return None


def _already_used(args: argparse.Namespace, overrides: dict[str, Any]) -> bool:
    """Whether ``args`` already has ``overrides`` (a recompute level: that level or a more frugal one)."""
    if "recompute" in overrides:
        level = getattr(args, "recompute", "none") if getattr(args, "kernels", "on") == "on" else "none"
        return RECOMPUTE_LEVELS.index(level) >= RECOMPUTE_LEVELS.index(overrides["recompute"])
    return all(getattr(args, key, None) == value for key, value in overrides.items())


def fitting_alternatives(args: argparse.Namespace, device_type: str, configs: ModelConfigs, free: int) -> list[tuple[str, int]]:
    """(flags, planned total) of each memory-saving change the run does not use yet, then all of them
    together (the most frugal recompute level among them); those that fit in ``free`` bytes, or the
    combination alone when none does."""
    tried: list[tuple[str, int]] = []
    combined: dict[str, Any] = {}
    combined_flags: dict[str, str] = {}  # one entry per kind of change: a later recompute level replaces an earlier
    for flags, overrides in MEMORY_SAVING_FLAGS:
        if _already_used(args, overrides):
            continue
        if "cache_text_embeddings" in overrides and args.train_text_encoder:
            continue  # caching text embeddings excludes training the encoders
        if overrides.get("mixed_precision") == "bf16" and not preflight.bf16_supported(device_type):
            continue
        variant = argparse.Namespace(**{**vars(args), **overrides})
        tried.append((flags, make_plan(variant, device_type, configs).total))
        combined.update(overrides)
        combined_flags[flags.split()[0]] = flags
    if len(combined_flags) > 1:
        variant = argparse.Namespace(**{**vars(args), **combined})
        tried.append((" ".join(combined_flags.values()), make_plan(variant, device_type, configs).total))
    fitting = [(flags, total) for flags, total in tried if total <= free]
    return fitting or tried[-1:]


def does_not_fit_message(plan: MemoryPlan, free: int, device_type: str, alternatives: list[tuple[str, int]]) -> str:
    """The one line a run that will not fit stops with."""
    head = f"memory plan: this run needs {format_bytes(plan.total)} at its peak and the {device_type} device has {format_bytes(free)} free"
    if alternatives and alternatives[0][1] <= free:
        options = ", ".join(f"{flags} ({format_bytes(total)})" for flags, total in alternatives)
        return f"{head}; it fits with {options}; --ignore_memory_plan runs anyway"
    if alternatives:
        flags, total = alternatives[0]
        return f"{head}; even {flags} plans {format_bytes(total)}: lower --train_batch_size or --resolution; --ignore_memory_plan runs anyway"
    return f"{head}: lower --train_batch_size or --resolution; --ignore_memory_plan runs anyway"


FIT_CHECKED_DEVICES = ("cuda", "npu")  # where every run plans and checks the fit before loading weights


def check(
    args: argparse.Namespace,
    device_type: str | None = None,
    free_memory: Callable[[str, int], int | None] = device_free_memory,
    print_fn: Callable[[str], None] = print,
) -> bool:
    """The preflight step: plan, print, and compare with the device's free memory.

    Returns True when the run asked only for the plan (``--memory_plan``: the caller stops, exit 0). Raises
    :class:`InputError` when the run will not fit (``free_memory(device_type, local_rank)`` bytes free; tests
    pass a figure) unless ``--ignore_memory_plan``. A run that cannot be planned (its model's configs are not
    readable) warns and trains; ``--memory_plan`` then fails with the reason instead.
    """
    device_type = device_type or preflight.training_device_type()
    if not args.memory_plan and device_type not in FIT_CHECKED_DEVICES:
        # Host memory is not what runs out here, and a plan costs seconds of CPU per run: asked for only.
        return False
    try:
        configs = model_configs(args)
        plan = make_plan(args, device_type, configs)
    except InputError as error:
        if args.memory_plan:
            raise
        logger.warning(f"{error}; training without a memory plan")
        return False
    print_fn(plan.format())
    if args.memory_plan:
        return True
    free = free_memory(device_type, args.local_rank)
    if args.ignore_memory_plan or free is None or plan.total <= free:
        return False
    raise InputError(does_not_fit_message(plan, free, device_type, fitting_alternatives(args, device_type, configs, free)))
