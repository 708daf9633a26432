"""``--compile``: the UNet under ``torch.compile`` (graph mode), with static shapes and its compile time.

The UNet is compiled whole, after ``npu_kernels.optimize()`` and ``accelerator.prepare`` (so a DDP
wrapper is compiled with it, as torch recommends), with ``fullgraph=True`` and ``dynamic=False``: one
graph for forward and one for backward, specialised to the run's one input shape. Whatever would change
that shape mid-run is excluded before training starts:

* a partial last batch: the dataloader drops it (``drop_last``) and a warning says how many samples
  each epoch leaves out;
* validation images: the pipeline runs the original (uncompiled) UNet, which the compiled module wraps
  and shares its weights with (``models.Unwrapper`` returns it), so validation never retraces.

With ``--enable_bucket`` (:mod:`trainer.buckets`) each bucket is one input shape: the first step of each
bucket compiles its graphs, later steps reuse them (every batch is full, so no other shape appears), and
dynamo's recompile limit is raised to the number of buckets so that none falls back to eager.

Modes (``--compile_mode``): ``default`` (inductor), ``reduce-overhead`` (inductor + CUDA graphs: the
compiled step is replayed as one graph launch; CUDA only) and ``max-autotune-no-cudagraphs``. Where a
mode cannot work the run stops before training with one line (:func:`check_flags`): reduce-overhead off
CUDA; on an Ascend NPU ``torch.compile`` needs torchair's backend (``torchair.get_npu_backend()``), and
inductor's modes do not apply to it.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
from typing import Any, Sequence

import torch

from trainer.buckets import BucketGrid
from trainer.errors import InputError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_MODE = "default"
COMPILE_BACKENDS = ("inductor", "aot_eager")
DEFAULT_COMPILE_BACKEND = "inductor"


def check_flags(args: argparse.Namespace, device_type: str) -> None:
    """One-line errors for ``--compile`` / ``--compile_mode`` combinations that cannot work on ``device_type``.

    ``--compile_mode`` without ``--compile`` is an error rather than ignored: a user who asked for a mode
    would otherwise believe the run is compiled.
    """
    mode = getattr(args, "compile_mode", None)
    backend = getattr(args, "compile_backend", None)
    if not getattr(args, "compile", False):
        for flag, value in (("--compile_mode", mode), ("--compile_backend", backend)):
            if value is not None:
                raise InputError(f"{flag} {value} has no effect without --compile; add --compile or drop {flag}")
        return
    mode = mode or DEFAULT_COMPILE_MODE
    backend = backend or DEFAULT_COMPILE_BACKEND
    if backend != "inductor" and mode != DEFAULT_COMPILE_MODE:
        raise InputError(f"--compile_mode {mode} is a mode of the inductor backend, not of --compile_backend {backend}")
    if mode == "reduce-overhead" and device_type != "cuda":
        raise InputError(
            f"--compile_mode reduce-overhead captures CUDA graphs and needs a CUDA GPU; this run trains on the {device_type}"
            " (use --compile_mode default)"
        )
    if device_type == "npu" and backend == "inductor":
        if importlib.util.find_spec("torchair") is None:
            raise InputError(
                "--compile on an Ascend NPU needs torchair (torch.compile's NPU backend, shipped with torch_npu/CANN);"
                " install it or train without --compile"
            )
        if mode != DEFAULT_COMPILE_MODE:
            raise InputError(f"--compile_mode {mode} is an inductor mode; on an Ascend NPU --compile uses torchair's backend: use --compile_mode default")


def compile_mode(args: argparse.Namespace) -> str | None:
    """The mode the run compiles with, or None when it does not compile."""
    if not getattr(args, "compile", False):
        return None
    return getattr(args, "compile_mode", None) or DEFAULT_COMPILE_MODE


def compile_backend(args: argparse.Namespace) -> str | None:
    """The torch.compile backend the run compiles with, or None when it does not compile."""
    if not getattr(args, "compile", False):
        return None
    return getattr(args, "compile_backend", None) or DEFAULT_COMPILE_BACKEND


def compile_unet(unet: torch.nn.Module, args: argparse.Namespace, device_type: str) -> torch.nn.Module:
    """``torch.compile(unet, fullgraph=True, dynamic=False, ...)`` as the flags ask (see :func:`check_flags`);
    the original stays reachable as ``_orig_mod``.

    Compilation itself happens lazily, in the first training step (its time is measured there, see
    :func:`compile_seconds`).
    """
    mode, backend = compile_mode(args), compile_backend(args)
    if getattr(args, "enable_bucket", False):
        allow_shapes(len(BucketGrid.from_args(args).sizes))
    logger.info(f"--compile: torch.compile(unet, backend={backend}, mode={mode}, fullgraph=True, dynamic=False)")
    if backend != "inductor":
        return torch.compile(unet, backend=backend, fullgraph=True, dynamic=False)
    if device_type == "npu":
        import torchair  # optional, NPU only; availability checked by check_flags

        npu_backend: Any = torchair.get_npu_backend()
        return torch.compile(unet, backend=npu_backend, fullgraph=True, dynamic=False)
    return torch.compile(unet, mode=None if mode == DEFAULT_COMPILE_MODE else mode, fullgraph=True, dynamic=False)


def allow_shapes(count: int) -> None:
    """Let dynamo keep ``count`` graphs of the UNet (one per input shape) before it gives up compiling it."""
    config = torch._dynamo.config  # noqa: SLF001 - dynamo's documented knobs live there
    config.recompile_limit = max(config.recompile_limit, count)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, count)


def compiled_routes(device_type: str) -> dict[str, str]:
    """What the compiled UNet runs for each npu_kernels op (``npu_kernels.backends.compiled_choice``): our
    custom op (its kernel opaque to the compiler) or the plain PyTorch maths the compiler fuses itself."""
    from npu_kernels import backends, registry  # imports its kernels (seconds): only once training has started

    routes = {"custom_op": "custom op (compiled graph)", "decompose": "plain maths fused by the compiler"}
    return {op: routes.get(backends.compiled_choice(op, device_type), backends.compiled_choice(op, device_type)) for op in registry.backend_ops()}


def full_batches_only(num_samples: int, batch_size: int) -> int:
    """Samples per epoch a compiled run leaves out (the dataloader drops a partial last batch; logged).

    Per process: accelerate hands each process whole batches of the dataloader (and repeats early ones
    when their number does not divide by the process count), so full batches stay full.
    """
    if num_samples < batch_size:
        raise InputError(
            f"--compile needs at least one full batch: the dataset has {num_samples} samples, fewer than"
            f" --train_batch_size {batch_size}"
        )
    dropped = num_samples % batch_size
    if dropped:
        logger.warning(
            f"--compile: each epoch leaves out the last {dropped} of {num_samples} samples (a partial batch would"
            f" recompile the UNet for another shape); choose a --train_batch_size dividing {num_samples} to train on all"
        )
    return dropped


def compile_seconds(step_times: Sequence[float], warmup: int) -> float:
    """Time the first ``warmup`` steps spent beyond the steady step time: the compile (and graph capture) cost.

    ``step_times`` are the compute times of the optimizer steps (data loading excluded); the steady time
    is the median of the steps after ``warmup`` (after the first step when the run is shorter).
    """
    if not step_times:
        return 0.0
    steady_steps = step_times[warmup:] if len(step_times) > warmup else step_times[1:]
    steady = statistics.median(steady_steps) if steady_steps else 0.0
    return sum(max(0.0, t - steady) for t in step_times[:warmup])
