"""Which backend serves each op on a device, and why the others cannot (``python -m npu_kernels``)."""
from __future__ import annotations

import torch

from npu_kernels import backends, registry


def _sample_inputs(op: str, device: str, dtype: torch.dtype) -> registry.Inputs:
    """Small tensors shaped like SDXL's uses of the op (on the meta device when ``device`` is absent)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # no such device here (or torch_npu not imported)
        device = "meta"

    def make(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype)

    if op == "geglu":
        return registry.GegluInputs(make(1, 64, 2 * 80))
    if op == "group_norm_silu":
        return registry.GroupNormSiluInputs(make(1, 64, 8, 8), make(64), make(64))
    if op == "flash_attention":
        return registry.AttentionInputs(make(1, 2, 256, 64), make(1, 2, 256, 64), make(1, 2, 256, 64))
    if op == "cross_attention":
        return registry.AttentionInputs(make(1, 2, 256, 64), make(1, 2, 77, 64), make(1, 2, 77, 64))
    raise ValueError(f"no sample inputs for op {op!r}")


def survey(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """For each op: the backend that serves it on ``device`` for ``dtype`` (``"unavailable"`` if
    none), and every backend :func:`~npu_kernels.backends.select` would consider there (the forced
    one, or ``auto``'s list) mapped to its reasons (empty = usable)."""
    device_type = str(device).split(":")[0]
    table: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for op, spec in registry.OPS.items():
        if spec.fixed_backend is not None:  # no choice (lora_linear: ATen's GEMMs on every device)
            table[op] = (spec.fixed_backend, {spec.fixed_backend: []})
            continue
        inputs = _sample_inputs(op, str(device), dtype)
        names = backends.candidates(device_type, op)
        reasons = {name: backends.not_supported_reasons(name, op, inputs) for name in names}
        table[op] = (backends.first_usable(op, names, inputs) or "unavailable", reasons)
    return table


def describe(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, list[str]]]:
    """For each op: every backend considered on ``device``, mapped to its reasons (see :func:`survey`)."""
    return {op: reasons for op, (_chosen, reasons) in survey(device, dtype).items()}


def backend_report(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Op name -> the backend that serves it on ``device`` for ``dtype`` (first usable in priority order)."""
    return {op: chosen for op, (chosen, _reasons) in survey(device, dtype).items()}
