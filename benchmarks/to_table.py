"""Turn a pytest-benchmark JSON file into the README's Markdown tables, with ratio columns.

    python -m benchmarks.to_table bench.json [more.json ...]

Ratios compare each implementation with the baseline of the same group (same op, shape, dtype and
mode; or same UNet/trainer configuration) measured in the same run: the ``stock`` (or
``default_flags``) implementation, or else the eager ``torch`` one (what the GPU benchmarks of
``test_bench_triton_gpu.py`` call the stock maths). The GPU benchmarks also give the GPU time
alone, from CUDA-graph replays, and its ratio; their rates come from it. ``% of copy BW`` is the achieved bandwidth of a
memory-bound op against the device's measured copy bandwidth, where the benchmark recorded it.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def _time(seconds: float) -> str:
    """Milliseconds, or microseconds below one millisecond (GPU kernels)."""
    return f"{seconds * 1e3:,.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


def _baseline(rows: list[dict]) -> dict | None:
    """The group's reference row: ``stock`` / ``default_flags``, else the eager ``torch`` impl."""
    for impls in (("stock", "default_flags"), ("torch",)):
        row = next((r for r in rows if r["extra_info"].get("impl") in impls), None)
        if row is not None:
            return row
    return None


def _gpus(data: dict) -> str:
    """``GPU: name, measured copy bandwidth N GB/s.`` for the GPU benchmarks; empty otherwise."""
    seen: dict[str, float | None] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("gpu"):
            seen.setdefault(info["gpu"], info.get("copy_GB_per_s"))
    parts = [f"{name}" + (f", measured copy bandwidth {bw:,.0f} GB/s" if bw else "") for name, bw in seen.items()]
    return f" GPU: {'; '.join(parts)}." if parts else ""


def render(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    lines = [f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; "
             f"{data.get('datetime', '')[:10]}; median of the rounds.{_gpus(data)}", ""]
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)

    lines += ["| benchmark | impl | median | ratio vs stock/torch (speed) | GPU time (CUDA graph) | ratio (graph) | images/s or GB/s or TFLOP/s | % of copy BW | saved for backward (MiB) | ratio | peak above weights (MiB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in sorted(groups):
        rows = groups[group]
        base = _baseline(rows)
        for row in sorted(rows, key=lambda r: r is not base):
            info = row["extra_info"]
            median = row["stats"]["median"]
            speed = base["stats"]["median"] / median if base else None
            if base and info.get("images_per_s") and base["extra_info"].get("images_per_s"):
                # The trainer's own steady-state images/s, not the whole run (loading, caching).
                speed = info["images_per_s"] / base["extra_info"]["images_per_s"]
            saved = info.get("saved_bytes")
            saved_ratio = saved / base["extra_info"]["saved_bytes"] if base and saved and base["extra_info"].get("saved_bytes") else None
            rate = info.get("images_per_s") or info.get("GB_per_s") or info.get("TFLOP_per_s")
            graph = info.get("graph_s_per_call")
            base_graph = base["extra_info"].get("graph_s_per_call") if base else None
            graph_speed = base_graph / graph if graph and base_graph else None
            lines.append(
                f"| {group} | {info.get('impl')} | {_time(median)} | {_fmt(speed, '.2f') + 'x' if speed else ''} | "
                f"{_time(graph) if graph else ''} | {_fmt(graph_speed, '.2f') + 'x' if graph_speed else ''} | {_fmt(rate)} | "
                f"{_fmt(info.get('pct_of_copy_bw'), '.0f')} | "
                f"{_mib(saved)} | {_fmt(saved_ratio, '.2f')} | {_mib(info.get('peak_above_weights_bytes'))} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_files", nargs="+", help="several files (runs on one machine) are merged")
    args = parser.parse_args()
    runs = []
    for path in args.json_files:
        with open(path) as f:
            runs.append(json.load(f))
    merged = dict(runs[0], benchmarks=[bench for run in runs for bench in run["benchmarks"]])
    print(render(merged))


if __name__ == "__main__":
    main()
