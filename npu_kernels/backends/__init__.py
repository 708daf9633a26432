"""The one place that decides which kernel serves an op.

The backends implement the same kernel contract (see :mod:`.pytorch` for the contract):

* ``torch``  -- plain PyTorch (:mod:`.pytorch`), runs on every device and in float64;
* ``triton`` -- our Triton kernels (``npu_kernels.backends.triton``), meant for CUDA;
* ``npu``    -- thin adapters over torch_npu's fused ops (``npu_kernels.backends.npu``), for Ascend NPUs;
* ``sdpa``   -- PyTorch's SDPA, ``auto``'s choice for attention on CUDA (internal, not forceable).

``auto`` (the default) picks by the tensors' device, walking a priority list and taking the first
backend that loads and has no ``not_supported_reasons(op, inputs)`` for the op's typed inputs
(:mod:`npu_kernels.registry`; the xformers dispatch idea). ``NPU_KERNELS_BACKEND=torch|triton|npu``
or :func:`use_backend` force one backend: it then runs whatever the tensors' device (that is how
CI checks Triton kernels on CPU under ``TRITON_INTERPRET=1`` and the NPU adapters against a
stand-in ``torch_npu``), and an error names what is missing when it cannot. The forced choice is a
``contextvars`` variable: each thread and asyncio task sees its own.

Under ``torch.compile`` an op is either our custom op (running the backend picked above) or its plain
PyTorch maths, which inductor fuses itself: :func:`compiled_choice` decides per device type and op,
``NPU_KERNELS_COMPILED=custom_op|decompose`` or :func:`use_compiled` force one. Both forced choices
are read while tracing and kept by the compiled graph (dynamo does not guard on a context variable):
compile inside the block.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Iterator, Sequence

import torch

from npu_kernels import registry

BACKENDS: tuple[str, ...] = ("torch", "triton", "npu")
ENV_VAR = "NPU_KERNELS_BACKEND"

_MODULES = {
    "torch": "npu_kernels.backends.pytorch",
    "triton": "npu_kernels.backends.triton",
    "npu": "npu_kernels.backends.npu",
    "sdpa": "npu_kernels.backends.sdpa",  # internal: auto's choice for attention on CUDA, not forceable
}
# Priority lists for ``auto``, by device type and op; anything not listed gets the PyTorch path.
# Attention on CUDA goes to PyTorch's SDPA (FlashAttention-2 / cuDNN) first: our Triton attention
# takes over a shape class only once a GPU benchmark shows it faster there, so ``auto`` is never
# slower than SDPA. The H100 numbers behind this (benchmarks/results/h100-2026-11-25/README.md): our self-attention was slower
# than SDPA; our cross-attention took less GPU time but more host time per call, so SDPA keeps both
# until a UNet-step run shows the cross-attention switch paying off.
# On the CPU, SDPA runs the same ATen flash kernel as our PyTorch path and saves the same tensors,
# with its backward in C++ rather than in a Python autograd Function: less host time per call.
_AUTO_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"flash_attention": ("sdpa", "torch"), "cross_attention": ("sdpa", "torch")},
    "npu": {"default": ("npu", "torch")},
    "cuda": {
        "default": ("triton", "torch"),
        "flash_attention": ("sdpa", "triton", "torch"),
        "cross_attention": ("sdpa", "triton", "torch"),
    },
}

# Under torch.compile, what the compiled graph sees of each op, by device type:
# * "custom_op" -- our torch.library op, opaque to inductor, running the backend ``select`` picks;
# * "decompose" -- the op's plain PyTorch maths inline (its spec's ``plain_maths``), which
#   inductor fuses with its neighbours itself.
# CUDA: inductor's own GroupNorm+SiLU beat our Triton kernel and SDPA is what attention runs anyway,
# while our GEGLU beat inductor's (benchmarks/results/h100-2026-11-25/README.md has the numbers). NPU: torch_npu's fused
# ops. Every other device (the CPU) and every op not listed here: plain maths when ``decompose`` is
# the device's default, else the custom op.
COMPILED_CHOICES: tuple[str, ...] = ("custom_op", "decompose")
COMPILED_ENV_VAR = "NPU_KERNELS_COMPILED"
_COMPILED_ROUTES: dict[str, dict[str, str]] = {
    "cuda": {
        "geglu": "custom_op",
        "group_norm_silu": "decompose",
        "flash_attention": "decompose",
        "cross_attention": "decompose",
    },
    "npu": {},
}
_COMPILED_DEFAULT = {"cuda": "custom_op", "npu": "custom_op"}  # any other device type: "decompose"

_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}
_functions: dict[tuple[str, str], Callable | None] = {}  # (backend, name) -> function; see provided()
_op_kernels: dict[tuple[str, str], tuple] = {}  # (backend, op) -> see op_kernels()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot load or cannot serve the given inputs."""


