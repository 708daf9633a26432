"""Benchmark options: ``--bench-size smoke`` (default: small shapes, tiny model, what CI runs) or
``--bench-size full`` (SDXL shapes and the full SDXL UNet architecture at 512 px).

Full run on this machine::

    python -m pytest benchmarks --benchmark-only --bench-size full --benchmark-json bench.json
    python -m benchmarks.to_table bench.json        # the README's table
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
        "--bench-rounds", type=int, default=None,
        help="timed rounds of the UNet step (default: 10 on a GPU, 2 at full size on a CPU)",
    )


@pytest.fixture(scope="session")
def bench_rounds(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def bench_size(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--bench-size")


@pytest.fixture(scope="session")
def resolution(request: pytest.FixtureRequest) -> int:
    return request.config.getoption("--resolution")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
