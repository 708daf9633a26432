"""What the NPU adapters share: the dtypes torch_npu's fused ops take, the chips each op's shipped
documentation lists, and the reason format.

Every chip rule below is from the op's block in ``torch_npu/_op_plugin_docs.py`` as shipped in the
torch_npu wheels 2.5.1.post1 .. 2.14.0 (one per minor release; the "支持的型号" = supported products
section, or the per-product dtype lines where a block has no such section). The blocks are
extracted by ``tools/torch_npu_schemas.py``; ``docs/ascend_npu.md`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_npu

Tensor = torch.Tensor

#: Dtypes the fused ops take (bfloat16 only on the chips :data:`CHIP_RULES` lists for it).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Chip series by ``torch_npu.npu.get_device_name()`` prefix: "A2" = Atlas A2 training series and
#: Atlas 800I A2 inference ("Ascend910B1".."Ascend910B4"); "A3" = Atlas A3 ("Ascend910_93xx");
#: "inference" = Atlas inference series ("Ascend310P*"); "training" = the Atlas training series
#: before A2 ("Ascend910A", "Ascend910ProB", "Ascend910PremiumA", ...).
SERIES_PREFIXES = (("A3", "Ascend910_93"), ("A2", "Ascend910B"), ("inference", "Ascend310P"), ("training", "Ascend910"))


@dataclass(frozen=True)
class ChipRule:
    """The chips one torch_npu op is documented for (``None``: the block names no product list)."""

    chips: frozenset[str] | None
    bfloat16_chips: frozenset[str]
    source: str


_A2 = frozenset({"A2"})

#: Per torch_npu op, as its shipped doc block lists it. A3 is named only where a block names it
#: (``npu_fused_infer_attention_score``'s dtype lines, and ``npu_fusion_attention_v2``, which we do
#: not call): no other block we use lists A3, so those ops are not used there.
CHIP_RULES = {
    "npu_fusion_attention": ChipRule(_A2, _A2, "npu_fusion_attention, 支持的型号: Atlas A2 训练系列产品 (2.5.1-2.14.0)"),
    "npu_fusion_attention_v3": ChipRule(_A2, _A2, "npu_fusion_attention_v3, 支持的型号: Atlas A2 训练系列产品 (2.7.1-2.14.0)"),
    "npu_fused_infer_attention_score": ChipRule(
        frozenset({"A2", "A3"}), frozenset({"A2", "A3"}),
        "npu_fused_infer_attention_score, query/key/value dtype lines: Atlas A2 训练系列产品/Atlas 800I A2 推理产品, "
        "Atlas A3 训练系列产品 (2.5.1-2.14.0)",
    ),
    "npu_geglu": ChipRule(None, _A2, "npu_geglu, self: BFLOAT16(Atlas A2 训练系列产品支持); no product list (2.5.1-2.14.0)"),
    "npu_group_norm_silu": ChipRule(
        frozenset({"A2", "inference"}), _A2,
        "npu_group_norm_silu, 支持的型号: Atlas A2 训练系列产品/Atlas 800I A2 推理产品, Atlas 推理系列产品; "
        "bfloat16 for A2 only (2.5.1-2.14.0)",
    ),
    "npu_group_norm_swish": ChipRule(_A2, _A2, "npu_group_norm_swish, 支持的型号: Atlas A2训练系列产品/Atlas 800I A2推理产品 (2.5.1-2.14.0)"),
}

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


def chip_series(name: str) -> str | None:
    """The series of a device name (:data:`SERIES_PREFIXES`); None for an unknown or empty name."""
    return next((series for series, prefix in SERIES_PREFIXES if name.startswith(prefix)), None)


def reset_chip_cache() -> None:
    _chip_names.clear()


def chip_reasons(op: str, x: Tensor) -> list[str]:
    """Why this chip cannot run torch_npu's ``op`` on ``x`` by the op's documented chip list
    (:data:`CHIP_RULES`). A chip whose name torch_npu cannot give, or that no series matches, gets
    the benefit of the doubt (meta tensors, a report without the device)."""
    if x.device.type == "meta":
        return []
    name = chip_name(x.device)
    series = chip_series(name)
    if series is None:
        return []
    rule = CHIP_RULES[op]
    if rule.chips is not None and series not in rule.chips:
        return [f"{op} is not documented for {name} ({rule.source})"]
    if x.dtype == torch.bfloat16 and series not in rule.bfloat16_chips:
        return [f"{op}: bfloat16 is not documented for {name} ({rule.source})"]
    return []


def dtype_reasons(what: str, tensors: list[Tensor]) -> list[str]:
    return [
        f"{what} dtype {t.dtype} is not supported by torch_npu's fused op (float16, bfloat16, float32)"
        for t in tensors
        if t.dtype not in FUSED_DTYPES
    ]
