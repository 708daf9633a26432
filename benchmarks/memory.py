"""Memory measurements for the benchmarks: bytes saved for backward, peak RSS, peak CUDA memory."""
from __future__ import annotations

import contextlib
import ctypes
from typing import Callable, Iterable, Iterator

import torch


class SavedTensorBytes:
    """Counts the bytes autograd keeps for the backward (activation memory), unique storages only.

    Exact and repeatable on any device: what fused ops buy in memory shows up here directly.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.total = 0
        # Storages already resident (the model's parameters) are not activation memory.
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator["SavedTensorBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that ``fn``'s autograd graph keeps for the backward, not counting ``exclude``."""
    counter = SavedTensorBytes(exclude)
    with counter.counting():
        out = fn()
    del out
    return counter.total


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory in bytes over the block: max allocated on CUDA, peak RSS (VmHWM) on CPU.

    On CPU the allocator's free lists are trimmed and the kernel's high-water mark reset first, so
    the peak belongs to this block; ``baseline`` is the resident memory before it (the weights).
    """
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["baseline"] = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    result["baseline"] = _rss_kib("VmRSS") * 1024
    yield result
    result["peak"] = _rss_kib("VmHWM") * 1024
