"""The time-memory curve of one LoRA step: our recompute levels against diffusers' gradient checkpointing.

One forward + backward + AdamW update of the launch-count benchmark's model (a UNet with SDXL's block
structure at narrow widths, PEFT LoRA r4 on to_q/to_k/to_v/to_out.0; ``--size tiny``: the CI UNet), with
every configuration a user can pick measured side by side in one run:

* ``stock``: diffusers + PEFT as they are; ``stock+ckpt``: with ``unet.enable_gradient_checkpointing()``
  (what diffusers' ``--gradient_checkpointing`` does);
* ``ours:<level>``: ``npu_kernels.optimize(unet, recompute=level)`` for every level of
  ``npu_kernels.RECOMPUTE_LEVELS`` (read when the run starts), and ``ours:<level>+ckpt`` with checkpointing too.

Per point:

* **activation memory**: the peak of the step's allocations above what was allocated when it began (the
  weights, the optimizer's states, the inputs). Counted at the allocator from ``torch.profiler``'s memory
  events (every allocation and free through PyTorch's allocator, a kernel's scratch buffers included), so it is
  exact and repeatable on a shared machine, and fair to checkpointing, which keeps little at the end of the
  forward but re-materialises each block during the backward. Also ``forward_end_bytes`` (what is still
  allocated when the backward starts) and ``saved_bytes`` (``benchmarks.memory.SavedTensorBytes``: what autograd's
  saved-tensor hooks see; under checkpointing only what is saved outside the checkpointed blocks, since the
  checkpoint keeps its blocks' inputs itself);
* **step time**: the median of interleaved rounds (each round runs every point once, starting one point later
  than the round before, so that load on the machine hits all alike), and its ratio to stock's;
* **LoRA gradients** of the first step, from the same weights and inputs: no further from a more exact run of
  the same weights (float64 for an fp32 step; fp32 for bf16: frozen weights bf16, autocast) than stock's own
  (``assert_as_accurate_as_stock``), and whether they equal stock's bit for bit. A point that fails stops the
  run: no point is fast because it is wrong.

The picture plots step time against activation memory, both as ratios to stock, with the straight line through
stock and stock+ckpt: a point below that line buys its memory saving for less time than checkpointing would.
Run (writes ``memory_curve.json`` and ``memory_curve.png`` into ``--out``)::

    python -m benchmarks.memory_curve --out benchmarks/results/cpu-YYYY-MM-DD

It also times the host-bound check: stock vs the default ``optimize()`` on the tiny UNet, where the step's cost
is the Python and dispatch overhead per op (``--host-rounds`` interleaved rounds in each of ``--host-processes``
fresh processes; the figure is the median of the processes' ratios: on a 2-core CPU one process's ratio moved by
up to 0.14 from the next one's, as each process lays out its memory anew, more than rounds within a process do). ``benchmarks/test_bench_memory_curve.py``
runs the same measurement as a pytest-benchmark smoke test.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import npu_kernels
from benchmarks.memory import SavedTensorBytes
from benchmarks.models import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_lora_unet, unet_inputs
from benchmarks.test_bench_launch_counts import NARROW_SDXL_UNET_CONFIG
from tests.reference import _relative_error, assert_as_accurate_as_stock, assert_close

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: size -> (UNet config, latent size): the launch-count benchmark's full and smoke models, and SDXL's own UNet.
SIZES = {"full": (NARROW_SDXL_UNET_CONFIG, 32), "tiny": (TINY_UNET_CONFIG, 16), "sdxl": (SDXL_UNET_CONFIG, 64)}
SIZE_NAMES = {"full": "SDXL-structure UNet (narrow widths, 256 px)", "tiny": "tiny UNet (128 px)",
              "sdxl": "full SDXL UNet (2.6 B parameters, random weights, 512 px)"}
#: Sizes whose gradients are judged without a more exact copy of the model (a float64 SDXL UNet is 21 GB).
NO_EXACT_COPY = ("sdxl",)
#: optimize()'s own default level: the host-bound check compares it with stock.
DEFAULT_LEVEL: str = inspect.signature(npu_kernels.optimize).parameters["recompute"].default
_BACKWARD = "memory_curve.backward"  # marks where the backward starts in the profile


# ----------------------------------------------------------------------------- the points of the curve
@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One configuration of the step: stock modules (``recompute`` None) or ``optimize(recompute=...)``,
    with or without diffusers' gradient checkpointing."""

    recompute: str | None
    checkpointing: bool = False

    @property
    def name(self) -> str:
        return ("stock" if self.recompute is None else f"ours:{self.recompute}") + ("+ckpt" if self.checkpointing else "")


