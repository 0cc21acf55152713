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


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` and ``torch.empty_like`` return floating tensors full of NaN.

    Kernels allocate their outputs uninitialised; with this fixture any element a kernel
    forgets to write shows up as NaN in its result (integer buffers are left as they are).
    """
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_like(*a, **kw)))
