"""PEFT's ``lora.Linear`` layers run as one :func:`npu_kernels.lora_linear` node, DoRA layers
(``use_dora=True``) as one :func:`npu_kernels.dora_linear` node.

The patched forward checks, at every call, that the layer is in the one state where our op computes
exactly what PEFT's forward does: one active adapter, plain LoRA or DoRA (no other variant, no LoRA
bias), dropout that is the identity now (p = 0 or eval mode), not merged, adapters enabled, no extra
call arguments. Anything else runs PEFT's own forward, so ``merge``/``disable_adapters``/``set_adapter``
after :func:`npu_kernels.optimize` stay right. Parameters are read from the layer at each call: nothing
is copied or renamed (DoRA caches only the frozen weight's squared row norms, keyed to its value).
"""
from __future__ import annotations

import torch
from torch import nn

from npu_kernels.ops._build import tracing
from npu_kernels.ops.dora_linear import dora_linear
from npu_kernels.ops.lora_linear import lora_linear, lora_linear_shared_input

try:  # PEFT is optional: without it there are no LoRA layers to patch
    from peft.tuners.lora import Linear as _PeftLinear
    from peft.tuners.lora import LoraLayer as _PeftLoraLayer
    from peft.tuners.lora.dora import DoraLinearLayer as _PeftDoraLinearLayer  # PEFT >= 0.9
except ImportError:  # pragma: no cover - exercised only where peft is absent
    _PeftLinear = _PeftLoraLayer = _PeftDoraLinearLayer = None
try:  # PEFT >= 0.16 holds DoRA as a LoRA variant object
    from peft.tuners.lora.variants import DoraLinearVariant as _PeftDoraVariant
except ImportError:  # older PEFT: a use_dora flag per adapter
    _PeftDoraVariant = None

_AUTOCAST_IGNORES = torch.float64  # autocast leaves float64 tensors alone; so does PEFT
_NO_BIAS: dict[str, bool] = {}  # PEFT before lora_bias existed


