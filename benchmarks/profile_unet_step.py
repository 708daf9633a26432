"""Where a LoRA step of the SDXL UNet spends its time: stock diffusers vs ``npu_kernels.optimize``.

    python -m benchmarks.profile_unet_step --precision bf16 --resolution 512 [--tiny] [--impl npu_kernels]
        [--compile-mode reduce-overhead]

Prints, per implementation, the step's wall time, the device time its kernels took (CUDA) and the
ops that cost the most host time -- the numbers that say whether a step is bound by the device
or by launching work onto it. With ``--compile-mode`` each implementation is also profiled compiled
(``torch.compile(unet, fullgraph=True, mode=...)``; reduce-overhead replays CUDA graphs).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import npu_kernels
from benchmarks.models import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, lora_training_step, unet_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet of the CI smoke run")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--impl", choices=("stock", "npu_kernels"), action="append",
                        help="profile only this implementation (repeatable; default both)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="also profile the compiled step in this torch.compile mode")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"), default="inductor",
                        help="aot_eager: graph capture only (a quick CPU rehearsal; modes are inductor's)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TINY_UNET_CONFIG if args.tiny else SDXL_UNET_CONFIG
    unet = build_lora_unet(config, device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    inputs = unet_inputs(config, 16 if args.tiny else args.resolution // 8, device)
    target = torch.randn_like(inputs["sample"])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    modes = ("eager",) + (("compiled",) if args.compile_mode else ())
    for impl, mode in [(impl, mode) for impl in args.impl or ("stock", "npu_kernels") for mode in modes]:
        npu_kernels.restore(unet)
        if impl == "npu_kernels":
            npu_kernels.optimize(unet)
        torch._dynamo.reset()
        model = unet
        if mode == "compiled" and args.compile_backend == "inductor":
            model = torch.compile(unet, fullgraph=True, mode=None if args.compile_mode == "default" else args.compile_mode)
        elif mode == "compiled":
            model = torch.compile(unet, fullgraph=True, backend=args.compile_backend)
        step = lora_training_step(model, inputs, target, optimizer, args.precision == "bf16", device)
        start = time.perf_counter()
        for _ in range(3):
            step()  # warm up: allocator, optimizer state, kernel and graph compilation, CUDA-graph recording
        warmup = time.perf_counter() - start
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        wall = sorted(times)[1]
        with profile(activities=activities) as prof:
            step()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
        label = f"{impl} {mode}" + (f" {args.compile_mode} ({args.compile_backend})" if mode == "compiled" else "")
        print(f"\n== {label} ({args.precision}, {'tiny' if args.tiny else args.resolution}): "
              f"step {wall * 1e3:.1f} ms wall (median of 3; warm-up {warmup:.1f} s)"
              + (f", kernels {device_us / 1e3:.1f} ms on the GPU: wall/GPU {wall * 1e3 / (device_us / 1e3):.2f}x" if device_us else ""))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
