"""The ``backend`` fixture of the op tests: the public ops forced onto one backend for the test."""
from __future__ import annotations

import pytest

import npu_kernels
from tests.ops._backends import HAS_TRITON


@pytest.fixture
def backend(request):
    """Parametrised indirectly with a backend name; runs the test inside ``use_backend(name)``.

    ``npu`` brings up the stand-in ``torch_npu`` (module-scoped ``npu_standin``) and clears its
    call log, which the test may read through ``request.getfixturevalue("npu_standin")``.
    """
    name = request.param
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed: the Triton backend cannot be tested")
    if name == "npu":
        request.getfixturevalue("npu_standin").torch_npu.reset()
    with npu_kernels.use_backend(name):
        yield name
