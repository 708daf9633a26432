"""What fits where: the planned peak of an SDXL LoRA step at 1024 px, batch 1, and the devices it fits.

    python -m benchmarks.what_fits_where                 # every row (each plan traces SDXL: about a minute)
    python -m benchmarks.what_fits_where --precision bf16

Rows: the diffusers recipe (stock modules, ``--kernels off``) and ours (default, ``--recompute geglu_projection``,
with gradient checkpointing, with latent and text-embedding caching), in fp32 / fp16 / bf16, with the recipe's
fp16-fix VAE. The plans are ``trainer.memory_plan.make_plan`` for a CUDA device (the allocator slack included),
traced where this runs: on a CPU-only machine with the CPU's autocast rules, which keep normalisations in the
autocast dtype where CUDA's run them in fp32 (fp16/bf16 rows may read somewhat low for a GPU).
"""
from __future__ import annotations

import argparse
import sys

from trainer import memory_plan, sdxl_configs
from trainer.args import parse_args

DEVICES_GIB = (12, 16, 24, 32, 64)
RECIPE = ["--pretrained_model_name_or_path", sdxl_configs.SDXL_BASE, "--vae_name", sdxl_configs.SDXL_VAE_FP16_FIX,
          "--dataset_name", "embedded", "--resolution", "1024", "--train_batch_size", "1"]  # fmt: skip
ROWS: tuple[tuple[str, list[str]], ...] = (
    ("stock (--kernels off)", ["--kernels", "off"]),
    ("stock + gradient checkpointing", ["--kernels", "off", "--gradient_checkpointing"]),
    ("ours (default)", []),
    ("ours + --recompute geglu_projection", ["--recompute", "geglu_projection"]),
    ("ours + gradient checkpointing", ["--gradient_checkpointing"]),
    ("ours + caching (latents, text)", ["--cache_latents", "--cache_text_embeddings"]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", action="append", choices=["fp32", "fp16", "bf16"], help="default: all three")
    options = parser.parse_args(argv)
    print("| precision | configuration | planned peak | fits on |")
    print("|---|---|---|---|")
    for precision in options.precision or ["fp32", "fp16", "bf16"]:
        mixed = {"fp32": "no"}.get(precision, precision)
        for name, flags in ROWS:
            plan = memory_plan.make_plan(parse_args(RECIPE + ["--mixed_precision", mixed, *flags]), "cuda")
            fits = [f"{size} GB" for size in DEVICES_GIB if plan.total <= size * 2**30]
            print(f"| {precision} | {name} | {plan.total / 2**30:.1f} GiB | {', '.join(fits) or 'none of these'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
