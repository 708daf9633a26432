"""The time-memory curve (``benchmarks/memory_curve.py``) as a pytest-benchmark test: stock, stock + gradient
checkpointing, every ``npu_kernels.RECOMPUTE_LEVELS`` level without and with checkpointing, one LoRA step each.

It asserts what is exact on any machine: every point's LoRA gradients agree with stock's (``measure_curve``
checks them first), and the memory ordering (allocator bytes and saved-tensor bytes, counts not seconds):
ours keeps no more than stock, each level no more than the level before it, checkpointing less than without,
and ours + checkpointing no more than stock + checkpointing. Step times go to ``extra_info`` with the rest of
the curve; the picture and the record come from ``python -m benchmarks.memory_curve``. Smoke (CI): the tiny
UNet, one timed round; ``--bench-size full``: the SDXL-structure UNet, 9 rounds unless ``--bench-rounds``::

    python -m pytest benchmarks/test_bench_memory_curve.py --benchmark-only -s
"""
from __future__ import annotations

import gc

import pytest

import npu_kernels
from benchmarks.memory_curve import DEFAULT_LEVEL, PRECISIONS, SIZE_NAMES, format_table, measure_curve


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_memory_curve(benchmark, precision, bench_size, bench_rounds, device):
    size = "full" if bench_size == "full" else "tiny"
    rounds = bench_rounds or (9 if bench_size == "full" else 1)
    benchmark.group = f"memory_curve {precision} {size}"
    curve = measure_curve(size, precision, device, rounds,
                          run_rounds=lambda one_round, n: benchmark.pedantic(one_round, rounds=n, warmup_rounds=0))
    gc.collect()
    benchmark.extra_info.update(device=device.type, **curve)
    print(f"\nLoRA step of the {SIZE_NAMES[size]}, {precision}, {device.type}, {curve['rounds']} interleaved rounds")
    print(format_table(curve))

    rows = {row["name"]: row for row in curve["points"]}
    levels = npu_kernels.RECOMPUTE_LEVELS

    def no_more(smaller: str, larger: str) -> None:
        for key in ("peak_bytes", "saved_bytes"):
            assert rows[smaller][key] <= rows[larger][key], f"{key}: {smaller} {rows[smaller][key]} > {larger} {rows[larger][key]}"

    no_more(f"ours:{DEFAULT_LEVEL}", "stock")
    assert rows["stock+ckpt"]["peak_bytes"] < rows["stock"]["peak_bytes"]
    for fewer, more in zip(levels[1:], levels):  # each level recomputes what the levels before it do, and more
        no_more(f"ours:{fewer}", f"ours:{more}")
    for level in levels:
        no_more(f"ours:{level}+ckpt", f"ours:{level}")
        no_more(f"ours:{level}+ckpt", "stock+ckpt")


def test_the_gradient_check_without_an_exact_copy_fails_a_level_that_is_off(monkeypatch, device):
    """``--size sdxl``'s check (no float64 copy: each level against the default, bit for bit or per element):
    passes the real levels, and fails one whose LoRA gradient is 0.1% off in one tensor."""
    import benchmarks.memory_curve as curve

    step = curve.build_step("tiny", "fp32", device)
    points = [curve.CurvePoint(None), curve.CurvePoint(DEFAULT_LEVEL), curve.CurvePoint("half_geglu_projection")]
    verdicts = curve.check_gradients(step, points, exact_copy=False)
    assert verdicts["stock"] == "bitwise"
    assert verdicts["ours:half_geglu_projection"] in (f"bitwise = ours:{DEFAULT_LEVEL}", f"within tolerance of ours:{DEFAULT_LEVEL}")
    assert step.default_vs_stock is not None and 0 <= step.default_vs_stock < 1e-4

    applied = []
    apply_point, lora_gradients = curve.apply_point, curve.LoraStep.lora_gradients
    monkeypatch.setattr(curve, "apply_point", lambda unet, point: (applied.append(point), apply_point(unet, point)))

    def one_tensor_off(self):
        grads = lora_gradients(self)
        if applied[-1].recompute == "half_geglu_projection":
            name = next(iter(grads))
            grads[name] = grads[name] * 1.001
        return grads

    monkeypatch.setattr(curve.LoraStep, "lora_gradients", one_tensor_off)
    with pytest.raises(AssertionError, match="half_geglu_projection"):
        curve.check_gradients(step, points, exact_copy=False)


def test_levels_option_picks_points_and_refuses_unknown_levels(capsys):
    from benchmarks.memory_curve import _levels, curve_points, main

    levels = _levels("none, geglu_projection")
    assert levels == ("none", "geglu_projection")
    assert [point.name for point in curve_points(levels, checkpointing=False)] == ["stock", "ours:none", "ours:geglu_projection"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--levels", "none,everything"])
    assert exit_info.value.code == 2 and "levels are none" in capsys.readouterr().err
