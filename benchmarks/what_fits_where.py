"""What fits where: the planned peak of an SDXL LoRA step at 1024 px, batch 1, and the devices it fits.

    python -m benchmarks.what_fits_where                      # the Markdown table (every row, three precisions)
    python -m benchmarks.what_fits_where --write README.md    # and rewrite the README's table between its markers
    python -m benchmarks.what_fits_where --precision bf16

Rows: the diffusers recipe (stock modules, ``--kernels off``), with and without gradient checkpointing, and
ours: default, each level of ``npu_kernels.RECOMPUTE_LEVELS`` (read when this runs), with gradient
checkpointing, with latent and text-embedding caching; columns fp32 / fp16 / bf16, with the recipe's
fp16-fix VAE. Each cell is ``trainer.memory_plan.make_plan`` for a CUDA device (the allocator slack
included), traced where this runs: on a CPU-only machine with the CPU's autocast rules, which keep
normalisations in the autocast dtype where CUDA's run them in fp32 (fp16/bf16 cells may read somewhat low for
a GPU). The work the rows share -- imports, SDXL's configs -- is done once; each cell is one traced step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer import memory_plan, sdxl_configs
from trainer.args import parse_args

DEVICES_GB = (12, 16, 24, 32, 64)  # device memory in GiB (what "a 24 GB card" holds)
PRECISIONS = ("fp32", "fp16", "bf16")
RECIPE = ["--pretrained_model_name_or_path", sdxl_configs.SDXL_BASE, "--vae_name", sdxl_configs.SDXL_VAE_FP16_FIX,
          "--dataset_name", "embedded", "--resolution", "1024", "--train_batch_size", "1"]  # fmt: skip
START, END = "<!-- what-fits-where:start -->", "<!-- what-fits-where:end -->"


def rows() -> list[tuple[str, list[str]]]:
    """(name, flags) of each configuration, the recompute levels as npu_kernels has them now."""
    import npu_kernels

    levels = [(f"ours, `--recompute {level}`", ["--recompute", level]) for level in npu_kernels.RECOMPUTE_LEVELS[1:]]
    return [
        ("stock (`--kernels off`)", ["--kernels", "off"]),
        ("stock + `--gradient_checkpointing`", ["--kernels", "off", "--gradient_checkpointing"]),
        ("ours (default)", []),
        *levels,
        ("ours + `--gradient_checkpointing`", ["--gradient_checkpointing"]),
        ("ours + `--cache_latents --cache_text_embeddings`", ["--cache_latents", "--cache_text_embeddings"]),
    ]


def smallest_fitting(total: int) -> str:
    """The smallest of :data:`DEVICES_GB` that holds ``total`` bytes (the larger ones do too)."""
    fitting = [size for size in DEVICES_GB if total <= size * 2**30]
    return f"{fitting[0]} GB and up" if fitting else f"none up to {DEVICES_GB[-1]} GB"


def table(precisions: tuple[str, ...], log=print) -> str:
    """The Markdown table: one row per configuration, one column per precision (each line logged as it is made)."""
    configs = None
    lines = [f"| SDXL LoRA, 1024 px, batch 1 | {' | '.join(precisions)} |", "|---|" + "---|" * len(precisions)]
    for line in lines:
        log(line)
    for name, flags in rows():
        cells = []
        for precision in precisions:
            args = parse_args(RECIPE + ["--mixed_precision", {"fp32": "no"}.get(precision, precision), *flags])
            configs = configs or memory_plan.model_configs(args)
            plan = memory_plan.make_plan(args, "cuda", configs)
            log(f"{name}, {precision}: {memory_plan.format_bytes(plan.total)} (planned in {plan.seconds:.0f} s)")
            cells.append(f"{plan.total / 2**30:.1f} GiB: {smallest_fitting(plan.total)}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
        log(lines[-1])
    return "\n".join(lines)


def rewrite_between_markers(path: Path, text: str) -> None:
    """Replace what lies between :data:`START` and :data:`END` in ``path`` by ``text``."""
    content = path.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"error: {path} has no {START} ... {END} lines to rewrite")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", action="append", choices=PRECISIONS, help="default: all three")
    parser.add_argument("--write", type=Path, default=None, help="a Markdown file whose marked table to rewrite (README.md)")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    result = table(tuple(options.precision or PRECISIONS), log=lambda line: print(line, file=sys.stderr, flush=True))
    print(result)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if options.write is not None:
        rewrite_between_markers(options.write, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
