"""Throughput, loss and memory bookkeeping, and the end-of-run outputs built from them.

One :class:`StepRecord` per optimizer step. Throughput skips the first :data:`WARMUP_STEPS` steps
(allocator warm-up, kernel compilation and caches make them unrepresentative) and is reported twice:
over the whole step time, data loading included (what Ascend's scripts report as FPS), and over the
compute time alone (how fast the device trains when data loading keeps up).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.atomic import write_text_atomically
from trainer.buckets import describe as describe_buckets
from trainer.compiling import compile_seconds

WARMUP_STEPS = 5


@dataclass
class StepRecord:
    """One optimizer step: loss averaged over devices and accumulation micro-steps, timings in seconds."""

    step: int
    loss: float
    lr: float
    images: int  # images consumed by this step over all devices
    step_time: float  # wall time of the step, waiting for data included
    data_time: float  # part of step_time spent waiting for the dataloader
    skipped: bool = False  # the gradient scaler (fp16) skipped this step's update


@dataclass
class TrainingHistory:
    records: list[StepRecord] = field(default_factory=list)
    stopped_early: bool = False  # a SIGINT/SIGTERM ended the loop before max_train_steps
    last_checkpoint_step: int = 0  # step of the newest checkpoint holding this run's state
    skipped_steps: int = 0  # optimizer steps the gradient scaler (fp16) skipped, whatever the reason
    nonfinite_loss_steps: int = 0  # steps whose loss was NaN/inf (fp16: skipped; otherwise the run stopped)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    def throughput(self, warmup: int = WARMUP_STEPS) -> dict[str, Any]:
        """Images/s with and without data-loading time, over the steps after ``warmup``.

        With ``warmup`` or fewer steps in total, all steps are used and ``steps_measured`` says so.
        """
        measured = self.records[warmup:] if len(self.records) > warmup else self.records
        images = sum(r.images for r in measured)
        total = sum(r.step_time for r in measured)
        compute = sum(r.step_time - r.data_time for r in measured)
        return {
            "fps": images / total if total > 0 else float("nan"),
            "fps_without_data_loading": images / compute if compute > 0 else float("nan"),
            "steps_measured": len(measured),
            "images_measured": images,  # over all devices
            "seconds_measured": total,
            "warmup_steps_skipped": len(self.records) - len(measured),
            "data_loading_fraction": (total - compute) / total if total > 0 else float("nan"),
        }


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process on ``device`` and what was measured.

    Accelerators report their allocator's peak; on CPU the process's peak resident set size is the
    closest equivalent (it includes Python, libraries and data, so it over-states model memory).
    """
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    npu = getattr(torch, "npu", None)
    if device.type == "npu" and npu is not None:
        return int(npu.max_memory_allocated(device)), "npu_max_memory_allocated"
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return int(torch.xpu.max_memory_allocated(device)), "xpu_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host_peak_rss"


