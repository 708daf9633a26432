"""diffusers integration: the fused attention processor and ``optimize()``/``restore()``.

``optimize`` patches modules in place by giving them an instance-level ``forward`` (the class's own
forward is untouched and ``restore`` simply removes ours). Nothing is added, removed or renamed, so
parameter names, ``state_dict`` keys and values stay identical and checkpoints and LoRA files keep
loading.
"""
from __future__ import annotations

import dataclasses
import functools
from types import MethodType
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from npu_kernels import frozen_layers, peft_lora
from npu_kernels.ops import _recompute, cross_attention, flash_attention, geglu, geglu_projection, group_norm_silu
from npu_kernels.ops._attention import CROSS_ATTENTION_MAX_KV
from npu_kernels.ops._build import needs_grad, tracing

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_FUSED_TAG = "_npu_kernels_fused"
_PREVIOUS_PROCESSOR = "_npu_kernels_previous_processor"
# Processors with exactly AttnProcessor2_0's maths; others (IP-adapter, custom ones) are left alone.
_REPLACEABLE_PROCESSORS = (AttnProcessor2_0, AttnProcessor)


def _cast_once_for_autocast(attn: Attention, states: torch.Tensor, rebuild: bool = False) -> torch.Tensor:
    """``states`` in the autocast dtype when to_k and to_v would each cast it there anyway.

    Under autocast, cross-attention's to_k and to_v (and PEFT's LoRA layers inside them) each cast
    the fp32 text states to bf16: two launches and, with LoRA, two saved copies per layer. One cast
    gives both the same values. Only for states without a gradient (a text-encoder gradient would
    otherwise be summed in bf16 rather than fp32) and Linear/LoRA-Linear projections.
    """
    device_type = states.device.type
    if states.dtype != torch.float32 or states.requires_grad or not torch.is_autocast_enabled(device_type):
        return states
    if not all(type(m) is nn.Linear or peft_lora.patchable(m) for m in (attn.to_k, attn.to_v)):
        return states
    dtype = torch.get_autocast_dtype(device_type)
    cast = states.to(dtype)
    if rebuild and not tracing():  # every layer's copy is rebuilt from the one float32 tensor: the backward keeps that
        _recompute.rebuildable(cast, _recompute.cast_to(dtype), states)
    return cast


def _replayable(module: nn.Module) -> bool:
    """Calling ``module`` again reproduces its output exactly: a plain (frozen or not) ``nn.Linear``
    or a LoRA layer on our fused path (no dropout, no variant), and no hooks."""
    if peft_lora.has_hooks(module):
        return False
    return type(module) is nn.Linear or peft_lora.runs_plain_fast_path(module)


