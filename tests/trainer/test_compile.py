"""``--compile`` (graph mode): preflight errors, static shapes, compile time apart from images/s, the same
losses as eager, no recompilation (validation included), and ``--logging_steps``.

The compiled runs use ``--compile_backend aot_eager``: the same dynamo capture (``fullgraph=True``,
``dynamic=False``), guards and AOTAutograd forward/backward graphs as inductor, without inductor's C++
code generation, which takes many minutes on this 2-core CPU. The inductor run is the ``slow`` test.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from trainer import compiling, sampling
from trainer.errors import InputError

# 8 samples in batches of 2: 4 steps per epoch; validation after epoch 0 (embedded defaults), then 2 more
# compiled steps, which would recompile if validation had touched the compiled UNet's guards.
RUN = [
    "--max_train_samples", "8", "--train_batch_size", "2", "--max_train_steps", "6",
    "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "none",
]  # fmt: skip


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(argv: list[str]) -> tuple[dict[str, Any], str]:
    """``trainer.sdxl_lora.main(argv)`` in-process: (summary, captured stdout)."""
    from trainer.sdxl_lora import main

    out = io.StringIO()
    threads = torch.get_num_threads()
    _reset_accelerate()
    try:
        with contextlib.redirect_stdout(out):
            summary = main(argv)
    finally:
        _reset_accelerate()
        torch.set_num_threads(threads)
    return summary, out.getvalue()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from trainer.sdxl_lora import cli

    status = cli(argv)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def cache_env(assets_cache: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        yield assets_cache


# ----------------------------------------------------------------------------- preflight: one line, exit 2
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--compile", "--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead captures CUDA graphs and needs a CUDA GPU"),
        (["--compile_mode", "default"], "--compile_mode default has no effect without --compile"),
        (["--compile_backend", "aot_eager"], "--compile_backend aot_eager has no effect without --compile"),
        (
            ["--compile", "--compile_backend", "aot_eager", "--compile_mode", "max-autotune-no-cudagraphs"],
            "--compile_mode max-autotune-no-cudagraphs is a mode of the inductor backend",
        ),
        (["--logging_steps", "0"], "--logging_steps 0: expected at least 1"),
    ],
)
def test_impossible_compile_flags_stop_before_training(flags, expected, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status, err = run_cli(["--output_dir", str(out), *flags], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not out.exists()  # stopped before anything was written


def test_npu_without_torchair_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)
    args = argparse.Namespace(compile=True, compile_mode=None, compile_backend=None)
    with pytest.raises(InputError, match="--compile on an Ascend NPU needs torchair"):
        compiling.check_flags(args, "npu")
    compiling.check_flags(argparse.Namespace(compile=True, compile_mode=None, compile_backend="aot_eager"), "npu")


def test_reduce_overhead_is_accepted_on_cuda() -> None:
    compiling.check_flags(argparse.Namespace(compile=True, compile_mode="reduce-overhead", compile_backend=None), "cuda")


# ----------------------------------------------------------------------------- static shapes
def test_partial_last_batch_is_dropped_and_said(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.compiling"):
        assert compiling.full_batches_only(8, 3) == 2
    assert "leaves out the last 2 of 8 samples" in caplog.text
    caplog.clear()
    assert compiling.full_batches_only(8, 4) == 0 and not caplog.text
    with pytest.raises(InputError, match="at least one full batch"):
        compiling.full_batches_only(2, 3)
    loader, _ = sampling.build_dataloader(list(range(8)), 3, 0, seed=1, collate_fn=torch.tensor, drop_last=True)
    sizes = [len(batch) for batch in loader]
    assert sizes == [3, 3] and len(loader) == 2


def test_compile_seconds_is_the_warmup_beyond_the_steady_step() -> None:
    times = [9.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.1, 0.9, 1.0]
    assert compiling.compile_seconds(times, warmup=5) == pytest.approx(8.0 + 0.5)
    assert compiling.compile_seconds([4.0, 1.0, 1.0], warmup=5) == pytest.approx(3.0)  # short run: steady = after step 1
    assert compiling.compile_seconds([], warmup=5) == 0.0


# ----------------------------------------------------------------------------- a compiled run vs eager
@pytest.fixture(scope="module")
def runs(cache_env: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Eager, eager with --logging_steps 4, and compiled (aot_eager) runs of the same seed.

    The compiled run raises on any recompilation (``error_on_recompile``) and counts the graphs dynamo made.
    """
    from torch._dynamo.utils import counters

    work = tmp_path_factory.mktemp("compile_runs")
    eager, _ = run_main(RUN + ["--output_dir", str(work / "eager")])
    deferred, _ = run_main(RUN + ["--output_dir", str(work / "deferred"), "--logging_steps", "4", "--num_validation_images", "0"])
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, stdout = run_main(RUN + ["--output_dir", str(work / "compiled"), "--compile", "--compile_backend", "aot_eager"])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return {"eager": eager, "deferred": deferred, "compiled": compiled, "stdout": stdout, "graphs": graphs}


