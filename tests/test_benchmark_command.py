"""The README's benchmark command runs timed benchmarks, not only the test command's untimed ones.

CI runs the benchmarks with ``--benchmark-disable`` (each once, as a test); this is the one check that
``--benchmark-only`` still times something. It once stopped at once ("Can't have both --benchmark-only
and --benchmark-disable"): pyproject's ``--dist loadfile`` made pytest-benchmark believe xdist was on.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_only_times_a_benchmark() -> None:
    # Not as an xdist worker: pytest-benchmark reads PYTEST_XDIST_WORKER and would rightly stand down.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS"))}
    one_case = "geglu and stock and fp32 and forward_backward"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_ops.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", one_case],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    assert "Mean" in result.stdout  # pytest-benchmark's table: the case was timed, not merely run
