"""Fixtures the trainer tests share, each made once per session: the embedded assets' cache, and the
uninterrupted tiny run that interrupted and resumed runs are compared with."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.trainer.finished_run import finished_run  # noqa: F401 - a fixture several modules share
from tests.trainer.runs import TINY, run_main
from trainer.embedded_default import ensure_assets


@pytest.fixture(scope="session")
def assets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the embedded pipeline and dataset are generated once for every trainer test."""
    return tmp_path_factory.getbasetemp() / "npu_kernels_cache"


@pytest.fixture(scope="module")
def assets(assets_cache: Path) -> Iterator[object]:
    """The embedded assets, generated before any run or subprocess needs them (no generation races)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        yield ensure_assets()


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, assets_cache: Path) -> Path:
    """``TINY`` (6 steps over an epoch boundary) with a checkpoint every 2 steps, at most 2 kept
    (checkpoint-4, checkpoint-6), in this process: the output folder. Read it, never write into it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NPU_KERNELS_CACHE", str(assets_cache))
        ensure_assets()
        run_main([*TINY, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--output_dir", str(out)])
    return out
