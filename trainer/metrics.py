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


@dataclass
class TrainingHistory:
    records: list[StepRecord] = field(default_factory=list)
    stopped_early: bool = False  # a SIGINT/SIGTERM ended the loop before max_train_steps
    last_checkpoint_step: int = 0  # step of the newest checkpoint holding this run's state

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
    backends: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary (written to ``summary.json`` and printed)."""
    losses = history.losses
    summary: dict[str, Any] = {
        "steps": len(history.records),
        "global_batch": global_batch,
        "num_devices": num_devices,
        **history.throughput(),
        "final_train_loss": losses[-1] if losses else float("nan"),
        "mean_train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "peak_memory_bytes_per_device": peak_memory,
        "peak_memory_kind": memory_kind,
        "backends": backends,
        "loss_history": losses,
    }
    summary.update(extra or {})
    return summary


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    from trainer.atomic import write_text_atomically

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
        "backends: " + ", ".join(f"{op}={backend}" for op, backend in summary["backends"].items()),
    ]
    if summary.get("interrupted"):
        lines.append(
            f"interrupted by {summary['interrupted']} after step {summary.get('last_step')}: saved"
            f" {summary.get('last_checkpoint')} and the LoRA weights; continue with --resume_from_checkpoint latest"
        )
    lines += [
        f"Final Performance images/sec : {summary['fps']:.2f}",
        f"Final Train Loss : {summary['final_train_loss']:.6f}",
    ]
    return "\n".join(lines)


def plot_loss_curve(losses: list[float], path: str | os.PathLike, title: str = "SDXL LoRA training loss") -> Path:
    """PNG of the per-step loss and its running mean (the raw curve is noisy: random timesteps)."""
    import matplotlib

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

