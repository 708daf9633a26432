"""Count the ATen ops a piece of code dispatches, and how many of them launch kernels.

A ``TorchDispatchMode`` sees every op below autograd, forward and backward (the autograd engine
carries the mode into its threads). "Kernel-launching" excludes what only makes tensor metadata:
views, ``detach``/``alias``, shape queries and bare allocations (``empty*``). Counts are exact and
repeatable on any device, unlike seconds on a shared machine, and on a host-bound GPU or NPU step
they are what the step time follows.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NON_LAUNCHING = {
    "detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "is_contiguous", "storage_offset",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "set_", "resize_",
    "_unsafe_view", "_reshape_alias",  # views in all but schema
    "promote_types", "result_type",  # dtype arithmetic
}


def launches(func: torch._ops.OpOverload) -> bool:
    """Whether an ATen op does device work (not a view, detach, metadata query or bare allocation)."""
    return not (func.is_view or func._schema.name.split("::")[-1] in _NON_LAUNCHING)


@dataclasses.dataclass
class DispatchCounts:
    """Ops dispatched (every ATen op) and kernel-launching ops, with a per-op breakdown."""

    dispatched: int = 0
    launching: int = 0
    by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def top(self, n: int = 15, launching_only: bool = False) -> list[tuple[str, int]]:
        items = self.by_op.items() if not launching_only else ((k, v) for k, v in self.by_op.items() if not k.startswith("~"))
        return collections.Counter(dict(items)).most_common(n)


class CountDispatches(TorchDispatchMode):
    """``with CountDispatches() as counter: ...`` then read ``counter.counts``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = DispatchCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counts = self.counts
        counts.dispatched += 1
        name = func._schema.name.split("::")[-1] + ("" if func._overloadname == "default" else "." + func._overloadname)
        if launches(func):
            counts.launching += 1
            counts.by_op[name] += 1
        else:
            counts.by_op["~" + name] += 1  # "~": dispatched but launches nothing
        return func(*args, **(kwargs or {}))


def count_dispatches(fn: Callable[[], object]) -> DispatchCounts:
    """The ATen ops ``fn()`` dispatches (run it once inside the mode; its result is dropped)."""
    with CountDispatches() as counter:
        fn()
    return counter.counts
