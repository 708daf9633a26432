"""The ``backend`` fixture of the op tests: the public ops forced onto one backend for the test."""
from __future__ import annotations

import contextlib

import pytest

import npu_kernels
from tests.ops._backends import HAS_TRITON


@pytest.fixture
def backend(request):
    """Parametrised indirectly with a backend name; runs the test inside ``use_backend(name)``.

    ``npu`` brings up the stand-in ``torch_npu`` (module-scoped ``npu_standin``) and clears its
    call log, which the test may read through ``request.getfixturevalue("npu_standin")``, and runs the
    test inside the stand-in's ``emulated_device()`` (the aclnn rules of the ATen ops an NPU runs).
    """
    name = request.param
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed: the Triton backend cannot be tested")
    rules = contextlib.nullcontext()
    if name == "npu":  # the stand-in's device rules apply to every ATen op the test runs (emulated_device)
        standin = request.getfixturevalue("npu_standin").torch_npu
        standin.reset()
        rules = standin.emulated_device()
    with npu_kernels.use_backend(name), rules:
        yield name
