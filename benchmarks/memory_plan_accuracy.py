"""The memory plan's accuracy: planned vs measured peak memory of one training step, per configuration.

    python -m benchmarks.memory_plan_accuracy                       # CPU: the embedded pipeline at 512 px
    python -m benchmarks.memory_plan_accuracy --device cuda --resolution 1024   # a GPU (benchmarks/gpu_check.sh)
    python -m benchmarks.memory_plan_accuracy --device cuda --model sdxl --resolution 1024 --batch 1

Planned: ``trainer.memory_plan.make_plan`` (one step on fake tensors under MemTracker), without the allocator
slack, i.e. the peak of allocated memory. Measured: the same step (``trainer.memory_plan.run_step``) on real
random-init models of the same configs, after one warm-up step:

* CUDA: ``torch.cuda.max_memory_allocated`` over the step (and ``max_memory_reserved``, which the slack covers);
* CPU, which has no allocator peak counter: MemTracker following the real tensors (exact bytes of live
  storages: it checks what the fake trace predicts, fake kernels and layouts against real ones); as checks
  independent of MemTracker, what one more step adds above what was held before it: at PyTorch's allocator
  (``torch.profiler``'s memory events), and to the process's memory: its peak RSS (VmHWM)
  above the RSS before it (free lists trimmed first), against the plan's activations, temporaries and
  live gradients (it also holds oneDNN's scratch and the allocator's own memory).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from benchmarks.memory import peak_memory
from trainer import memory_plan, preflight, sdxl_configs
from trainer.args import parse_args

#: (name, flags) of the configurations checked, on top of the embedded pipeline at --resolution.
CONFIGURATIONS: tuple[tuple[str, list[str]], ...] = (
    ("fp32, kernels off (stock)", ["--kernels", "off"]),
    ("fp32, kernels on", ["--kernels", "on"]),
    ("bf16, kernels on, gradient checkpointing", ["--mixed_precision", "bf16", "--gradient_checkpointing"]),
    ("fp32, recompute geglu_projection, cached latents and text", ["--recompute", "geglu_projection", "--cache_latents", "--cache_text_embeddings"]),
)


SDXL = ["--pretrained_model_name_or_path", sdxl_configs.SDXL_BASE, "--vae_name", sdxl_configs.SDXL_VAE_FP16_FIX, "--dataset_name", "embedded"]


STEP_ITEMS = ("activations", "LoRA gradients")


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Planned and measured peak (bytes) of one step of ``args`` on ``device``."""
    planned = memory_plan.make_plan(args, device.type)
    configs = memory_plan.model_configs(args)
    mixed_precision, _ = preflight.effective_mixed_precision(args.mixed_precision)
    result: dict[str, Any] = {"planned": planned.tracked_peak, "planned_with_slack": planned.total, "plan_seconds": planned.seconds}
    # The real step runs the backends ``auto`` picks (Triton on CUDA), which the plan assumes keep what the
    # PyTorch backend keeps.
    if device.type == "cuda":
        prepared = memory_plan.prepare_step(args, configs, device, mixed_precision)
        memory_plan.run_step(args, prepared)  # warm-up: kernels, workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory_plan.run_step(args, prepared)
        torch.cuda.synchronize()
        result["measured"] = torch.cuda.max_memory_allocated()
        result["reserved"] = torch.cuda.max_memory_reserved()
    else:
        prepared = memory_plan.prepare_step(args, configs, device, mixed_precision)
        memory_plan.run_step(args, prepared)  # warm-up
        result["measured"] = memory_plan.tracked_step_peak(args, prepared)["Total"]
        # What the step adds to what is resident before it: planned (activations, temporaries, gradients
        # live at the peak) vs the peak RSS of a second step above the RSS before it.
        result["planned_step"] = sum(value for name, value in planned.items if name.startswith(STEP_ITEMS))
        with peak_memory(device) as rss:
            memory_plan.run_step(args, prepared)
        result["rss_step"] = rss["peak"] - rss["baseline"]
        result["allocator_step"] = allocator_step_peak(args, prepared)
    return result


def allocator_step_peak(args: argparse.Namespace, prepared: memory_plan.PreparedStep) -> int:
    """Peak bytes held through PyTorch's CPU allocator during one step, above what was held when it began:
    ``torch.profiler``'s memory events (every allocation and free), independent of MemTracker."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        memory_plan.run_step(args, prepared)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name.lower() == "cpu")  # fmt: skip
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    parser.add_argument("--model", choices=["embedded", "sdxl"], default="embedded",
                        help="sdxl: SDXL base's architecture (random weights) with the fp16-fix VAE, bf16 rows only")  # fmt: skip
    options = parser.parse_args(argv)
    device = torch.device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    mib = 2**20
    print(f"| configuration ({options.resolution} px, batch {options.batch}, {options.model}, {device.type}) | planned | measured | error |"
          + (" step: planned | step: allocator peak (profiler) | error | step: peak RSS above the RSS before it |" if device.type == "cpu"
             else " max reserved | planned with slack |"))
    print("|---|---|---|---|" + ("---|---|---|---|" if device.type == "cpu" else "---|---|"))
    worst = 0.0
    for name, flags in CONFIGURATIONS:
        if options.only and options.only not in name:
            continue
        if options.model == "sdxl" and "bf16" not in name:
            continue  # fp32 SDXL rows add nothing a GPU check has time for
        args = parse_args(["--resolution", str(options.resolution), "--train_batch_size", str(options.batch), *flags]
                          + (SDXL if options.model == "sdxl" else []))  # fmt: skip
        r = measure(args, device)
        error = r["planned"] / r["measured"] - 1
        worst = max(worst, abs(error))
        extra = (f" {r['planned_step'] / mib:.1f} MiB | {r['allocator_step'] / mib:.1f} MiB | {r['planned_step'] / r['allocator_step'] - 1:+.1%} |"
                 f" {r['rss_step'] / mib:.1f} MiB |" if device.type == "cpu"
                 else f" {r['reserved'] / mib:.1f} MiB | {r['planned_with_slack'] / mib:.1f} MiB |")  # fmt: skip
        print(f"| {name} | {r['planned'] / mib:.1f} MiB | {r['measured'] / mib:.1f} MiB | {error:+.1%} |{extra}", flush=True)
    print(f"largest error {worst:.1%}")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