def build_summary(
    history: TrainingHistory,
    *,
    global_batch: int,
    num_devices: int,
    peak_memory: list[int],
    memory_kind: str,
    backends: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary (written to ``summary.json`` and printed)."""
    losses = history.losses
    finite = [loss for loss in losses if math.isfinite(loss)]  # fp16 may have skipped non-finite steps
    summary: dict[str, Any] = {
        "steps": len(history.records),
        "global_batch": global_batch,
        "num_devices": num_devices,
        **history.throughput(),
        "final_train_loss": finite[-1] if finite else float("nan"),
        "mean_train_loss": sum(finite) / len(finite) if finite else float("nan"),
        "skipped_steps": history.skipped_steps,
        "nonfinite_loss_steps": history.nonfinite_loss_steps,
        "peak_memory_bytes_per_device": peak_memory,
        "peak_memory_kind": memory_kind,
        "backends": backends,
        "loss_history": losses,
    }
    summary.update(extra or {})
    return summary


@dataclass
class RunFacts:
    """What the recipe knows at the end of a run besides the step history (see :func:`run_summary`)."""

    device: str
    mixed_precision: str
    num_devices: int
    global_batch: int
    peak_memory: list[int]
    memory_kind: str
    kernels: dict[str, Any]  # npu_kernels.optimize's report: modules swapped and left alone
    backends: dict[str, Any]  # op -> {backend: calls}, counted while training (or the stock modules)
    optimizer: str
    lora_weights: str
    validation_images: list[str]
    loss_curve: str | None
    tensorboard_dir: str | None
    bad_images: list[str]
    first_step: int
    last_step: int
    resumed_from: str | None
    interrupted: str | None
    last_checkpoint: str | None
    data_seed: int
    cache: dict[str, Any]
    lora_digest_per_rank: list[str]
    training_wall_time_s: float
    total_wall_time_s: float
    compile_mode: str | None = None  # --compile's mode, None for an eager run
    compile_backend: str | None = None  # --compile's backend, None for an eager run
    buckets: list[dict[str, int]] | None = None  # --enable_bucket: each bucket used (trainer.buckets), else None


def run_summary(args: Any, history: TrainingHistory, facts: RunFacts) -> dict[str, Any]:
    """The dictionary written to ``summary.json``: throughput and loss, what ran, and where the outputs are."""
    return build_summary(
        history,
        global_batch=facts.global_batch,
        num_devices=facts.num_devices,
        peak_memory=facts.peak_memory,
        memory_kind=facts.memory_kind,
        backends=facts.backends,
        extra={
            "device": facts.device,
            "mixed_precision": facts.mixed_precision,
            "kernels": facts.kernels,
            # Modules npu_kernels.optimize() did not swap (e.g. xformers / NPU attention processors).
            "kernels_left_alone": list(facts.kernels.get("skipped", [])),
            "optimizer": facts.optimizer,
            "embedded_pipeline": bool(args.embedded_model),  # the tiny test pipeline, not a real model
            "embedded_dataset": bool(args.embedded_dataset),
            "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
            "dataset": args.dataset_name or args.train_data_dir,
            "resolution": args.resolution,
            "learning_rate": args.learning_rate,  # after --scale_lr
            "prediction_type": getattr(args, "prediction_type", None),
            "allow_tf32": bool(getattr(args, "allow_tf32", False)),
            "lora_weights": facts.lora_weights,
            "validation_images": facts.validation_images,
            "loss_curve": facts.loss_curve,
            "tensorboard_dir": facts.tensorboard_dir,
            "torch_threads": torch.get_num_threads(),
            "bad_images_skipped": len(facts.bad_images),  # --on_bad_image skip: distinct rows, all devices
            "bad_images": facts.bad_images,
            "first_step": facts.first_step,
            "last_step": facts.last_step,
            "resumed_from": facts.resumed_from,
            "interrupted": facts.interrupted,  # the signal that stopped the run early, else None
            "last_checkpoint": facts.last_checkpoint,
            "data_seed": facts.data_seed,
            "cache": facts.cache,
            "lora_digest_per_rank": facts.lora_digest_per_rank,
            "training_wall_time_s": facts.training_wall_time_s,
            "total_wall_time_s": facts.total_wall_time_s,
            "buckets": facts.buckets,
            "compile_mode": facts.compile_mode,
            "compile_backend": facts.compile_backend,
            # The warm-up steps' compute time beyond the steady step time: compilation (and graph capture).
            # fps above excludes the warm-up steps, so it is the steady speed.
            "compile_seconds": (
                compile_seconds([r.step_time - r.data_time for r in history.records], WARMUP_STEPS)
                if facts.compile_mode is not None
                else None
            ),
        },
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    return write_text_atomically(Path(output_dir) / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines, ending with the two lines Ascend's test scripts grep for."""
    gib = [f"{b / 2**30:.2f}" for b in summary["peak_memory_bytes_per_device"]]
    lines = [
        "------------------ Final result ------------------",
        f"steps: {summary['steps']}  global batch: {summary['global_batch']}  devices: {summary['num_devices']}",
        f"images/s (all devices, after {summary['warmup_steps_skipped']} warm-up steps): "
        f"{summary['fps']:.3f} with data loading, {summary['fps_without_data_loading']:.3f} without",
        f"train loss: final {summary['final_train_loss']:.6f}, mean {summary['mean_train_loss']:.6f}",
        f"peak memory per device (GiB, {summary['peak_memory_kind']}): {', '.join(gib)}",
        "backends: " + format_backends(summary["backends"]),
    ]
    if summary.get("skipped_steps"):
        lines.append(
            f"skipped steps: {summary['skipped_steps']} (gradient scaler), {summary.get('nonfinite_loss_steps', 0)} of them"
            " with a non-finite loss"
        )
    if summary.get("embedded_pipeline"):
        lines.append(
            "model: the EMBEDDED TINY PIPELINE (a smoke test, not SDXL: random weights, "
            f"{summary.get('resolution')} px); train SDXL with --pretrained_model_name_or_path"
        )
    if summary.get("interrupted"):
        lines.append(
            f"interrupted by {summary['interrupted']} after step {summary.get('last_step')}: saved"
            f" {summary.get('last_checkpoint')} and the LoRA weights; continue with --resume_from_checkpoint latest"
        )
    lines += describe_buckets(summary.get("buckets") or [])
    if summary.get("compile_seconds") is not None:
        lines.append(f"Compile time sec : {summary['compile_seconds']:.2f}")
    lines += [
        f"Final Performance images/sec : {summary['fps']:.2f}",
        f"Final Train Loss : {summary['final_train_loss']:.6f}",
    ]
    return "\n".join(lines)


def format_backends(backends: dict[str, Any]) -> str:
    """``op=backend x calls`` per op, from :func:`backends_served` (or a plain op -> text mapping)."""
    parts = []
    for op, served in backends.items():
        if isinstance(served, dict):
            parts.append(f"{op}=" + "+".join(f"{name} x{calls}" for name, calls in served.items()))
        else:
            parts.append(f"{op}={served}")
    return ", ".join(parts)


def backends_served(selections: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{op: {backend: calls}}`` from ``npu_kernels.backends.count_selections()``'s counter."""
    served: dict[str, dict[str, int]] = {}
    for (op, backend), calls in sorted(selections.items()):
        served.setdefault(op, {})[backend] = calls
    return served


def plot_loss_curve(losses: list[float], path: str | os.PathLike, title: str = "SDXL LoRA training loss") -> Path:
    """PNG of the per-step loss and its running mean (the raw curve is noisy: random timesteps)."""
    import matplotlib  # heavy, and only needed once at the end of a run

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 10)
    smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, alpha=0.35, label="loss per step")
    axis.plot(steps, smoothed, label=f"running mean ({window} steps)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("MSE loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)