def curve_points(levels: tuple[str, ...] | None = None, checkpointing: bool = True) -> list[CurvePoint]:
    """stock, stock+ckpt, then each recompute level (default: all of ``npu_kernels.RECOMPUTE_LEVELS``) without
    and with checkpointing; without ``checkpointing``, stock and the levels only."""
    levels = npu_kernels.RECOMPUTE_LEVELS if levels is None else levels
    plain = [CurvePoint(None), *(CurvePoint(level) for level in levels)]
    if not checkpointing:
        return plain
    return [plain[0], CurvePoint(None, True), *plain[1:], *(CurvePoint(level, True) for level in levels)]


def apply_point(unet: torch.nn.Module, point: CurvePoint) -> None:
    """Put ``unet`` in ``point``'s configuration (from any other: restore first)."""
    npu_kernels.restore(unet)
    if point.recompute is not None:
        npu_kernels.optimize(unet, recompute=point.recompute)
    if point.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class LoraStep:
    """The recipe's LoRA step on one UNet: MSE of the prediction to a fixed target, bf16 autocast in bf16."""

    unet: torch.nn.Module
    inputs: dict
    target: torch.Tensor
    bf16: bool
    device: torch.device
    default_vs_stock: float | None = None  # set by check_gradients without an exact copy

    def __post_init__(self) -> None:
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            prediction = self.unet(**self.inputs).sample
        return F.mse_loss(prediction.to(self.target.dtype), self.target)

    def step(self) -> None:
        loss = self.loss()
        with record_function(_BACKWARD):
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def lora_gradients(self) -> dict[str, torch.Tensor]:
        """The LoRA gradients of one forward + backward (no update), by parameter name."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        grads = {name: p.grad.detach().clone() for name, p in self.unet.named_parameters() if p.requires_grad}
        self.optimizer.zero_grad(set_to_none=True)
        return grads


def build_step(size: str, precision: str, device: torch.device) -> LoraStep:
    """The LoRA step of ``size`` (``full``: SDXL's block structure at narrow widths; ``tiny``; ``sdxl``: SDXL's
    own UNet at 512 px) in ``precision``."""
    config, latent = SIZES[size]
    torch.manual_seed(0)  # PEFT's gaussian LoRA init draws from the global generator
    unet = build_lora_unet(config, device, PRECISIONS[precision])
    with torch.no_grad():  # a LoRA some way into training: with PEFT's lora_B = 0, every lora_A gradient would be 0
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    inputs = unet_inputs(config, latent, device)
    target = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(2)).to(device)
    return LoraStep(unet, inputs, target, bf16=precision == "bf16", device=device)


# ----------------------------------------------------------------------------- correctness
def check_gradients(step: LoraStep, points: list[CurvePoint], exact_copy: bool = True) -> dict[str, str]:
    """Assert every point's LoRA gradients are right (see the module doc); per point, the verdict the table
    prints ("bitwise" when equal to stock's bit for bit). Runs from the step's current weights, before any update.

    With ``exact_copy`` each point is judged against a more exact run of the same weights (fp32 for a bf16 step,
    float64 for an fp32 one) by stock's own error there (``assert_as_accurate_as_stock``): two fp32 runs of a deep
    UNet that only sum in another order differ by their rounding, which an op-level tolerance against stock alone
    mistakes for an error on CPUs whose GEMMs sum in another order.

    Without it (a model too large to copy in float64), every point must give its family's gradients bit for bit:
    stock's for ``stock+ckpt``, the default level's for every level with or without checkpointing (the levels
    recompute with the forward's own kernels on the same operands), or, where a library rounds a narrower GEMM
    differently, agree with them per element within ``tests/reference.py``'s tolerance of the step's precision;
    the default's own accuracy is what the smaller models check. ``step.default_vs_stock`` records how far the
    default's gradients are from stock's (relative 2-norm of the difference, all LoRA gradients pooled).
    """
    apply_point(step.unet, CurvePoint(None))
    stock = step.lora_gradients()
    assert all(grad.abs().max() > 0 for grad in stock.values()), "a LoRA gradient is all zeros: nothing to compare"
    if not exact_copy:
        return _check_bitwise_families(step, points, stock)
    exact_dtype = torch.float32 if step.bf16 else torch.float64
    unet = copy.deepcopy(step.unet).to(exact_dtype)
    inputs = {key: value.to(exact_dtype) if torch.is_tensor(value) and value.is_floating_point() else value
              for key, value in step.inputs.items()}
    exact = LoraStep(unet, inputs, step.target.to(exact_dtype), bf16=False, device=step.device).lora_gradients()
    del unet
    verdicts = {}
    for point in points:
        apply_point(step.unet, point)
        grads = step.lora_gradients()
        assert_as_accurate_as_stock(grads, stock, exact)
        verdicts[point.name] = "bitwise" if _equal(grads, stock) else "as accurate as stock"
    return verdicts


def _equal(grads: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(grads[name], other[name]) for name in other)


def _check_bitwise_families(step: LoraStep, points: list[CurvePoint], stock: dict[str, torch.Tensor]) -> dict[str, str]:
    apply_point(step.unet, CurvePoint(DEFAULT_LEVEL))
    default = step.lora_gradients()
    names = list(stock)
    computed_in = torch.bfloat16 if step.bf16 else torch.float32
    pooled = lambda grads: torch.cat([grads[name].double().flatten() for name in names])  # noqa: E731
    step.default_vs_stock = _relative_error(pooled(default), pooled(stock))
    verdicts = {}
    for point in points:
        apply_point(step.unet, point)
        grads = step.lora_gradients()
        family, family_name = (stock, "stock") if point.recompute is None else (default, f"ours:{DEFAULT_LEVEL}")
        if _equal(grads, family):
            verdicts[point.name] = "bitwise" if family is stock or _equal(grads, stock) else f"bitwise = {family_name}"
            continue
        # A GPU library may pick another GEMM kernel for the narrower recompute (half_geglu_projection) and
        # round differently: then per element within the tolerance of the precision the step computes in.
        for name in names:
            assert_close(grads[name], family[name], computed_in, f"{point.name}: {name} vs {family_name}'s")
        verdicts[point.name] = f"within tolerance of {family_name}"
    return verdicts


# ----------------------------------------------------------------------------- memory
def _profiled_memory(fn: Callable[[], None], device: torch.device) -> dict[str, int]:
    """``fn``'s peak allocated bytes above its start, and what was allocated when the backward began."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type().name.lower() == device.type)
    backward_ns = min(e.start_ns() for e in events if e.name() == _BACKWARD)
    live = peak = 0
    forward_end = None
    for start_ns, nbytes in memory:
        if forward_end is None and start_ns >= backward_ns:
            forward_end = live
        live += nbytes
        peak = max(peak, live)
    return {"peak_bytes": peak, "forward_end_bytes": live if forward_end is None else forward_end}


def measure_memory(step: LoraStep, point: CurvePoint) -> dict[str, int]:
    """Activation memory of one step in ``point``'s configuration (see the module doc), in bytes.

    The step before must have created the optimizer's states: they are resident, not the step's.
    """
    apply_point(step.unet, point)
    saved = SavedTensorBytes(exclude=list(step.unet.parameters()))
    with saved.counting():  # the hooks keep what autograd gives them: they add no allocation
        result = _profiled_memory(step.step, step.device)
    result["saved_bytes"] = saved.total
    return result


# ----------------------------------------------------------------------------- time
class InterleavedTimer:
    """Step times of each point, one step of every point per :meth:`round`; each round starts one point later."""

    def __init__(self, step: LoraStep, points: list[CurvePoint]) -> None:
        self.step, self.points = step, points
        self.times: dict[str, list[float]] = {point.name: [] for point in points}
        self._rounds = 0

    def round(self) -> None:
        shift = self._rounds % len(self.points)
        for point in self.points[shift:] + self.points[:shift]:
            apply_point(self.step.unet, point)
            start = time.perf_counter()
            self.step.step()
            self.times[point.name].append(time.perf_counter() - start)
        self._rounds += 1

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.times.items()}


# ----------------------------------------------------------------------------- one curve
def summarize(points: list[CurvePoint], memory: dict[str, dict], times: dict[str, list[float]],
              verdicts: dict[str, str]) -> dict[str, Any]:
    """The curve's rows (memory and time, absolute and as ratios to stock) and the stock/checkpointing line."""
    stock = memory["stock"]["peak_bytes"]
    stock_s = statistics.median(times["stock"])
    rows = []
    for point in points:
        step_s = statistics.median(times[point.name])
        rows.append(dict(
            name=point.name, recompute=point.recompute, checkpointing=point.checkpointing, **memory[point.name],
            memory_ratio=memory[point.name]["peak_bytes"] / stock,
            saved_bytes_ratio=memory[point.name]["saved_bytes"] / memory["stock"]["saved_bytes"],
            step_s=step_s, time_ratio=step_s / stock_s, speed_vs_stock=stock_s / step_s,
            gradients=verdicts[point.name], gradients_bitwise_equal_to_stock=verdicts[point.name] == "bitwise",
            rounds_s=times[point.name],
        ))
    result: dict[str, Any] = {"points": rows}
    by_name = {row["name"]: row for row in rows}
    if "stock+ckpt" in by_name:
        ckpt = by_name["stock+ckpt"]
        # time = 1 + slope * (1 - memory): the line through stock (1, 1) and stock+ckpt.
        slope = (ckpt["time_ratio"] - 1) / (1 - ckpt["memory_ratio"])
        result["checkpointing_line"] = {"slope": slope, "through": [[1.0, 1.0], [ckpt["memory_ratio"], ckpt["time_ratio"]]]}
        for row in rows:
            row["time_ratio_on_line"] = 1 + slope * (1 - row["memory_ratio"])
            row["below_line"] = row["time_ratio"] <= row["time_ratio_on_line"]
    return result


def _run_rounds(one_round: Callable[[], None], rounds: int) -> None:
    for _ in range(rounds):
        one_round()


def measure_curve(size: str, precision: str, device: torch.device, rounds: int,
                  points: list[CurvePoint] | None = None,
                  run_rounds: Callable[[Callable[[], None], int], None] = _run_rounds) -> dict[str, Any]:
    """Gradients checked, memory profiled and ``rounds`` interleaved timed rounds of every point, on one UNet.

    ``run_rounds(one_round, rounds)`` runs the timed rounds (pytest-benchmark's ``pedantic`` in the smoke test).
    """
    points = curve_points() if points is None else points
    step = build_step(size, precision, device)
    verdicts = check_gradients(step, points, exact_copy=size not in NO_EXACT_COPY)
    step.step()  # the optimizer's states, lazy initialisation
    memory = {point.name: measure_memory(step, point) for point in points}  # also the warm-up of each point
    timer = InterleavedTimer(step, points)
    run_rounds(timer.round, rounds)
    rounds = len(timer.times["stock"])
    result = summarize(points, memory, timer.times, verdicts)
    result.update(size=size, precision=precision, rounds=rounds, recompute_levels=list(npu_kernels.RECOMPUTE_LEVELS))
    if step.default_vs_stock is not None:
        result["default_gradients_vs_stock_relative_difference"] = step.default_vs_stock
    return result


def host_bound_check(precision: str, device: torch.device, rounds: int, processes: int) -> dict[str, Any]:
    """Stock vs the default ``optimize()`` on the tiny UNet, ``rounds`` interleaved rounds in each of ``processes``
    fresh processes (one after the other): every process's curve, and the median of their speed ratios."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:  # a new process per task
        runs = pool.starmap(_host_bound_once, [(precision, device.type, rounds)] * processes, chunksize=1)
    speeds = [run["points"][1]["speed_vs_stock"] for run in runs]
    return {"precision": precision, "rounds": rounds, "processes": runs, "speeds_vs_stock": speeds,
            "speed_vs_stock": statistics.median(speeds)}


def _host_bound_once(precision: str, device_type: str, rounds: int) -> dict[str, Any]:
    return measure_curve("tiny", precision, torch.device(device_type), rounds, points=[CurvePoint(None), CurvePoint(DEFAULT_LEVEL)])


def format_table(curve: dict[str, Any]) -> str:
    """The curve as a Markdown table."""
    mib = 2**20
    lines = [
        "| point | peak above baseline (MiB) | ratio | at end of forward (MiB) | saved for backward (MiB) | ratio "
        "| step s (median) | time ratio | on checkpointing's line | gradients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in curve["points"]:
        line = row.get("time_ratio_on_line")
        grads = row["gradients"]
        lines.append(
            f"| {row['name']} | {row['peak_bytes'] / mib:.2f} | {row['memory_ratio']:.3f} | {row['forward_end_bytes'] / mib:.2f} "
            f"| {row['saved_bytes'] / mib:.2f} | {row['saved_bytes_ratio']:.3f} | {row['step_s']:.4f} | {row['time_ratio']:.3f} "
            f"| {'' if line is None else f'{line:.3f}'} | {grads} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the picture
def plot(curves: list[dict[str, Any]], path: Path, title: str) -> None:
    """Step time vs activation memory (ratios to stock), one panel per curve, our points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5.5), squeeze=False)
    for ax, curve in zip(axes[0], curves):
        rows = {row["name"]: row for row in curve["points"]}
        if "checkpointing_line" in curve:
            slope = curve["checkpointing_line"]["slope"]
            xs = [0.0, 1.25]
            ax.plot(xs, [1 + slope * (1 - x) for x in xs], color="0.5", linestyle="--",
                    label="line through stock and stock + checkpointing")
        for row in curve["points"]:
            color = "black" if row["recompute"] is None else "tab:orange" if row["checkpointing"] else "tab:blue"
            ax.scatter(row["memory_ratio"], row["time_ratio"], marker="s" if row["checkpointing"] else "o", color=color,
                       zorder=3)
            ax.annotate(row["name"], (row["memory_ratio"], row["time_ratio"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.scatter([], [], marker="o", color="tab:blue", label="optimize(unet, recompute=level)")
        if any(row["checkpointing"] for row in rows.values()):
            ax.scatter([], [], marker="s", color="tab:orange", label="the same + gradient checkpointing")
        times = [row["time_ratio"] for row in rows.values()]
        ax.set_xlim(0, max(1.25, max(row["memory_ratio"] for row in rows.values()) * 1.1))
        ax.set_ylim(min(0.8, min(times) - 0.05), max(times) + 0.15)
        ax.set_xlabel("activation memory / stock's (peak of the step's allocations above the weights)")
        ax.set_ylabel(f"step time / stock's (median of {curve['rounds']} interleaved rounds)")
        ax.set_title(f"LoRA step of the {SIZE_NAMES[curve['size']]}, {curve['precision']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_record(record: dict[str, Any], out: Path) -> None:
    plot(record["curves"], out / "memory_curve.png",
         f"{record['run']['device']}, {record['run']['date'][:10]}: LoRA step time vs activation memory")


# ----------------------------------------------------------------------------- the record
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_info(device: torch.device) -> dict[str, Any]:
    """What a record needs besides the numbers: device, date, command, code, versions, load."""
    import diffusers
    import peft

    return dict(
        device=_device_name(device), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m benchmarks.memory_curve " + shlex.join(sys.argv[1:]),
        commit=_git("rev-parse", "HEAD"), dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        versions=dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
                      peft=peft.__version__),
        torch_threads=torch.get_num_threads(), load_average_at_start=os.getloadavg(),
    )


def _levels(text: str) -> tuple[str, ...]:
    levels = tuple(level.strip() for level in text.split(",") if level.strip())
    unknown = [level for level in levels if level not in npu_kernels.RECOMPUTE_LEVELS]
    if unknown or not levels:
        raise argparse.ArgumentTypeError(f"levels are {', '.join(npu_kernels.RECOMPUTE_LEVELS)}; got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="the curve's UNet: full (SDXL's blocks, narrow widths; default), tiny, sdxl (SDXL's own, 512 px)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="also the points with gradient checkpointing (default; --no-checkpointing: stock and the "
                             "levels only, for a model whose steps take long)")
    parser.add_argument("--precision", action="append", choices=list(PRECISIONS), help="default: fp32 and bf16")
    parser.add_argument("--levels", type=_levels, default=None,
                        help="comma-separated recompute levels to measure beside stock (default: all of them)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds per curve (default 9)")
    parser.add_argument("--host-rounds", type=int, default=9,
                        help="rounds of the host-bound check, stock vs default optimize() on the tiny UNet (0: skip)")
    parser.add_argument("--host-processes", type=int, default=5,
                        help="fresh processes the host-bound check runs in, one after the other (default 5)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder of memory_curve.json and memory_curve.png")
    parser.add_argument("--replot", action="store_true", help="only redraw --out's memory_curve.png from its JSON")
    options = parser.parse_args(argv)
    if options.replot:
        record = json.loads((options.out / "memory_curve.json").read_text())
        _plot_record(record, options.out)
        return 0
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    record: dict[str, Any] = {"run": run_info(device), "curves": [], "host_bound": []}
    points = curve_points(options.levels, checkpointing=options.checkpointing)
    for precision in options.precision or list(PRECISIONS):
        curve = measure_curve(options.size, precision, device, options.rounds, points)
        record["curves"].append(curve)
        print(f"\nLoRA step of the {SIZE_NAMES[options.size]}, {precision}, {device.type}, {options.rounds} interleaved rounds")
        print(format_table(curve))
    if options.host_rounds:
        for precision in options.precision or list(PRECISIONS):
            host = host_bound_check(precision, device, options.host_rounds, options.host_processes)
            record["host_bound"].append(host)
            speeds = ", ".join(f"{speed:.3f}" for speed in host["speeds_vs_stock"])
            print(f"\nhost-bound check (tiny UNet), {precision}: default optimize() runs {host['speed_vs_stock']:.3f}x "
                  f"stock's speed (median of {options.host_processes} processes: {speeds}; each the median of "
                  f"{options.host_rounds} interleaved rounds)")
    record["run"]["load_average_at_end"] = os.getloadavg()
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "memory_curve.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot_record(record, options.out)
    print(f"\nwrote {options.out / 'memory_curve.json'} and {options.out / 'memory_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
