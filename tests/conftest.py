"""Shared test setup: Triton in its interpreter on CPU tensors when there is no GPU, the ``cuda``
marker, a fixed seed, and the stand-in ``torch_npu`` as a fixture."""
import importlib
import os
import sys
import types
from pathlib import Path

import torch

# Must happen before anything imports triton; harmless when triton is absent.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

STANDIN_DIR = Path(__file__).resolve().parent / "torch_npu_standin"
_SWAPPED_MODULES = ("torch_npu", "npu_kernels.backends.npu")  # and their submodules


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def npu_standin():
    """The stand-in ``torch_npu`` first on sys.path, imported with the NPU adapters, and the
    dispatcher made to load them; all of it undone afterwards so that later test modules see this
    process as it was. Yields ``SimpleNamespace(torch_npu=..., npu=...)``.

    Used by the op tests (the public ops on ``npu``) and by ``tests/backends/test_npu.py`` (how the
    adapters call torch_npu).
    """
    from npu_kernels import backends

    current = sys.modules.get("torch_npu")
    if current is not None and not getattr(current, "IS_STANDIN", False):
        pytest.skip("the real torch_npu is imported in this process; these tests need the stand-in")
    swapped = [name for name in sys.modules if name == "torch_npu" or name.startswith(_SWAPPED_MODULES)]
    saved = {name: sys.modules.pop(name) for name in swapped}
    had_attr, old_attr = hasattr(backends, "npu"), getattr(backends, "npu", None)
    sys.path.insert(0, str(STANDIN_DIR))
    backends.reset_cache()
    try:
        torch_npu = importlib.import_module("torch_npu")
        assert getattr(torch_npu, "IS_STANDIN", False), "the real torch_npu was imported instead of the stand-in"
        adapters = importlib.import_module("npu_kernels.backends.npu")
        assert adapters.torch_npu is torch_npu
        assert backends.load("npu") is adapters, backends.load_error("npu")
        adapters.reset_capability_cache()
        yield types.SimpleNamespace(torch_npu=torch_npu, npu=adapters)
    finally:
        sys.path.remove(str(STANDIN_DIR))
        for name in [name for name in sys.modules if name.startswith(_SWAPPED_MODULES)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if had_attr:
            backends.npu = old_attr
        elif hasattr(backends, "npu"):
            del backends.npu
        backends.reset_cache()
