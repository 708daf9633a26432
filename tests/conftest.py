"""Shared test setup: Triton runs in its interpreter on CPU tensors when there is no GPU."""
import os

import torch

# Must happen before anything imports triton; harmless when triton is absent.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