def patchable(module: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` (exact type) over a plain ``nn.Linear``."""
    return _PeftLinear is not None and type(module) is _PeftLinear and type(module.base_layer) is nn.Linear


def unpatched_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer this module does not patch (Conv2d, Embedding, subclasses, other bases)."""
    return _PeftLoraLayer is not None and isinstance(module, _PeftLoraLayer) and not patchable(module)


def fallback_reason(layer: nn.Module) -> str | None:
    """Why PEFT's own forward has to run in the layer's current state; ``None`` when ours may."""
    return _state(layer)[0]


def _state(layer: nn.Module) -> tuple[str | None, str, bool]:
    """``(fallback reason or None, active adapter, whether it is DoRA)``: every attribute read once,
    since the fast path asks this at every call."""
    if layer.disable_adapters:
        return "adapters disabled", "", False
    if layer.merged:
        return "adapter merged into the base weight", "", False
    active = layer.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters", "", False
    name = active[0]
    # Submodules and parameters straight from nn.Module's own dicts: reading them as attributes goes
    # through nn.Module.__getattr__, a Python call per read (12 reads per LoRA call otherwise).
    modules = layer._modules  # noqa: SLF001
    lora_A = modules["lora_A"]._modules.get(name)  # noqa: SLF001
    if lora_A is None:
        return f"active adapter {name!r} is not on this layer", name, False
    base, lora_B = modules["base_layer"], modules["lora_B"]._modules[name]  # noqa: SLF001
    if type(base) is not nn.Linear or type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        # e.g. parametrized after optimize(): a weight that is no longer a parameter
        kinds = ", ".join(type(m).__name__ for m in (base, lora_A, lora_B))
        return f"base layer, lora_A, lora_B are {kinds}, not all nn.Linear", name, False
    # Attributes of some PEFT releases only: lora_variant (>= 0.16; before it DoRA, flagged in
    # use_dora, was the only variant) and lora_bias (>= 0.14). Without either DoRA flag we cannot
    # tell plain LoRA apart, so PEFT's forward runs.
    variants = getattr(layer, "lora_variant", None)
    if variants is not None:
        variant = variants.get(name)
        dora = variant is not None and _is_dora_variant(variant)
        if variant is not None and not dora:
            return f"LoRA variant {type(variant).__name__}", name, False
    else:
        use_dora = getattr(layer, "use_dora", None)
        if use_dora is None:
            return "this PEFT's lora.Linear has neither lora_variant nor use_dora: cannot tell plain LoRA", name, False
        dora = use_dora.get(name, False)
    if dora and type(layer.lora_magnitude_vector[name]) is not _PeftDoraLinearLayer:
        return f"DoRA magnitude of type {type(layer.lora_magnitude_vector[name]).__name__}", name, dora
    if getattr(layer, "lora_bias", _NO_BIAS).get(name, False):
        return "lora_B has a bias (lora_bias=True)", name, dora
    dropout = modules["lora_dropout"]._modules[name]  # noqa: SLF001
    if type(dropout) is not nn.Identity and not (type(dropout) is nn.Dropout and (dropout.p == 0 or not dropout.training)):
        return f"LoRA dropout {dropout!r} active in training mode", name, dora
    if layer.fan_in_fan_out or not getattr(layer, "cast_input_dtype_enabled", True):
        return "fan_in_fan_out or input dtype casting disabled", name, dora
    return None, name, dora


def _is_dora_variant(variant: object) -> bool:
    return _PeftDoraVariant is not None and type(variant) is _PeftDoraVariant


def _same_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    dtype = x.dtype  # plain comparisons, no generator: this runs at every call
    return weight.dtype == dtype and lora_A.dtype == dtype and lora_B.dtype == dtype and (bias is None or bias.dtype == dtype)


def _fast_path_params(layer: nn.Module, x: torch.Tensor):
    """``(weight, bias, lora_A, lora_B, scale, magnitude)`` when our op computes exactly PEFT's forward
    for this layer and input now (``magnitude``: DoRA's vector, ``None`` for plain LoRA), else ``None``."""
    reason, name, dora = _state(layer)
    if reason is not None:
        return None
    # Plain nn.Linear layers (_state checked): their parameters are in _parameters, read without __getattr__.
    modules = layer._modules  # noqa: SLF001
    base = modules["base_layer"]._parameters  # noqa: SLF001
    weight, bias = base["weight"], base["bias"]
    lora_A = modules["lora_A"]._modules[name]._parameters["weight"]  # noqa: SLF001
    lora_B = modules["lora_B"]._modules[name]._parameters["weight"]  # noqa: SLF001
    if torch.is_autocast_enabled(x.device.type):
        # PEFT casts x to lora_A's dtype, then autocast casts every GEMM operand to its dtype: the
        # same values as casting straight to the autocast dtype, unless lora_A's dtype is narrower.
        narrower = lora_A.dtype not in (torch.float32, torch.get_autocast_dtype(x.device.type))
        if narrower or _AUTOCAST_IGNORES in (x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype):
            return None
    elif not _same_dtypes(x, weight, bias, lora_A, lora_B):
        return None  # PEFT's type promotion between base and LoRA dtypes
    magnitude = layer.lora_magnitude_vector[name].weight if dora else None
    if magnitude is not None and magnitude.dtype != lora_A.dtype:
        return None  # PEFT's type promotion between the magnitude and the norm (lora_A's dtype)
    return weight, bias, lora_A, lora_B, layer.scaling[name], magnitude


def lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``lora.Linear.forward`` as one ``lora_linear`` (or, for DoRA, ``dora_linear``) node when that is
    the same maths, else PEFT's."""
    params = None if args or kwargs else _fast_path_params(self, x)
    if params is None:
        return type(self).forward(self, x, *args, **kwargs)
    *params, magnitude = params
    if magnitude is None:
        return lora_linear(x, *params)
    weight, bias, lora_A, lora_B, scale = params
    return dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale)


def has_hooks(module: nn.Module) -> bool:
    """Hooks (the module's own or global ones) that using its weights directly, rather than calling
    the module, would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks  # noqa: SLF001
        or torch.nn.modules.module._has_any_global_hook()  # noqa: SLF001 (no public query exists)
    )


def runs_plain_fast_path(module: nn.Module) -> bool:
    """Our patched forward, and no hook that calling it directly would skip."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is lora_forward and not has_hooks(module)


def shared_input_projections(modules: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``tuple(m(x) for m in modules)`` as one autograd node (self-attention's to_q/to_k/to_v), or
    ``None`` when that is not exactly the same: a layer not on the fused path, an unfrozen base,
    hooks, DoRA, or tracing (under torch.compile each projection stays its own custom op)."""
    if tracing():
        return None
    layers = []
    for module in modules:
        if not runs_plain_fast_path(module) or (params := _fast_path_params(module, x)) is None:
            return None
        weight, bias, *_lora, magnitude = params
        if magnitude is not None or weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        layers.append(params[:5])
    return lora_linear_shared_input(x, layers)
