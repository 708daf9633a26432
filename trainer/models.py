"""SDXL components for LoRA training: loading, dtypes, LoRA adapters, kernels, LoRA (de)serialisation.

Semantics follow diffusers' ``train_text_to_image_lora_sdxl.py``:

* frozen weights (UNet, text encoders) are stored in the mixed-precision dtype; the VAE stays in float32
  unless a separate VAE (``--pretrained_vae_model_name_or_path``/``--vae_name``, e.g. the fp16-fix VAE)
  is given, which is stored in the mixed-precision dtype too;
* PEFT LoRA on ``to_q``/``to_k``/``to_v``/``to_out.0`` with ``lora_alpha = rank`` and gaussian init (text
  encoders: ``q_proj``/``k_proj``/``v_proj``/``out_proj``); DoRA with ``--use_dora`` as in diffusers'
  ``train_dreambooth_lora_sdxl.py`` (the magnitude vectors saved and loaded with the LoRA weights);
* LoRA files via ``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers`` +
  ``StableDiffusionXLPipeline.save_lora_weights``, loadable with ``load_lora_weights``.

The only departure: trainable LoRA parameters are kept in float32 for bf16 as well as fp16 (diffusers
upcasts only for fp16); AdamW steps on bf16 weights silently drop updates smaller than ~1/256 of a weight.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class SDXLComponents:
    """Everything the training loop needs from the pretrained pipeline."""

    tokenizer_one: Any
    tokenizer_two: Any
    text_encoder_one: torch.nn.Module
    text_encoder_two: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    kernels_report: dict[str, Any] = field(default_factory=dict)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder_one, self.text_encoder_two]


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """Storage dtype of frozen weights: the mixed-precision dtype, float32 without mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def text_encoder_class(pretrained: str, revision: str | None, subfolder: str) -> type:
    """``CLIPTextModel`` or ``CLIPTextModelWithProjection``, from the subfolder's config (as diffusers)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PretrainedConfig

    # The raw config dict: instantiating a bare PretrainedConfig from a CLIP config warns on transformers 5.
    config, _ = PretrainedConfig.get_config_dict(pretrained, subfolder=subfolder, revision=revision)
    architecture = (config.get("architectures") or [None])[0]
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    if architecture not in classes:
        raise ValueError(f"{architecture} is not supported.")
    return classes[architecture]


def load_components(args: argparse.Namespace, device: torch.device, mixed_precision: str) -> SDXLComponents:
    """Tokenizers, text encoders, VAE, UNet and DDPM noise scheduler from ``args.pretrained_model_name_or_path``,
    frozen, moved to ``device`` and cast as described in the module docstring."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    model = args.pretrained_model_name_or_path
    tokenizer_one = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", revision=args.revision, use_fast=False)
    tokenizer_two = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2", revision=args.revision, use_fast=False)
    text_encoder_one = text_encoder_class(model, args.revision, "text_encoder").from_pretrained(
        model, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    text_encoder_two = text_encoder_class(model, args.revision, "text_encoder_2").from_pretrained(
        model, subfolder="text_encoder_2", revision=args.revision, variant=args.variant
    )
    # Training always adds DDPM noise, whatever sampler the pipeline ships (SDXL ships Euler).
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    separate_vae = args.pretrained_vae_model_name_or_path is not None
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_vae_model_name_or_path if separate_vae else model,
        subfolder=None if separate_vae else "vae",
        revision=args.revision,
        variant=args.variant,
    )
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=args.revision, variant=args.variant)

    for module in (vae, text_encoder_one, text_encoder_two, unet):
        module.requires_grad_(False)

    weight_dtype = weight_dtype_for(mixed_precision)
    # SDXL's own VAE overflows in fp16, hence float32; a separate (fp16-fix) VAE may run in weight_dtype.
    vae_dtype = weight_dtype if separate_vae else torch.float32
    for module, dtype in ((unet, weight_dtype), (vae, vae_dtype), (text_encoder_one, weight_dtype), (text_encoder_two, weight_dtype)):
        _move(module, device, dtype)
    return SDXLComponents(
        tokenizer_one=tokenizer_one,
        tokenizer_two=tokenizer_two,
        text_encoder_one=text_encoder_one,
        text_encoder_two=text_encoder_two,
        vae=vae,
        unet=unet,
        noise_scheduler=noise_scheduler,
        weight_dtype=weight_dtype,
        vae_dtype=vae_dtype,
    )


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, casting only when the dtype changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def encode_prompt(
    text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds, pooled prompt embeds) as ``StableDiffusionXLPipeline.encode_prompt`` builds them.

    Prompt embeds: each encoder's penultimate hidden state, concatenated on the channel axis. Pooled:
    the first output of the last encoder (``CLIPTextModelWithProjection``'s projected ``text_embeds``).
    """
    embeds = []
    pooled = None
    for text_encoder, ids in zip(text_encoders, input_ids):
        outputs = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
        pooled = outputs[0]
        hidden = outputs[-1][-2]
        embeds.append(hidden.view(hidden.shape[0], hidden.shape[1], -1))
    prompt_embeds = torch.concat(embeds, dim=-1)
    assert pooled is not None
    return prompt_embeds, pooled.view(prompt_embeds.shape[0], -1)


def pipeline_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for diffusers versions that renamed ``torch_dtype`` (and warn on it), else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def enable_attention_backends(unet: torch.nn.Module, args: argparse.Namespace) -> None:
    """``--enable_npu_flash_attention`` / ``--enable_xformers_memory_efficient_attention``, as diffusers."""
    # Availability was checked by trainer.preflight (one-line errors); diffusers checks again itself.
    if args.enable_npu_flash_attention:
        logger.info("npu flash attention enabled.")
        unet.enable_npu_flash_attention()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()


def add_lora(components: SDXLComponents, rank: int, train_text_encoder: bool, use_dora: bool = False) -> None:
    """Attach PEFT LoRA adapters (the only trainable parameters) to the UNet and optionally the text encoders;
    ``use_dora`` (``--use_dora``): DoRA adapters, as diffusers' DreamBooth SDXL script configures them."""
    from peft import LoraConfig

    components.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, use_dora=use_dora, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS)
    )
    if train_text_encoder:
        text_config = LoraConfig(
            r=rank, lora_alpha=rank, use_dora=use_dora, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS
        )
        add_text_encoder_adapter(components.text_encoder_one, text_config)
        add_text_encoder_adapter(components.text_encoder_two, text_config)


