"""``python -m npu_kernels``: versions, devices, and which backend serves each op where."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from npu_kernels import backends, versions
from npu_kernels.report import survey


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        devices += [f"npu:{i}" for i in range(npu.device_count())]
    return devices


def main() -> None:
    print(f"npu_kernels {_version('npu-kernels')}  python {platform.python_version()}")
    print("\n".join(versions.report_lines()))  # the tested dependencies, with a warning outside their range
    for dist in ("triton", "torch_npu"):
        print(f"  {dist:<12} {_version(dist)}")
    for name in backends.BACKENDS:
        error = backends.load_error(name)
        print(f"  backend {name:<7} {'loads' if error is None else 'unavailable: ' + error}")
    forced = backends.forced_backend()
    print(f"  selection: {forced}" + ("" if forced != "auto" else f" (set {backends.ENV_VAR}=torch|triton|npu to force one)"))
    compiled = backends.forced_compiled()
    print(f"  under torch.compile: {compiled}" + ("" if compiled != "auto" else
          f" (compiled: custom_op = our op, opaque to inductor; decompose = plain PyTorch maths inductor fuses;"
          f" set {backends.COMPILED_ENV_VAR}=custom_op|decompose to force one)"))
    print("devices seen: " + ", ".join(_devices()))
    seen = " ".join(_devices())
    for device_type in ("cpu", "cuda", "npu"):
        absent = "" if device_type in seen else " (no such device here: what auto would pick on one)"
        for dtype in (torch.float32, torch.bfloat16):
            print(f"\n{device_type} {str(dtype).replace('torch.', '')}{absent}:")
            for op, (backend, candidates) in survey(device_type, dtype).items():
                notes = "; ".join(
                    f"{name}: {'unavailable' if reasons[0].startswith('cannot load') else ', '.join(reasons)}"
                    for name, reasons in candidates.items()
                    if reasons
                )
                compiled = backends.compiled_choice(op, device_type, backend)
                print(f"  {op:<16} -> {backend:<8}  compiled: {compiled:<9}" + (f"  ({notes})" if notes else ""))


if __name__ == "__main__":
    main()
