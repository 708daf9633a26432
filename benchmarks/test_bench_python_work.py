"""The Python work of one LoRA step (``benchmarks/python_work.py``), exact counts: ours stays within a budget
of stock's. On a host-bound step this Python is time; a change that adds per-call work to every op (an
``inspect.signature``, a property walked twice) shows here as a count, where seconds on a shared CPU would
hide it. The budgets are the counts after 2026-12-03's second pass (tiny UNet; fp32: 1.288x stock's calls,
1.318x its bytecodes; bf16: 1.320x, 1.411x; before it 1.580x / 1.469x and 1.651x / 1.548x) with about 8% headroom
for library releases that change stock's side::

    python -m benchmarks.python_work            # the counts, and the files ours adds them in
"""
from __future__ import annotations

import pytest

from benchmarks.python_work import count_python_work, step_work

BUDGETS = {"fp32": (1.39, 1.42), "bf16": (1.43, 1.52)}  # precision -> (calls, bytecodes), as multiples of stock's


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_python_work_of_a_step_stays_within_budget(precision, device):
    work = step_work("tiny", precision, device)
    stock, ours = work["stock"], work["ours"]
    calls_budget, bytecodes_budget = BUDGETS[precision]
    assert stock.calls > 1000 and stock.bytecodes > 10_000  # the tracer saw the step
    assert ours.calls <= calls_budget * stock.calls, (ours.calls, stock.calls)
    assert ours.bytecodes <= bytecodes_budget * stock.bytecodes, (ours.bytecodes, stock.bytecodes)


def test_the_counter_counts_exactly():
    def three_calls() -> None:
        for _ in range(3):
            abs(_one())

    work = count_python_work(three_calls)
    assert work.calls == 4  # three_calls itself and _one three times (builtins are not Python calls)
    assert work.bytecodes == count_python_work(three_calls).bytecodes > 0


def _one() -> int:
    return 1