def _is_peft_version_error(error: Exception) -> bool:
    return isinstance(error, ValueError) and "version of PEFT" in str(error)


def add_text_encoder_adapter(text_encoder: torch.nn.Module, config: Any) -> None:
    """``text_encoder.add_adapter(config)`` (transformers' PEFT integration, as diffusers calls it).

    Some transformers releases demand a newer PEFT than is installed just for this bookkeeping wrapper;
    then the same LoRA layers are injected with PEFT directly (identical modules and state-dict keys).
    """
    try:
        text_encoder.add_adapter(config)
    except ValueError as error:
        if not _is_peft_version_error(error):
            raise
        from peft import inject_adapter_in_model

        logger.warning(f"transformers' add_adapter refused ({error}); injecting the LoRA layers with PEFT directly.")
        inject_adapter_in_model(config, text_encoder, adapter_name="default")


def load_lora_into_pipeline(pipeline: Any, directory: str) -> None:
    """``pipeline.load_lora_weights(directory)``, with the same PEFT-version fallback for text encoders."""
    try:
        pipeline.load_lora_weights(directory)
        return
    except ValueError as error:
        if not _is_peft_version_error(error):
            raise
        logger.warning(f"load_lora_weights refused the text-encoder LoRA ({error}); loading it with PEFT directly.")
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from peft import LoraConfig, inject_adapter_in_model

    state, _ = pipeline.lora_state_dict(directory)
    if not getattr(pipeline.unet, "peft_config", None):  # the UNet part loads before the text encoders
        pipeline.load_lora_weights({k: v for k, v in state.items() if k.startswith("unet.")})
    for prefix, text_encoder in (("text_encoder.", pipeline.text_encoder), ("text_encoder_2.", pipeline.text_encoder_2)):
        downs = [v for k, v in state.items() if k.startswith(prefix) and any(t in k for t in ("lora_A", ".down."))]
        if not downs:
            continue
        rank = downs[0].shape[0]
        use_dora = any(k.startswith(prefix) and "lora_magnitude_vector" in k for k in state)
        config = LoraConfig(r=rank, lora_alpha=rank, use_dora=use_dora, target_modules=TEXT_ENCODER_LORA_TARGETS)
        inject_adapter_in_model(config, text_encoder, adapter_name="default")
        _set_state_dict_into_text_encoder(state, prefix=prefix, text_encoder=text_encoder)


def apply_kernels(
    unet: torch.nn.Module, enabled: bool, geglu_approximate: str = "none", recompute: str = "none"
) -> dict[str, Any]:
    """Route the UNet through npu_kernels (``--kernels on``) and return what was swapped and left alone.

    Called after :func:`add_lora`: the fused attention processor calls ``attn.to_q`` etc., which PEFT has
    wrapped, so the LoRA path is part of every fused attention call. ``geglu_approximate`` (``--geglu_approximate``):
    ``"none"`` is diffusers' erf GELU; ``"tanh"`` what stock diffusers runs on NPU (``npu_geglu(approximate=1)``).
    ``recompute`` (``--recompute``): one of ``npu_kernels.RECOMPUTE_LEVELS``, what the fused ops recompute in
    the backward instead of keeping it.
    """
    if not enabled:
        return {"enabled": False}
    import npu_kernels  # imports its kernels (seconds): not before a run needs them

    report = npu_kernels.optimize(
        unet, geglu_approximate=geglu_approximate, recompute=recompute
    )
    logger.info(str(report))
    return {
        "enabled": True, "geglu_approximate": geglu_approximate,
        "recompute": recompute, **report.as_dict(),
    }


