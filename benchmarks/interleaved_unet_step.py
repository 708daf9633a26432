"""Stock vs ``optimize()`` on one LoRA UNet step, in interleaved blocks: for a noisy machine.

``test_bench_unet_step.py`` times stock, then ours; on a shared 2-core CPU the load can change in
between. Here blocks of steps alternate (stock, ours, ours without the frozen-layer swap, stock, ...)
on one model, and the medians of all steps are compared::

    python -m benchmarks.interleaved_unet_step --precision fp32 --blocks 10
    python -m benchmarks.interleaved_unet_step --precision bf16 --size full   # SDXL structure (slow on a CPU)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import npu_kernels
from benchmarks.models import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, lora_training_step, unet_inputs

VARIANTS = {
    "stock": None,
    "optimize()": {},
    "optimize(frozen_weights=False)": {"frozen_weights": False},
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per variant")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block (after 2 untimed)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SDXL_UNET_CONFIG if args.size == "full" else TINY_UNET_CONFIG
    unet = build_lora_unet(config, device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    inputs = unet_inputs(config, 64 if args.size == "full" else 16, device)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    target = torch.randn_like(inputs["sample"], dtype=torch.float32)

    step = lora_training_step(unet, inputs, target, optimizer, args.precision == "bf16", device)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.blocks):
        for name, options in VARIANTS.items():
            npu_kernels.restore(unet)
            if options is not None:
                npu_kernels.optimize(unet, **options)
            step()
            step()
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"LoRA UNet step, {args.size}, {args.precision}, {device.type}: median ms, speed vs stock")
    for name, median in medians.items():
        print(f"  {name:32s} {median * 1e3:9.2f}  {medians['stock'] / median:.3f}x")
    return medians


if __name__ == "__main__":
    main()
