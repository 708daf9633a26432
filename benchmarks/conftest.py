"""Benchmark options: ``--bench-size smoke`` (default: small shapes, tiny model, what CI runs) or
``--bench-size full`` (SDXL shapes and the full SDXL UNet architecture at 512 px).

Full run::

    python -m pytest benchmarks --benchmark-only --bench-size full --benchmark-json bench.json
    python -m benchmarks.to_table bench.json        # the README's table

The UNet and trainer steps run eager and compiled (``torch.compile``, ``--compile-mode``), stock and
optimized; ``-k eager`` or ``-k compiled`` runs one side only.

Under ``--benchmark-disable`` (the test command: each row runs once as a smoke test) the compiled rows
listed in ``SMOKE_DUPLICATES`` are ``slow``: what they check, a faster test checks too, and compiling
the UNet takes minutes on a CPU. A timed run (without ``--benchmark-disable``) keeps every row.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere


# Smoke rows deselected from the test command (marked ``slow``), each with the faster test that checks
# the same thing. The compiled row these leave in CI: unet_step bf16-compiled-npu_kernels (the optimized
# UNet captured whole under bf16 autocast, which no test under tests/ compiles).
SMOKE_DUPLICATES: dict[str, str] = {
    "test_bench_unet_step.py::test_unet_step[fp32-compiled-npu_kernels]":
        "tests/test_diffusers_integration.py::test_compiled_optimized_unet_matches_eager (output and every gradient)",
    "test_bench_unet_step.py::test_unet_step[fp32-compiled-stock]": "stock diffusers compiled: nothing of ours",
    "test_bench_unet_step.py::test_unet_step[bf16-compiled-stock]": "stock diffusers compiled: nothing of ours",
    "test_bench_trainer_step.py::test_trainer_step[fp32-compiled-default_flags]":
        "tests/trainer/test_compile.py (--compile, kernels on: every step's loss vs eager)",
    "test_bench_trainer_step.py::test_trainer_step[bf16-compiled-default_flags]":
        "tests/trainer/test_compile.py (the same --compile path) and unet_step[bf16-compiled-npu_kernels]",
    "test_bench_trainer_step.py::test_trainer_step[fp32-compiled-speed_features]":
        "tests/trainer/test_compile.py (--compile, kernels on) and test_scale's caching tests (cached = uncached losses)",
    "test_bench_trainer_step.py::test_trainer_step[bf16-compiled-speed_features]":
        "tests/trainer/test_compile.py (--compile, kernels on) and unet_step[bf16-compiled-npu_kernels] (bf16 capture)",
}


def pytest_cmdline_main(config: pytest.Config) -> None:
    """``--dist loadfile`` (pyproject's addopts, for the test command's ``-n 2``) only when there are
    workers: pytest-benchmark counts any ``--dist`` but "no" as xdist being on and then disables timing,
    so without this ``--benchmark-only`` stops at once with "Can't have both --benchmark-only and
    --benchmark-disable". Runs after pytest-xdist's own hook (which turns ``-n N`` into workers)."""
    if not getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "loadfile":
        config.option.dist = "no"


@pytest.hookimpl(tryfirst=True)  # before -m selects: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--bench-size") != "smoke" or not config.getoption("benchmark_disable", default=False):
        return
    for item in items:
        if item.nodeid.removeprefix("benchmarks/") in SMOKE_DUPLICATES:
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-size",
        choices=("smoke", "full"),
        default=os.environ.get("NPU_KERNELS_BENCH_SIZE", "smoke"),
        help="smoke: small shapes and a tiny model (CI); full: SDXL shapes and architecture",
    )
    parser.addoption(
        "--resolution", type=int, default=int(os.environ.get("NPU_KERNELS_BENCH_RESOLUTION", "512")),
        help="image resolution of the full-size UNet and trainer steps (latents are resolution/8)",
    )
    parser.addoption(
        "--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        default=os.environ.get("NPU_KERNELS_BENCH_COMPILE_MODE", "default"),
        help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs, on CUDA only)",
    )
    parser.addoption(
        "--compile-backend", choices=("inductor", "aot_eager"), default=os.environ.get("NPU_KERNELS_BENCH_COMPILE_BACKEND"),
        help="torch.compile backend of the compiled rows (default: inductor, except aot_eager for the smoke size "
             "on a CPU, where inductor's C++ compilation would take CI minutes: graph capture and routing only)",
    )
    parser.addoption(
        "--bench-rounds", type=int, default=None,
        help="timed rounds of the UNet step (default: 10 on a GPU, 2 at full size on a CPU)",
    )


@pytest.fixture(scope="session")
def bench_rounds(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def compile_mode(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--compile-mode")


@pytest.fixture(scope="session")
def compile_backend(request: pytest.FixtureRequest, bench_size: str, device: torch.device) -> str:
    chosen = request.config.getoption("--compile-backend")
    if chosen:
        return chosen
    return "aot_eager" if bench_size == "smoke" and device.type == "cpu" else "inductor"


@pytest.fixture(scope="session")
def bench_size(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--bench-size")


@pytest.fixture(scope="session")
def resolution(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--resolution")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
