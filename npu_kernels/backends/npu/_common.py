"""What the NPU adapters share: the dtypes torch_npu's fused ops take, the chip generation, and the
reason format."""
from __future__ import annotations

import torch
import torch_npu

Tensor = torch.Tensor

#: Dtypes the fused ops take (bfloat16 on Atlas A2/A3-class devices only, see :func:`chip_reasons`;
#: float32 attention only on torch_npu/CANN releases that document it).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Device-name prefixes of Atlas A2/A3 training chips (``torch_npu.npu.get_device_name()`` gives e.g.
#: "Ascend910B3" or "Ascend910_9391"). The Atlas training series before them ("Ascend910A",
#: "Ascend910ProB", ...) has no bfloat16: aclnn pages list FLOAT16/FLOAT only for it.
A2_OR_LATER_PREFIXES = ("Ascend910B", "Ascend910_93")

_chip_names: dict[str, str] = {}


def chip_name(device: torch.device) -> str:
    """``torch_npu.npu.get_device_name`` for ``device`` (the current device for non-NPU tensors,
    i.e. a stand-in run), asked once per device; "" when torch_npu cannot say."""
    key = str(device)
    if key not in _chip_names:
        try:
            index = device.index if device.type == "npu" else None
            _chip_names[key] = str(torch_npu.npu.get_device_name(index) if index is not None else torch_npu.npu.get_device_name())
        except Exception:  # noqa: BLE001  (no device, or a torch_npu without the call: assume nothing)
            _chip_names[key] = ""
    return _chip_names[key]


def is_a2_or_later(device: torch.device) -> bool | None:
    """True on Atlas A2/A3, False on an older Atlas training chip, None when the name is unknown."""
    name = chip_name(device)
    if not name:
        return None
    return name.startswith(A2_OR_LATER_PREFIXES)


def reset_chip_cache() -> None:
    _chip_names.clear()


def chip_reasons(what: str, x: Tensor, a2_only: bool = False) -> list[str]:
    """Why the chip cannot run ``what`` on ``x``: bfloat16 (or, with ``a2_only``, anything) on an
    Atlas training chip older than A2. Unknown chips get the benefit of the doubt."""
    if x.device.type == "meta" or is_a2_or_later(x.device) is not False:
        return []
    name = chip_name(x.device)
    if a2_only:
        return [f"{what} is documented for Atlas A2/A3 only, this chip is {name}"]
    if x.dtype == torch.bfloat16:
        return [f"{what}: bfloat16 needs an Atlas A2/A3 chip (Ascend910B/910_93), this chip is {name}"]
    return []


def dtype_reasons(what: str, tensors: list[Tensor]) -> list[str]:
    return [
        f"{what} dtype {t.dtype} is not supported by torch_npu's fused op (float16, bfloat16, float32)"
        for t in tensors
        if t.dtype not in FUSED_DTYPES
    ]