def _rebuildable_projection(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, marked for the backward to recompute rather than keep where that is exact."""
    out = module(x)
    if torch.is_grad_enabled() and not tracing() and _replayable(module):
        _recompute.rebuildable(out, module, x)
    return out


class FusedAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` running ``npu_kernels`` attention.

    Self and cross attention; it calls ``attn.to_q/to_k/to_v/to_out`` (so PEFT LoRA layers apply)
    and handles ``attention_mask``, ``residual_connection``, ``rescale_output_factor``,
    ``norm_cross``, ``group_norm``, ``spatial_norm`` and ``norm_q``/``norm_k`` as ``AttnProcessor2_0``
    does. Key/value sequences of at most 256 tokens (SDXL's 77 text tokens) go to
    :func:`npu_kernels.cross_attention`, longer ones to :func:`npu_kernels.flash_attention`.

    ``recompute`` (one of :data:`RECOMPUTE_LEVELS`): from ``"norms_and_text"`` on, the backward
    recomputes cross-attention's key and value from the (at most 256) text tokens instead of keeping
    them; from ``"attention_projections"`` on it also recomputes the query, and self-attention's key
    and value, from the projections' input.

    Example::

        unet.set_attn_processor(npu_kernels.FusedAttnProcessor())
    """

    def __init__(self, recompute: str = "none") -> None:
        level = resolve_recompute(recompute)
        self.recompute_text = _level_at_least(level, "norms_and_text")
        self.recompute_projections = _level_at_least(level, "attention_projections")

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # Self-attention with optimized LoRA projections: q, k, v as one node that saves x once.
        shared = None
        if encoder_hidden_states is None:
            shared = peft_lora.shared_input_projections((attn.to_q, attn.to_k, attn.to_v), hidden_states)
        if shared is not None:
            query, key, value = shared
            if self.recompute_projections and needs_grad(hidden_states):
                _recompute.rebuildable(shared, functools.partial(_shared_projections, attn), hidden_states)
        else:
            if self.recompute_projections:
                query = _rebuildable_projection(attn.to_q, hidden_states)
            else:
                query = attn.to_q(hidden_states)
            short_kv = encoder_hidden_states is not None and encoder_hidden_states.shape[1] <= CROSS_ATTENTION_MAX_KV
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            encoder_hidden_states = _cast_once_for_autocast(attn, encoder_hidden_states, self.recompute_text)
            if (short_kv and self.recompute_text) or self.recompute_projections:  # a few text tokens: recomputing costs little
                key = _rebuildable_projection(attn.to_k, encoder_hidden_states)
                value = _rebuildable_projection(attn.to_v, encoder_hidden_states)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # AttnProcessor2_0 lets SDPA default the scale to 1/sqrt(head_dim), ignoring attn.scale.
        attention = cross_attention if key.shape[2] <= CROSS_ATTENTION_MAX_KV else flash_attention
        hidden_states = attention(query, key, value, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        # Dividing by 1.0 (SDXL's factor) changes no value: skipping it saves an op forward and backward.
        return hidden_states / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else hidden_states


def _shared_projections(attn: Attention, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Self-attention's query, key and value as the forward computed them (the backward's recompute)."""
    return peft_lora.shared_input_projections((attn.to_q, attn.to_k, attn.to_v), hidden_states)


# ----------------------------------------------------------------------------- fused forwards
_HALF = (torch.float16, torch.bfloat16)


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``nn.LayerNorm.forward``, its output marked as rebuildable from its input: the LayerNorm keeps
    its input for its own backward anyway, so the projections that read the output (attention's
    LoRA layers, the feed-forward) need not keep a second copy.

    Where autocast runs LayerNorm in float32 (CUDA's policy; the CPU's keeps bf16), the float32 copy
    of ``x`` is made here, as autocast would make it (same values, same graph): then the copy the
    LayerNorm saves is the source the projections' backward rebuilds from, not a second tensor."""
    if not needs_grad(x) or tracing():
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    device_type = x.device.type
    if x.dtype in _HALF and torch.is_autocast_enabled(device_type):
        if _autocast_upcasts_layer_norm(device_type, torch.get_autocast_dtype(device_type)):
            x = x.float()
    out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    _recompute.rebuildable(out, MethodType(nn.LayerNorm.forward, self), x)
    return out


@functools.lru_cache(maxsize=None)
def _autocast_upcasts_layer_norm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast on ``device_type`` runs LayerNorm in float32 (asked once: no public query)."""
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            probe = torch.ones(1, 2, dtype=dtype, device=device_type)
            return F.layer_norm(probe, (2,)).dtype == torch.float32
    except RuntimeError:  # a device type autocast does not know: it casts nothing there
        return False


def _attention_forward(
    self: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **cross_attention_kwargs: Any,
) -> torch.Tensor:
    """``Attention.forward`` minus its per-call ``inspect.signature`` of the processor (140 calls per SDXL
    step; its cost: benchmarks/results/cpu-2026-11-30/README.md): with our processor and no extra keyword arguments that
    inspection filters nothing, so the processor is called directly. Anything else: diffusers' forward.
    """
    if cross_attention_kwargs or not isinstance(self.processor, FusedAttnProcessor):
        return Attention.forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)


def _fused_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _plain_time_embedding(block: ResnetBlock2D) -> bool:
    """The block's time embedding is added before ``norm2`` ("default") or absent: the VAE's blocks say
    "group" but have no ``time_emb_proj``, which makes diffusers' forward the same computation."""
    return block.time_embedding_norm == "default" or (block.time_emb_proj is None and block.time_embedding_norm != "scale_shift")


def _resnet_forward(self: ResnetBlock2D, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """``ResnetBlock2D.forward`` ("default" time-embedding norm or none, SiLU) with both norm+SiLU fused.

    The time embedding still goes through ``self.nonlinearity``, exactly as in diffusers.
    """
    hidden_states = _fused_norm_silu(self.norm1, input_tensor)

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers' workaround for upsample_nearest_nhwc
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and self.time_embedding_norm == "default":  # other norms ignore a temb they have no projection for
        hidden_states = hidden_states + temb
    hidden_states = _fused_norm_silu(self.norm2, hidden_states)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:  # diffusers: avoids DDP's gradient-stride warning
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    output = input_tensor + hidden_states
    return output / self.output_scale_factor if self.output_scale_factor != 1.0 else output  # / 1.0 is exact


def _norm_silu_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _fused_norm_silu(self, x)


class _SiluFusedIntoNorm(nn.Module):
    """Stands where ``conv_act`` was while ``conv_norm_out`` runs GroupNorm+SiLU fused: passes its input on.

    A module of its own in the parent's slot, not a patched forward of the SiLU: older diffusers
    (``get_activation`` before 0.31) hand ONE shared ``nn.SiLU`` instance to ``conv_act``, the time
    embedding and every resnet, so patching that instance removed SiLU everywhere.
    """

    def __init__(self, replaced: nn.Module) -> None:
        super().__init__()
        self.__dict__["replaced"] = replaced  # not a submodule: named_modules() and state_dict() stay as stock's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the SiLU already ran inside the fused GroupNorm before it


def _geglu_forward_with(approximate: str, recompute: str) -> Callable:
    """``GEGLU.forward`` with :func:`npu_kernels.geglu`, ``approximate`` and recompute level ``recompute``.

    A plain function closing over the options, not a ``functools.partial``: bound as the module's
    forward it is a method dynamo inlines on every torch we accept (newer dynamo reads the bound
    function's ``__name__``, which a partial lacks; ``tests/test_versions.py`` checks).
    """

    recompute_projection = _level_at_least(recompute, "half_geglu_projection")
    keep_gate = not _level_at_least(recompute, "geglu_projection")

    def geglu_forward(self: GEGLU, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj = self.proj
        if recompute_projection and type(proj) is nn.Linear and not peft_lora.has_hooks(proj) and not _recompute.standing_down():
            return geglu_projection(hidden_states, proj.weight, proj.bias, approximate, keep_gate=keep_gate)
        return geglu(proj(hidden_states), approximate)

    return geglu_forward


# ----------------------------------------------------------------------------- optimize/restore
@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` swapped (module counts) and what it left alone.

    For a pipeline, ``components`` holds each model component's own report and the fields above are
    their totals, with module names prefixed by the component's (``"vae.decoder.mid_block..."``).
    """

    attention_processors: int = 0
    resnet_blocks: int = 0
    norm_out_pairs: int = 0
    geglu: int = 0
    frozen_layers: int = 0
    lora_layers: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    # Patched LoRA layers whose state at optimize() time makes them run PEFT's forward (checked
    # again at every call: the fused path takes over once the state allows it).
    lora_fallbacks: list[str] = dataclasses.field(default_factory=list)
    components: dict[str, OptimizeReport] = dataclasses.field(default_factory=dict)

    @classmethod
    def merged(cls, components: dict[str, OptimizeReport]) -> OptimizeReport:
        """One report for several models (a pipeline's): counts summed, entries prefixed by component."""
        total = cls(components=dict(components))
        for component, report in components.items():
            for field in _COUNT_FIELDS:
                setattr(total, field, getattr(total, field) + getattr(report, field))
            total.skipped += [_prefixed(component, entry) for entry in report.skipped]
            total.lora_fallbacks += [_prefixed(component, entry) for entry in report.lora_fallbacks]
        return total

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"npu_kernels.optimize: {_counts_text(self)}"]
        for name, report in self.components.items():
            swapped = any(getattr(report, field) for field in _COUNT_FIELDS)
            # A component left whole (a transformers text encoder) has one entry, for its root module "".
            reasons = [entry.removeprefix(": ") for entry in report.skipped if entry.startswith(": ")]
            lines.append(f"  {name}: {_counts_text(report) if swapped or not reasons else '; '.join(reasons)}")
        return "\n".join(lines)


def _counts_text(report: OptimizeReport) -> str:
    return (
        f"{report.attention_processors} attention processors, "
        f"{report.resnet_blocks} ResnetBlock2D (GroupNorm+SiLU x2), {report.norm_out_pairs} conv_norm_out+conv_act, "
        f"{report.geglu} GEGLU, {report.frozen_layers} Linear/Conv2d that save no input when frozen, "
        f"{report.lora_layers} PEFT LoRA Linear as one lora_linear op ({len(report.lora_fallbacks)} running PEFT's "
        f"forward for now); {len(report.skipped)} modules left as they were"
    )


_COUNT_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizeReport) if f.type == "int")


def _prefixed(component: str, entry: str) -> str:
    """``"name: reason"`` of a module inside ``component`` as the pipeline-level entry."""
    name, reason = entry.split(": ", 1)
    return f"{component}.{name}: {reason}" if name else f"{component}: {reason}"


def _pipeline_models(pipeline: Any) -> dict[str, nn.Module]:
    """The ``torch.nn.Module`` components of a diffusers pipeline, by name; a clear error for anything else."""
    from diffusers import DiffusionPipeline  # the pipelines package is heavy: only when one is passed

    if not isinstance(pipeline, DiffusionPipeline):
        raise TypeError(
            f"npu_kernels: expected a torch.nn.Module or a diffusers DiffusionPipeline, got {type(pipeline).__name__}"
        )
    return {name: module for name, module in pipeline.components.items() if isinstance(module, nn.Module)}


def _optimize_pipeline(pipeline: Any, **options: Any) -> OptimizeReport:
    """:func:`optimize` on each diffusers model of ``pipeline`` (UNet, VAE, ...), one report for all.

    Other modules (transformers' text encoders) hold none of the diffusers modules ``optimize`` fuses:
    they are left as they are and reported so.
    """
    from diffusers import ModelMixin

    reports = {}
    for name, module in _pipeline_models(pipeline).items():
        if isinstance(module, ModelMixin):
            reports[name] = optimize(module, **options)
        else:
            reports[name] = OptimizeReport(skipped=[f": {type(module).__name__} is not a diffusers model, nothing to swap"])
    return OptimizeReport.merged(reports)


def _patch(module: nn.Module, forward: Callable) -> None:  # any callable taking (module, *args)
    module.forward = MethodType(forward, module)
    setattr(module, _FUSED_TAG, True)


def _is_plain_silu(module: nn.Module | None) -> bool:
    return type(module) is nn.SiLU


def _is_group_norm(module: nn.Module | None) -> bool:
    return type(module) is nn.GroupNorm


#: The recompute levels of :func:`optimize`, from recomputing no GEMM ("none", the default: LayerNorm
#: outputs and the fused ops' elementwise maths only) to the most memory-frugal; each level recomputes
#: what the levels before it do and more.
RECOMPUTE_LEVELS: tuple[str, ...] = (
    "none", "norms_and_text", "half_geglu_projection", "geglu_projection", "attention_projections"
)


def _level_at_least(recompute: str, level: str) -> bool:
    return RECOMPUTE_LEVELS.index(recompute) >= RECOMPUTE_LEVELS.index(level)


def resolve_recompute(recompute: str = "none", recompute_geglu_projection: bool | None = None) -> str:
    """The recompute level asked for: ``recompute``, or the old ``recompute_geglu_projection`` switch
    (an alias of ``recompute="geglu_projection"``). Raises ``ValueError`` for an unknown level."""
    if recompute not in RECOMPUTE_LEVELS:
        raise ValueError(f"optimize: recompute must be one of {', '.join(RECOMPUTE_LEVELS)}; got {recompute!r}")
    if recompute_geglu_projection and recompute == "none":
        return "geglu_projection"
    return recompute


def optimize(
    model: nn.Module | DiffusionPipeline,
    frozen_weights: bool = True,
    geglu_approximate: str = "none",
    recompute: str = "none",
    recompute_geglu_projection: bool | None = None,
) -> OptimizeReport:
    """Install npu_kernels' fused ops on a diffusers model, in place.

    * every ``Attention`` using ``AttnProcessor2_0``/``AttnProcessor`` gets :class:`FusedAttnProcessor`;
    * ``ResnetBlock2D`` (default time-embedding norm or none, as in the VAE; SiLU): ``norm1``/``norm2`` + ``nonlinearity``
      run as :func:`npu_kernels.group_norm_silu`; the time-embedding SiLU stays as it is;
    * ``conv_norm_out`` (GroupNorm) followed by ``conv_act`` (SiLU) become one fused op;
    * diffusers ``GEGLU`` feed-forwards run :func:`npu_kernels.geglu` after their projection, with
      ``geglu_approximate`` (``"none"``: erf GELU, diffusers' maths; ``"tanh"`` reproduces what stock
      diffusers runs on Ascend NPUs, where it calls ``npu_geglu`` with the tanh approximation);
    * ``recompute`` picks one of :data:`RECOMPUTE_LEVELS`, what the backward recomputes instead of
      keeping; each level does what the one before does and more, with the same values and gradients
      bit for bit. ``"none"`` (the default) recomputes no GEMM: only what costs elementwise work, which
      at every level includes each ``nn.LayerNorm``'s output, rebuilt from the input the LayerNorm
      keeps for its own backward (its modules get a forward that marks their output), so the LoRA
      projections after it keep no second copy. ``"norms_and_text"``: + the autocast copies of the
      text states and cross-attention's key and value from the (at most 256) text tokens (small GEMMs:
      about 2.5% of the step of SDXL's UNet at 512 px on a CPU, benchmarks/memory_curve.py).
      ``"half_geglu_projection"``: + the hidden half of the projection of every ``GEGLU`` whose
      ``proj`` is a frozen ``nn.Linear`` (:func:`npu_kernels.geglu_projection` with ``keep_gate``:
      the gate half, 4x the model width, is kept; half a projection GEMM more per feed-forward
      backward). ``"geglu_projection"``: the whole projection (its 8x wider output is not kept, one
      more GEMM per feed-forward backward); ``recompute_geglu_projection=True`` is the older name of
      that level. ``"attention_projections"``: + attention's query, key and value from their projections'
      input. Inside gradient-checkpointed blocks the levels stand down (checkpointing reruns the
      forward there anyway). The bytes each keeps: docs/training.md, "Recompute levels";
    * PEFT ``lora.Linear`` layers (over ``nn.Linear``) run :func:`npu_kernels.lora_linear` while
      they have one active plain-LoRA adapter, identity dropout, unmerged and enabled (checked at
      every call; otherwise PEFT's forward runs, and ``report.lora_fallbacks`` says why);
    * with ``frozen_weights`` (default), plain ``nn.Conv2d`` layers whose parameters do not require
      grad at call time (the frozen convolutions of LoRA training) keep no input for the backward,
      only their weight: same values and gradients, less activation memory (a frozen ``nn.Linear``
      keeps none in stock PyTorch already, and is left alone).

    Works on ``UNet2DConditionModel`` and on any other model: it swaps what matches and leaves the
    rest. A diffusers ``DiffusionPipeline`` gets this on each of its diffusers models (UNet, VAE, ...)
    and one report, with each component's own in ``report.components``; its text encoders
    (transformers models) are left as they are. Calling it twice changes nothing more. Undo with
    :func:`restore`.
    """
    recompute = resolve_recompute(recompute, recompute_geglu_projection)
    if not isinstance(model, nn.Module):
        return _optimize_pipeline(
            model, frozen_weights=frozen_weights, geglu_approximate=geglu_approximate, recompute=recompute
        )
    if geglu_approximate not in ("none", "tanh"):
        raise ValueError(f"optimize: geglu_approximate must be 'none' or 'tanh', got {geglu_approximate!r}")
    report = OptimizeReport()
    geglu_forward = _geglu_forward_with(geglu_approximate, recompute)
    for name, module in model.named_modules():
        if getattr(module, _FUSED_TAG, False):
            continue
        if isinstance(module, Attention):
            processor = module.get_processor()
            if isinstance(processor, FusedAttnProcessor):
                continue
            if type(processor) in _REPLACEABLE_PROCESSORS:
                setattr(module, _PREVIOUS_PROCESSOR, processor)
                module.set_processor(FusedAttnProcessor(recompute))
                if type(module).forward is Attention.forward:  # not a subclass with its own forward
                    module.forward = MethodType(_attention_forward, module)
                report.attention_processors += 1
            else:
                report.skipped.append(f"{name}: attention processor {type(processor).__name__}")
        elif isinstance(module, ResnetBlock2D):
            if (
                _plain_time_embedding(module)
                and _is_plain_silu(module.nonlinearity)
                and _is_group_norm(module.norm1)
                and _is_group_norm(module.norm2)
            ):
                _patch(module, _resnet_forward)
                report.resnet_blocks += 1
            else:
                report.skipped.append(f"{name}: ResnetBlock2D ({module.time_embedding_norm}, {type(module.nonlinearity).__name__})")
        elif type(module) is nn.LayerNorm:  # at every level: rebuilding its output costs no GEMM
            _patch(module, _layer_norm_forward)
        elif isinstance(module, GEGLU):
            _patch(module, geglu_forward)
            report.geglu += 1
        elif peft_lora.patchable(module):
            _patch(module, peft_lora.lora_forward)
            report.lora_layers += 1
            if (reason := peft_lora.fallback_reason(module)) is not None:
                report.lora_fallbacks.append(f"{name}: {reason}")
        elif peft_lora.unpatched_lora_layer(module):
            report.skipped.append(f"{name}: PEFT {type(module).__name__} over {type(module.get_base_layer()).__name__}")
        elif frozen_weights and frozen_layers.patchable(module):
            _patch(module, frozen_layers.conv2d_forward)
            report.frozen_layers += 1
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if _is_group_norm(norm) and _is_plain_silu(act) and not getattr(norm, _FUSED_TAG, False):
            _patch(norm, _norm_silu_forward)
            module.conv_act = _SiluFusedIntoNorm(act)
            report.norm_out_pairs += 1
    return report


def restore(model: nn.Module | DiffusionPipeline) -> nn.Module | DiffusionPipeline:
    """Undo :func:`optimize`: stock diffusers modules and processors again, same parameters.

    A ``DiffusionPipeline`` is restored component by component and returned.
    """
    if not isinstance(model, nn.Module):
        for module in _pipeline_models(model).values():
            restore(module)
        return model
    for module in model.modules():
        if getattr(module, _FUSED_TAG, False):
            del module.forward
            delattr(module, _FUSED_TAG)
        if isinstance(act := getattr(module, "conv_act", None), _SiluFusedIntoNorm):
            module.conv_act = act.replaced
        if not isinstance(module, Attention):
            continue
        if getattr(module.__dict__.get("forward"), "__func__", None) is _attention_forward:
            del module.forward
        if isinstance(module.get_processor(), FusedAttnProcessor):
            previous = module.__dict__.pop(_PREVIOUS_PROCESSOR, None)
            module.set_processor(previous if previous is not None else AttnProcessor2_0())
    return model