def _checked(name: str, choices: tuple[str, ...], what: str) -> str:
    """``name`` normalised, if it is ``auto`` or one of ``choices``; else a ValueError naming them."""
    name = name.strip().lower()
    if name not in choices + ("auto",):
        raise ValueError(f"unknown {what} {name!r}; choose one of auto, {', '.join(choices)}")
    return name


def _check_name(name: str) -> str:
    return _checked(name, BACKENDS, "npu_kernels backend")


_ENV_BACKEND: str = _check_name(os.environ.get(ENV_VAR, "auto") or "auto")
_forced = contextvars.ContextVar("npu_kernels_backend", default=_ENV_BACKEND)


def _check_compiled(name: str) -> str:
    return _checked(name, COMPILED_CHOICES, "compiled choice")


_ENV_COMPILED: str = _check_compiled(os.environ.get(COMPILED_ENV_VAR, "auto") or "auto")
_compiled_forced = contextvars.ContextVar("npu_kernels_compiled", default=_ENV_COMPILED)


def load(name: str) -> ModuleType | None:
    """Import a backend's kernel module once; ``None`` (and :func:`load_error`) when it cannot load."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # noqa: BLE001 - ImportError, or torch_npu failing without CANN (often OSError/RuntimeError)
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    if not callable(getattr(module, "not_supported_reasons", None)):
        _load_errors[name] = f"{_MODULES[name]} does not implement the backend contract (not_supported_reasons)"
        return None
    _loaded[name] = module
    return module


def reset_cache() -> None:
    """Forget which backends loaded and every decision made with them, then load again what this
    process can use (tests that put a stand-in ``torch_npu`` on the path use this; so does anything
    that changes a backend's environment). Loading here, in eager code, keeps an import out of
    anything ``torch.compile`` traces later."""
    _loaded.clear()
    _load_errors.clear()
    _functions.clear()
    _op_kernels.clear()
    forget_decisions()
    _preload()


def load_error(name: str) -> str | None:
    """Why a backend failed to load, or ``None`` if it loaded (or was never tried)."""
    load(name)
    return _load_errors.get(name)


# Under torch.compile: read once while tracing and kept as a constant (dynamo cannot trace
# ContextVar.get). Eagerly: a plain call.
@torch.compiler.assume_constant_result
def forced_backend() -> str:
    """The backend forced by :func:`use_backend` or ``NPU_KERNELS_BACKEND`` in this thread/task; ``"auto"`` if none."""
    return _forced.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (``auto``, ``torch``, ``triton`` or ``npu``) for every op inside the block.

    Example::

        with npu_kernels.use_backend("torch"):
            out = npu_kernels.geglu(x)
    """
    name = _check_name(name)
    token = _forced.set(name)
    try:
        if name != "auto" and load(name) is None:
            raise BackendUnavailableError(f"npu_kernels backend {name!r} cannot load: {_load_errors[name]}")
        yield
    finally:
        _forced.reset(token)


def not_supported_reasons(name: str, op: str, inputs: registry.Inputs) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on these inputs (empty when it can)."""
    module = load(name)
    if module is None:
        return [f"cannot load: {_load_errors[name]}"]
    return list(module.not_supported_reasons(op, inputs))


def auto_candidates(device_type: str, op: str) -> tuple[str, ...]:
    """Backends ``auto`` tries for ``op`` on a device type, best first."""
    by_op = _AUTO_PRIORITY.get(device_type, {})
    return by_op.get(op, by_op.get("default", ("torch",)))


def candidates(device_type: str, op: str) -> tuple[str, ...]:
    """The backends :func:`select` considers for ``op`` on a device type: the forced one, or ``auto``'s list."""
    forced = forced_backend()
    return (forced,) if forced != "auto" else auto_candidates(device_type, op)


def first_usable(op: str, names: Sequence[str], inputs: registry.Inputs) -> str | None:
    """The first of ``names`` that serves ``op`` for ``inputs``; ``None`` when none does. The PyTorch
    path is not asked: it is the fall-back in any case (and refuses only non-floating inputs)."""
    return next((name for name in names if name == "torch" or not not_supported_reasons(name, op, inputs)), None)


# Open count_selections() blocks; select() adds to each (one dict increment per call while any is open).
_selection_counters: list[collections.Counter] = []


@contextlib.contextmanager
def count_selections() -> Iterator[collections.Counter]:
    """Count the dispatch decisions made inside the block: ``Counter[(op, backend)] -> calls``.

    What actually ran, not a prediction: every eager op call selects once. Selections made while
    ``torch.compile`` traces are not counted: a compiled graph runs without selecting, and a counter
    growing during tracing would change state dynamo guards on and force a recompile every call.
    """
    counter: collections.Counter = collections.Counter()
    _selection_counters.append(counter)
    try:
        yield counter
    finally:
        _selection_counters.remove(counter)


def select(op: str, *tensors: torch.Tensor | None) -> str:
    """Name of the backend that serves ``op`` for these input tensors."""
    name = _select(op, tensors)
    if not torch.compiler.is_compiling() and _selection_counters:  # compiling first: no guard on the list
        for counter in _selection_counters:
            counter[(op, name)] += 1
    return name


# ``auto``'s decisions by input kind: (op, each tensor's device, dtype and shape) -> backend name.
# A backend's ``not_supported_reasons`` may read only those (and process-wide settings, which
# ``reset_cache`` makes it read again): a UNet calls each op with a few dozen kinds of input, so
# the priority list is walked once per kind instead of at every call.
_decisions: dict[tuple, str] = {}
_MAX_DECISIONS = 4096  # dynamic shapes could add kinds without end: start over past this many


def forget_decisions() -> None:
    """Make ``auto`` decide again for every input kind (after a backend's settings changed)."""
    _decisions.clear()


def _select(op: str, tensors: Sequence[torch.Tensor | None]) -> str:
    forced = forced_backend()
    if forced != "auto":
        reasons = not_supported_reasons(forced, op, registry.OPS[op].inputs(*tensors))
        if reasons:
            raise BackendUnavailableError(
                f"npu_kernels backend {forced!r} (forced) cannot run {op}: {'; '.join(reasons)}"
            )
        return forced
    names = auto_candidates(next(t for t in tensors if t is not None).device.type, op)
    if names[0] == "torch":  # the fallback anyway (the CPU): nothing to decide
        return "torch"
    if torch.compiler.is_compiling():  # no lookup in a dict dynamo would guard on (and sizes may be symbolic)
        return first_usable(op, names, registry.OPS[op].inputs(*tensors)) or "torch"
    kind = (op, *[None if t is None else (t.device, t.dtype, t.shape) for t in tensors])
    name = _decisions.get(kind)
    if name is None:
        if len(_decisions) >= _MAX_DECISIONS:
            _decisions.clear()
        name = _decisions[kind] = first_usable(op, names, registry.OPS[op].inputs(*tensors)) or "torch"
    return name


@torch.compiler.assume_constant_result  # see forced_backend
def forced_compiled() -> str:
    """The compiled choice forced by :func:`use_compiled` or ``NPU_KERNELS_COMPILED`` in this thread/task; ``"auto"`` if none."""
    return _compiled_forced.get()


@contextlib.contextmanager
def use_compiled(name: str) -> Iterator[None]:
    """Force what ``torch.compile`` sees of every op traced inside the block: ``"custom_op"``,
    ``"decompose"`` (plain PyTorch maths) or ``"auto"`` (per device and op, see :func:`compiled_choice`).

    The choice is read while tracing: compile (or recompile) inside the block. Example::

        with npu_kernels.backends.use_compiled("custom_op"):
            loss = torch.compile(unet)(**inputs).sample.mean()
    """
    token = _compiled_forced.set(_check_compiled(name))
    try:
        yield
    finally:
        _compiled_forced.reset(token)


def compiled_choice(op: str, device_type: str, backend: str | None = None) -> str:
    """What a compiled graph sees of ``op`` on ``device_type``: ``"custom_op"`` or ``"decompose"``.

    A forced compiled choice wins; a forced backend (``use_backend``) means its kernel, so its custom
    op; otherwise the per-device routes, except that a custom op around the PyTorch path (``backend``
    ``"torch"``, what :func:`select` picked) would only hide plain maths from inductor. Ops without
    plain maths are always custom ops.
    """
    spec = registry.OPS.get(op)
    if spec is None or spec.plain_maths is None:
        return "custom_op"
    forced = forced_compiled()
    if forced != "auto":
        return forced
    if forced_backend() != "auto":
        return "custom_op"
    if backend == "torch":
        return "decompose"
    routes = _COMPILED_ROUTES.get(device_type, {})
    return routes.get(op, _COMPILED_DEFAULT.get(device_type, "decompose"))


def kernel_module(name: str) -> ModuleType:
    """The loaded kernel module of a backend (it must have loaded: see :func:`select`)."""
    module = load(name)
    if module is None:
        raise BackendUnavailableError(f"npu_kernels backend {name!r} cannot load: {_load_errors[name]}")
    return module


def kernel(backend: str, name: str) -> Callable:
    """The kernel function ``name`` (e.g. ``"geglu_forward"``) of a backend, or the PyTorch path's
    when the backend has none. The fall-back is how e.g. the NPU backend gets GroupNorm+SiLU's
    backward: torch_npu has a fused forward but no registered backward, so ours runs from the
    statistics the NPU forward saved."""
    fn = provided(backend, name)
    return fn if fn is not None else provided("torch", name)


def op_kernels(backend: str, spec: registry.OpSpec) -> tuple[Callable | None, Callable | None, Callable | None]:
    """``(autograd-complete function or None, forward kernel, backward kernel)`` of the op ``spec``
    describes, on ``backend``: :func:`provided` of the op's name and :func:`kernel` of its two kernels,
    looked up together once per process, so that an eager call reads one dict entry rather than
    walking three lookups. Eager calls only: dynamo would guard on this cache (it traces
    :func:`provided` and :func:`kernel` instead)."""
    found = _op_kernels.get((backend, spec.name))
    if found is None:
        found = (provided(backend, spec.name), kernel(backend, spec.forward_kernel), kernel(backend, spec.backward_kernel))
        _op_kernels[(backend, spec.name)] = found
    return found


def provided(backend: str, name: str) -> Callable | None:
    """The function ``name`` of a backend's kernel module, ``None`` where it has none (no
    fall-back): e.g. an op under its own name, autograd-complete (torch_npu's fused attention and
    GEGLU register their backward), which the op then calls as is. Looked up once per process (not
    while compiling: dynamo would guard on the cache).

    Only callables count: a backend package may well have a submodule named after an op.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and (backend, name) in _functions:
        return _functions[(backend, name)]
    fn = getattr(kernel_module(backend), name, None)
    fn = fn if callable(fn) else None
    if not compiling:
        _functions[(backend, name)] = fn
    return fn


def _preload() -> None:
    """Import the backends this process can use now, so that ``torch.compile`` never traces an import."""
    names = {"torch", "sdpa", forced_backend()} - {"auto"}  # sdpa: auto's attention on the CPU and CUDA
    if torch.cuda.is_available():
        names.add("triton")
    if importlib.util.find_spec("torch_npu") is not None:
        names.add("npu")
    for name in names:
        load(name)


_preload()
