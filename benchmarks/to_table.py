"""Turn a pytest-benchmark JSON file into the README's Markdown tables, with ratio columns.

    python -m benchmarks.to_table bench.json

Ratios compare each implementation with the stock one of the same group (same op, shape, dtype and
mode; or same UNet/trainer configuration) measured in the same run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def render(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    lines = [f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; "
             f"{data.get('datetime', '')[:10]}; median of the rounds.", ""]
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)

    lines += ["| benchmark | impl | median | ratio vs stock (speed) | images/s or GB/s or TFLOP/s | saved for backward (MiB) | ratio | peak above weights (MiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for group in sorted(groups):
        rows = groups[group]
        stock = next((r for r in rows if r["extra_info"].get("impl") in ("stock", "default_flags")), None)
        for row in sorted(rows, key=lambda r: r["extra_info"].get("impl") != "stock"):
            info = row["extra_info"]
            median = row["stats"]["median"]
            speed = stock["stats"]["median"] / median if stock else None
            saved = info.get("saved_bytes")
            saved_ratio = saved / stock["extra_info"]["saved_bytes"] if stock and saved and stock["extra_info"].get("saved_bytes") else None
            rate = info.get("images_per_s") or info.get("GB_per_s") or info.get("TFLOP_per_s")
            lines.append(
                f"| {group} | {info.get('impl')} | {median * 1e3:,.1f} ms | {_fmt(speed, '.2f')}x | {_fmt(rate)} | "
                f"{_mib(saved)} | {_fmt(saved_ratio, '.2f')} | {_mib(info.get('peak_above_weights_bytes'))} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    args = parser.parse_args()
    with open(args.json_file) as f:
        print(render(json.load(f)))


if __name__ == "__main__":
    main()