def stock_backends() -> dict[str, str]:
    """What serves each op with ``--kernels off``: diffusers' own modules."""
    return {op: "diffusers (stock modules)" for op in ("attention", "group_norm_silu", "geglu")}


class Unwrapper:
    """The model under accelerate's wrappers (DDP, torch.compile), as diffusers' ``unwrap_model``."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def __call__(self, model: Any) -> Any:
        model = self.accelerator.unwrap_model(model)
        return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule keeps the original here


def enable_gradient_checkpointing(components: SDXLComponents, train_text_encoder: bool) -> None:
    components.unet.enable_gradient_checkpointing()
    if train_text_encoder:
        for text_encoder in components.text_encoders:
            text_encoder.gradient_checkpointing_enable()
            # With frozen embeddings nothing entering a checkpointed layer requires grad; reentrant
            # checkpointing would then drop the LoRA gradients. (transformers does this itself only when
            # its own PEFT integration attached the adapter.)
            text_encoder.enable_input_require_grads()


def upcast_trainable_params(models: list[torch.nn.Module], mixed_precision: str | None) -> None:
    """Keep LoRA parameters in float32 under fp16/bf16 (their frozen base weights stay low precision)."""
    from diffusers.training_utils import cast_training_params

    if mixed_precision in ("fp16", "bf16"):
        cast_training_params(models, dtype=torch.float32)


def trainable_parameters(models: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for model in models for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's LoRA weights with diffusers key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora_weights(
    directory: str,
    unet: torch.nn.Module,
    text_encoder_one: torch.nn.Module | None = None,
    text_encoder_two: torch.nn.Module | None = None,
) -> None:
    """Write ``pytorch_lora_weights.safetensors`` as diffusers' script does."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=directory,
        unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder_one) if text_encoder_one is not None else None,
        text_encoder_2_lora_layers=lora_state_dict(text_encoder_two) if text_encoder_two is not None else None,
    )


def register_checkpoint_hooks(
    accelerator: Any, components: SDXLComponents, args: argparse.Namespace, unwrap: Callable[[Any], Any]
) -> None:
    """``accelerator.save_state``/``load_state`` store just the LoRA layers, in the diffusers LoRA format."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    unet_type = type(unwrap(components.unet))
    te_one_type = type(unwrap(components.text_encoder_one))
    te_two_type = type(unwrap(components.text_encoder_two))

    def save_model_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if not accelerator.is_main_process:
            return
        layers: dict[str, Any] = {"unet": None, "te_one": None, "te_two": None}
        for model in models:
            unwrapped = unwrap(model)
            if isinstance(unwrapped, unet_type):
                layers["unet"] = lora_state_dict(unwrapped)
            elif isinstance(unwrapped, te_one_type):
                layers["te_one"] = lora_state_dict(unwrapped)
            elif isinstance(unwrapped, te_two_type):
                layers["te_two"] = lora_state_dict(unwrapped)
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")
            if weights:  # accelerate would otherwise also pickle the full model
                weights.pop()
        StableDiffusionXLPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers["te_one"],
            text_encoder_2_lora_layers=layers["te_two"],
        )

    def load_model_hook(models: list[Any], input_dir: str) -> None:
        unet_, te_one_, te_two_ = None, None, None
        while models:
            model = models.pop()
            if isinstance(model, unet_type):
                unet_ = model
            elif isinstance(model, te_one_type):
                te_one_ = model
            elif isinstance(model, te_two_type):
                te_two_ = model
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")

        state, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(input_dir)
        unet_state = {k.replace("unet.", ""): v for k, v in state.items() if k.startswith("unet.")}
        incompatible = set_peft_model_state_dict(unet_, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
        unexpected = getattr(incompatible, "unexpected_keys", None) if incompatible is not None else None
        if unexpected:
            logger.warning(f"Loading adapter weights from state_dict led to unexpected keys not found in the model: {unexpected}.")
        if args.train_text_encoder:
            _set_state_dict_into_text_encoder(state, prefix="text_encoder.", text_encoder=te_one_)
            _set_state_dict_into_text_encoder(state, prefix="text_encoder_2.", text_encoder=te_two_)
        loaded = [m for m in (unet_, te_one_, te_two_) if m is not None]
        upcast_trainable_params(loaded, accelerator.mixed_precision)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
