"""Saved tensors the backward rebuilds instead of keeping: the recompute levels' one mechanism.

A forward that can cheaply reproduce a tensor bit for bit (a LayerNorm from its input, a cast, a
projection of the 77 text tokens, ...) marks the tensor with :func:`rebuildable`: the function
that made it and the tensors it read. When one of our autograd nodes saves a marked tensor (or a
view of one), :func:`pack` saves those sources instead, resolving marks on the sources in turn,
and :func:`unpack` reruns the function in the backward, under the autocast state of the forward,
so the values match the forward's exactly. Sources other nodes keep already (a LayerNorm's input,
the residual stream) then cost nothing: autograd stores a tensor once, whoever saves it.

Inside gradient checkpointing the marks stand down (:func:`standing_down`): checkpointing reruns
the block's forward anyway, and rebuilding inside that rerun would recompute the same thing twice.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

Tensor = torch.Tensor
_MARK = "_npu_kernels_rebuild"
_CHECKPOINT_HOOKS = ("_checkpoint_hook", "_recomputation_hook")  # torch.utils.checkpoint's (non-reentrant)


class _Recipe:
    """``fn(*sources)`` (under the forward's autocast state, without grad) gave the marked tensors.
    One recipe may mark several tensors (q, k and v of one projection node); it runs once for all."""

    __slots__ = ("fn", "sources", "autocast", "made")

    def __init__(self, fn: Callable, sources: tuple, autocast: tuple) -> None:
        self.fn, self.sources, self.autocast = fn, sources, autocast
        # What fn returned in the backward, kept while a saved plan still refers to this recipe (the
        # nodes that read it run one after the other in the backward): nothing is rebuilt twice.
        self.made = None


def _autocast_state(device_type: str) -> tuple:
    if not torch.is_autocast_enabled(device_type):
        return (device_type, False, None)
    return (device_type, True, torch.get_autocast_dtype(device_type))


def standing_down() -> bool:
    """True inside gradient checkpointing: in a forward that ``torch.utils.checkpoint`` reruns in
    the backward (reentrant or not), or under its non-reentrant saving hooks (whose rerun must save
    the same tensors as the first run). Never while dynamo traces: the queries below are not traceable,
    and a compiled graph's own checkpointing (or its memory planner) decides what is rerun."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._current_graph_task_id() != -1:  # noqa: SLF001 - a forward running inside a backward
        return True
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001 - no public query
    return hooks is not None and hooks[0].__qualname__.startswith(_CHECKPOINT_HOOKS)


def rebuildable(outputs: Tensor | tuple[Tensor, ...], fn: Callable, *sources: Tensor) -> None:
    """Mark ``outputs`` (one tensor, or the tuple ``fn`` returns) as ``fn(*sources)``.

    ``fn`` must reproduce them exactly from ``sources`` (same kernels, same operands: the autocast
    state of this call is replayed). Nothing is marked inside gradient checkpointing.
    """
    if torch.compiler.is_compiling() or standing_down():  # compiled graphs plan their own memory
        return
    single = isinstance(outputs, Tensor)
    device_type = (outputs if single else outputs[0]).device.type
    recipe = _Recipe(fn, sources, _autocast_state(device_type))
    for index, out in enumerate((outputs,) if single else outputs):
        setattr(_root(out), _MARK, (recipe, None if single else index))  # which of fn's results it is


_CASTS: dict[torch.dtype, Callable[[Tensor], Tensor]] = {}


def cast_to(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``lambda t: t.to(dtype)``, one per dtype: the recipe of an autocast copy."""
    cast = _CASTS.get(dtype)
    if cast is None:
        cast = _CASTS[dtype] = lambda t: t.to(dtype)
    return cast


def recipe_of(t: Tensor) -> tuple[_Recipe, int | None] | None:
    """How ``t`` (or the tensor it is a view of) can be rebuilt; ``None`` when it cannot."""
    base = t._base  # noqa: SLF001 - _root inlined: this runs for every tensor every op saves
    return getattr(t if base is None else base, _MARK, None)


def pack(tensors: Sequence) -> tuple[tuple, object]:
    """``(to_save, plan)``: ``tensors`` with every marked one replaced by its sources (recursively).
    ``plan`` is ``None`` when nothing was marked: save ``tensors`` as they are."""
    if not any_marked(tensors):
        return tensors, None
    leaves: list = []
    plan = [_plan(t, leaves) for t in tensors]
    return tuple(leaves), plan


def _plan(t: Tensor | None, leaves: list) -> tuple:
    mark = None if t is None else getattr(t if t._base is None else t._base, _MARK, None)  # recipe_of, inlined  # noqa: SLF001
    if mark is None:
        leaves.append(t)
        return (len(leaves) - 1,)
    recipe, index = mark
    sources = [_plan(s, leaves) for s in recipe.sources]
    view = None if _root(t) is t else (t.size(), t.stride(), t.storage_offset())
    return (recipe, index, sources, view)


def unpack(saved: Sequence, plan: object) -> Sequence:
    """The tensors :func:`pack` was given, rebuilt where it saved sources. (Lists, not tuples, in
    this module: in Python 3.11 a list comprehension costs less than ``tuple(<generator>)``.)"""
    if plan is None:
        return saved
    with torch.no_grad():
        return [_rebuild(entry, saved) for entry in plan]


def _rebuild(entry: tuple, saved: tuple) -> Tensor | None:
    if len(entry) == 1:
        return saved[entry[0]]
    recipe, index, sources, view = entry
    made = recipe.made
    if made is None:
        args = [_rebuild(s, saved) for s in sources]
        if _autocast_state(recipe.autocast[0]) == recipe.autocast:  # the backward's autocast is the forward's
            made = recipe.made = recipe.fn(*args)
        else:
            device_type, enabled, dtype = recipe.autocast
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # the forward's autocast, on or off
                made = recipe.made = recipe.fn(*args)
    out = made if index is None else made[index]
    root = _root(out)
    return root if view is None else root.as_strided(*view)


def _root(t: Tensor) -> Tensor:
    """The tensor ``t`` is a view of (``t`` itself if it is none): marks live there, so every view
    of a marked tensor finds its recipe."""
    base = t._base  # noqa: SLF001 - the documented attribute naming a view's base
    return t if base is None else base



@contextlib.contextmanager
def saving_sources() -> Iterator[None]:
    """Within the block, autograd saves marked tensors as their sources: for autograd-complete ops
    we call but do not build (SDPA, torch_npu's fused attention), whose saving we cannot reach
    otherwise. Every saved tensor still goes through the hooks active outside the block (gradient
    checkpointing's, a memory counter's, CPU offloading's)."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001 - no public query
    outer_pack, outer_unpack = outer if outer is not None else (_same, _same)

    def pack_hook(t: Tensor) -> tuple:
        if recipe_of(t) is None:
            return None, outer_pack(t)
        leaves, plan = pack((t,))
        return plan, tuple(outer_pack(leaf) for leaf in leaves)

    def unpack_hook(packed: tuple) -> Tensor:
        plan, payload = packed
        if plan is None:
            return outer_unpack(payload)
        return unpack(tuple(outer_unpack(leaf) for leaf in payload), plan)[0]

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, unpack_hook):
        yield


def _same(t: Tensor) -> Tensor:
    return t


def any_marked(tensors: tuple) -> bool:
    """Whether one of ``tensors`` (``None`` allowed) is marked rebuildable."""
    for t in tensors:  # a loop, not any(<generator>), recipe_of inlined: this runs at every call of every op
        if t is not None:
            base = t._base  # noqa: SLF001
            if getattr(t if base is None else base, _MARK, None) is not None:
                return True
    return False
