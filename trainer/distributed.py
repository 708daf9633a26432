"""One device or many: launch-environment fixes, per-device setup and cross-process agreement.

``accelerate launch`` and ``torchrun`` both start one process per device and export ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; accelerate then uses NCCL on CUDA, HCCL on Ascend NPU and gloo on CPU.
On a machine without an accelerator accelerate needs ``ACCELERATE_USE_CPU`` to pick gloo; without it
every process silently trains alone (``devices: 1``, all writing the same output directory), so
:func:`prepare_launch_environment` sets it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 for a plain ``python -m``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def accelerator_available() -> bool:
    """A device accelerate would run DDP on (CUDA/ROCm, Ascend NPU, Intel XPU, MLU, MUSA, HPU)."""
    if torch.cuda.is_available():
        return True
    import accelerate.utils as utils

    for name in ("is_npu_available", "is_xpu_available", "is_mlu_available", "is_musa_available", "is_hpu_available"):
        check = getattr(utils, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 - a broken vendor stack means "not available" here
            continue
    return False


def prepare_launch_environment() -> bool:
    """Before the ``Accelerator`` exists: multi-process on a CPU-only machine means gloo on CPU.

    Returns True when ``ACCELERATE_USE_CPU`` was set here.
    """
    if launched_world_size() <= 1 or "ACCELERATE_USE_CPU" in os.environ or accelerator_available():
        return False
    os.environ["ACCELERATE_USE_CPU"] = "true"
    logger.info("Several processes and no accelerator: distributed training on CPU over gloo.")
    return True


def configure_device(device: torch.device) -> None:
    """Per-device training settings: on Ascend NPU, ND tensor formats (Ascend's training advice)."""
    if device.type == "npu":
        # Imported here: the NPU adapters import torch_npu, which exists only on Ascend machines.
        from npu_kernels.backends.npu import configure_npu_for_training

        configure_npu_for_training()
        logger.info("NPU: configure_npu_for_training() (allow_internal_format=False).")


def allow_reduced_precision_matmul(device_type: str) -> list[str]:
    """``--allow_tf32``: TF32 matmuls on CUDA, their NPU counterpart HF32 (matmul and conv) on Ascend.

    Returns the switches it turned on; an empty list (and one warning line) where the flag can have no
    effect (CPU and other devices: no such mode).
    """
    switched: list[str] = []
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers (cuDNN convolutions allow TF32 by default)
        switched = ["torch.backends.cuda.matmul.allow_tf32"]
    elif device_type == "npu":
        npu = getattr(torch, "npu", None)  # torch_npu's module; HF32 switches as documented by torch_npu
        for part in ("matmul", "conv"):
            switch = getattr(npu, part, None)
            if switch is not None and hasattr(switch, "allow_hf32"):
                switch.allow_hf32 = True
                switched.append(f"torch.npu.{part}.allow_hf32")
    if not switched:
        logger.warning(f"--allow_tf32 has no effect on {device_type}: TF32 (CUDA) / HF32 (Ascend NPU) only exist there.")
    else:
        logger.info(f"--allow_tf32: {', '.join(switched)} = True")
    return switched


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (one tiny all-gather when distributed).

    Used for stop requests: every rank must leave the loop after the same step or the next collective
    would hang.
    """
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=accelerator.device, dtype=torch.int32)
    return bool(accelerator.gather(value).max().item())


def broadcast_int(accelerator: Any, value: int) -> int:
    """The main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return int(box[0])


def parameters_digest(parameters: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the parameters' values (order as given): equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for tensor in parameters:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_digests(accelerator: Any, digest: str) -> list[str]:
    """Every process's digest, in rank order."""
    if accelerator.num_processes == 1:
        return [digest]
    from accelerate.utils import gather_object

    return list(gather_object([digest]))
