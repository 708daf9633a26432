"""Fixtures the trainer tests share: one cache of the embedded assets for the whole session."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.trainer.finished_run import finished_run  # noqa: F401 - a fixture several modules share
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
