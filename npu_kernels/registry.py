"""The one registry of ops, and the typed inputs a backend is asked about.

Each op declares itself once, as an :class:`OpSpec` in ``npu_kernels/ops/<op>.py``;
``npu_kernels/ops/_build.py`` turns a spec into the op's custom op (what ``torch.compile`` sees),
its eager path and the dispatch prologue. Everything that lists or routes ops reads :data:`OPS`:
the backends, ``npu_kernels.report``, ``python -m npu_kernels`` and the compile routing.

This module imports nothing of ``npu_kernels``: the backends and the ops both build on it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------------ the backends' inputs
# What ``not_supported_reasons(op, inputs)`` receives (the xformers ``Inputs`` idea): the op's
# tensors by name. ``data`` are the tensors whose dtype the kernels compute in; ``others`` the
# tensors that only need the same device (affine parameters, masks). Built only when ``auto``
# meets a new input kind or a forced backend checks its inputs, never on the cached eager path.
@dataclasses.dataclass(frozen=True)
class GegluInputs:
    x: Tensor

    @property
    def data(self) -> tuple[Tensor, ...]:
        return (self.x,)

    @property
    def others(self) -> tuple[Tensor, ...]:
        return ()


@dataclasses.dataclass(frozen=True)
class GroupNormSiluInputs:
    x: Tensor
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None

    @property
    def data(self) -> tuple[Tensor, ...]:
        return (self.x,)

    @property
    def others(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.weight, self.bias) if t is not None)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """``q [B, H, Sq, D]``, ``k [B, H, Skv, D]``, ``v [B, H, Skv, Dv]`` and an optional mask as
    the user passed it (boolean or additive, any rank that broadcasts)."""

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Optional[Tensor] = None

    @property
    def data(self) -> tuple[Tensor, ...]:
        return (self.q, self.k, self.v)

    @property
    def others(self) -> tuple[Tensor, ...]:
        return () if self.attn_mask is None else (self.attn_mask,)


@dataclasses.dataclass(frozen=True)
class LoraLinearInputs:
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor

    @property
    def data(self) -> tuple[Tensor, ...]:
        return (self.x, self.weight, self.lora_A, self.lora_B)

    @property
    def others(self) -> tuple[Tensor, ...]:
        return () if self.bias is None else (self.bias,)


@dataclasses.dataclass(frozen=True)
class DoraLinearInputs:
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor
    weight_norm: Tensor

    @property
    def data(self) -> tuple[Tensor, ...]:
        return (self.x, self.weight, self.lora_A, self.lora_B)

    @property
    def others(self) -> tuple[Tensor, ...]:
        return (self.magnitude, self.weight_norm) + (() if self.bias is None else (self.bias,))


Inputs = GegluInputs | GroupNormSiluInputs | AttentionInputs | LoraLinearInputs | DoraLinearInputs


# ------------------------------------------------------------------------------------ the spec
@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything that differs between ops; ``ops/_build.py`` generates the rest.

    The schemas are ``torch.library`` schemas without the op name. Their argument and return
    names are the vocabulary of ``saves`` and of the backward: the backward kernel's arguments
    are looked up by name among ``grad_out``, the saved tensors, the forward's non-tensor
    arguments and ``needs_input_grad``; its returns ``grad_<name>`` are the gradients of the
    forward argument ``<name>`` (every other argument gets none).
    """

    name: str
    inputs: type                      # the Inputs class: the tensor arguments backends see, by name
    schema: str                       # forward, e.g. "(Tensor x, str approximate) -> Tensor out"
    forward_kernel: str               # the backend modules' forward kernel, e.g. "geglu_forward"
    backward_kernel: str
    backward_schema: str              # e.g. "(Tensor grad_out, Tensor x, str approximate) -> Tensor grad_x"
    saves: tuple[str, ...]            # forward arguments / kernel results the backward reads
    validate: Callable[..., tuple]    # checks the arguments (ValueError naming the op), returns them normalised
    fake: Callable[..., object]       # the custom op's fake impl: output shapes, dtypes, strides
    plain_maths: Optional[Callable[..., Tensor]] = None  # differentiable PyTorch maths for compiled graphs
    finish: Optional[Callable[..., tuple]] = None  # (outputs, args, backend) -> outputs as the fake describes
    kernel_args: Optional[Callable[[tuple], tuple]] = None  # the arguments as kernels take them
    fixed_backend: Optional[str] = None  # no backend choice: this backend's kernels, no backend argument
    backward_is_custom_op: bool = True  # False: the backward is plain ATen ops, traced as they are
    kernel_returns: Optional[tuple[str, ...]] = None  # the forward kernel's results, where more than the outputs
    custom_op_saves: Optional[tuple[str, ...]] = None  # ``saves`` in the custom op, where they differ

    @property
    def arg_names(self) -> tuple[str, ...]:
        return schema_names(self.schema)[0]

    @property
    def output_names(self) -> tuple[str, ...]:
        return schema_names(self.schema)[1]


def schema_names(schema: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Argument and return names of ``"(Tensor x, str approximate) -> Tensor out"``."""
    arguments, returns = schema.split("->")
    args = tuple(part.split()[-1] for part in arguments.strip()[1:-1].split(",") if part.strip())
    returns = returns.strip()
    if returns.startswith("("):
        returns = returns[1:-1]
    outs = tuple(part.split()[-1] for part in returns.split(",") if part.strip())
    return args, outs


#: Every op, by name, in the order reports list them.
OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add an op to :data:`OPS` (each ``ops/<op>.py`` does, once, at import)."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is registered twice")
    OPS[spec.name] = spec
    return spec


def op_names() -> tuple[str, ...]:
    return tuple(OPS)


def backend_ops() -> tuple[str, ...]:
    """The ops a backend is chosen for (``lora_linear`` and ``dora_linear`` run ATen's GEMMs on every device)."""
    return tuple(name for name, spec in OPS.items() if spec.fixed_backend is None)


def decomposable_ops() -> tuple[str, ...]:
    """The ops with plain maths a compiled graph may see instead of the custom op."""
    return tuple(name for name, spec in OPS.items() if spec.plain_maths is not None)
