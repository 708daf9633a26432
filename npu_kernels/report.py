"""Which backend serves each op on a device, and why the others cannot (``python -m npu_kernels``)."""
from __future__ import annotations

import torch

from npu_kernels import backends


def _sample_inputs(op: str, device: str, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """Small tensors shaped like SDXL's uses of the op (on the meta device when ``device`` is absent)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # no such device here (or torch_npu not imported)
        device = "meta"

    def make(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    if op == "geglu":
        return (make(1, 64, 2 * 80),)
    if op == "group_norm_silu":
        return make(1, 64, 8, 8), make(64), make(64)
    if op == "flash_attention":
        return make(1, 2, 256, 64), make(1, 2, 256, 64), make(1, 2, 256, 64), None
    return make(1, 2, 256, 64), make(1, 2, 77, 64), make(1, 2, 77, 64), None


def describe(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, list[str]]]:
    """For each op: every backend ``auto`` would consider on ``device``, mapped to its reasons (empty = usable)."""
    device = str(device)
    table: dict[str, dict[str, list[str]]] = {}
    for op in backends.OPS:
        inputs = _sample_inputs(op, device, dtype)
        names = backends.auto_candidates(device.split(":")[0], op)
        if backends.forced_backend() != "auto":
            names = (backends.forced_backend(),)
        table[op] = {name: backends.not_supported_reasons(name, op, inputs) for name in names}
    # lora_linear has no backend choice: ATen's GEMMs serve it on every device (see ops/lora_linear.py).
    table["lora_linear"] = {"torch": []}
    return table


def backend_report(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Op name -> the backend that serves it on ``device`` for ``dtype`` (first usable in priority order)."""
    report = {}
    for op, candidates in describe(device, dtype).items():
        usable = [name for name, reasons in candidates.items() if not reasons]
        report[op] = usable[0] if usable else "unavailable"
    return report
