"""Shared test settings: the Triton interpreter on CPU-only machines, a non-interactive
plotting backend and a fixed seed."""

import os

import matplotlib
import torch

# Triton reads this when a kernel is defined, so it must be set before any kernel module is
# imported; effarch imports kernels lazily, so setting it here, first, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
