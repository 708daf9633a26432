"""Benchmark options: ``--bench-size smoke`` (default: small shapes, tiny model, what CI runs) or
``--bench-size full`` (SDXL shapes and the full SDXL UNet architecture at 512 px).

Full run::

    python -m pytest benchmarks --benchmark-only --bench-size full --benchmark-json bench.json
    python -m benchmarks.to_table bench.json        # the README's table

The UNet and trainer steps run eager and compiled (``torch.compile``, ``--compile-mode``), stock and
optimized; ``-k eager`` or ``-k compiled`` runs one side only.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere


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