def test_compiled_run_reports_compile_time_apart(runs: dict[str, Any]) -> None:
    compiled, eager = runs["compiled"], runs["eager"]
    assert compiled["steps"] == eager["steps"] == 6
    assert compiled["compile_mode"] == "default" and compiled["compile_backend"] == "aot_eager"
    assert compiled["compile_seconds"] > 0
    assert eager["compile_seconds"] is None and eager["compile_mode"] is None
    assert "Compile time sec : " in runs["stdout"]
    lines = runs["stdout"].strip().splitlines()
    assert lines[-2].startswith("Final Performance images/sec") and lines[-3].startswith("Compile time sec : ")
    assert compiled["warmup_steps_skipped"] == 5 and compiled["fps"] > 0  # images/s: the steady steps only


def test_compiled_losses_match_eager(runs: dict[str, Any]) -> None:
    eager, compiled = runs["eager"]["loss_history"], runs["compiled"]["loss_history"]
    assert len(eager) == len(compiled) == 6
    # aot_eager runs the same ATen ops as eager: every step's loss within 1e-5 (a 1% error in any fails).
    for step, (e, c) in enumerate(zip(eager, compiled), start=1):
        assert abs(c - e) <= 1e-5 * abs(e), f"step {step}: compiled {c} vs eager {e}"


def test_one_graph_and_no_recompile_across_validation(runs: dict[str, Any]) -> None:
    # Validation ran after epoch 0 (step 4) with the uncompiled UNet, at another batch size; steps 5-6 then
    # ran the compiled UNet again under error_on_recompile. One graph: fullgraph, static shapes.
    assert any("/validation/epoch_000/" in path for path in runs["compiled"]["validation_images"])
    assert runs["graphs"] == 1


def test_logging_steps_defers_the_read_not_the_losses(runs: dict[str, Any]) -> None:
    # Reading the loss every 4 steps changes nothing computed: every step's loss is recorded, bit for bit.
    assert runs["deferred"]["loss_history"] == runs["eager"]["loss_history"]
    assert runs["deferred"]["final_train_loss"] == runs["eager"]["final_train_loss"]


@pytest.mark.slow
def test_inductor_compiled_run_matches_eager(cache_env: Path, tmp_path: Path, runs: dict[str, Any]) -> None:
    """The real thing: inductor's generated kernels (minutes of C++ compilation on a 2-core CPU)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled, _ = run_main(RUN + ["--output_dir", str(tmp_path / "inductor"), "--compile"])
    torch._dynamo.reset()
    assert compiled["compile_backend"] == "inductor" and compiled["compile_seconds"] > 0
    # Inductor fuses and reorders the maths: each step's loss within 1e-3 (a 1% error in any still fails).
    for e, c in zip(runs["eager"]["loss_history"], compiled["loss_history"], strict=True):
        assert abs(c - e) <= 1e-3 * abs(e)
