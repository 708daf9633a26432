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
        # Keyed by the storage itself (not its address): fake tensors (a FakeTensorMode trace) have none.
        self._seen: set[int] = {t.untyped_storage()._cdata for t in exclude}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
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


def sdxl_saved_bytes(pixels: int = 512, precision: str = "fp32", recompute: str | None = None) -> int:
    """Bytes the full SDXL UNet's LoRA step keeps for the backward (batch 1, ``pixels`` square): stock
    (``recompute=None``) or ``optimize(recompute=...)``. Traced on fake tensors: exact, no memory
    or compute spent on the 2.6 B parameters. ``precision``: "fp32", or "bf16" as the recipe runs it
    (frozen weights bf16, LoRA fp32, bf16 autocast)."""
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode

    import npu_kernels
    from benchmarks.models import LORA_TARGETS, SDXL_UNET_CONFIG, unet_inputs

    # Built on the meta device, then given fake storage (a fake parameter cannot be cast again).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float32 if precision == "fp32" else torch.bfloat16)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # LoRA trains in fp32
    unet.train()
    if recompute is not None:
        npu_kernels.optimize(unet, recompute=recompute)
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = torch.device("cpu")
        unet.to_empty(device=device)
        inputs = unet_inputs(SDXL_UNET_CONFIG, pixels // 8, device)

        def forward() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                prediction = unet(**inputs).sample
            return F.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32))

        return saved_bytes(forward, exclude=list(unet.parameters()))


if __name__ == "__main__":  # python -m benchmarks.memory [pixels]: the full SDXL UNet, stock vs every level
    import sys

    import npu_kernels

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    for precision in ("fp32", "bf16"):
        stock = sdxl_saved_bytes(size, precision)
        print(f"SDXL UNet LoRA step, {size} px, batch 1, {precision}: bytes saved for backward")
        print(f"  {'stock':24}{stock:>16,}  1.000x")
        for level in npu_kernels.RECOMPUTE_LEVELS:
            ours = sdxl_saved_bytes(size, precision, level)
            print(f"  {'recompute=' + level:24}{ours:>16,}  {ours / stock:.3f}x")
