"""Shared test settings: the Triton interpreter on CPU-only machines, a non-interactive
plotting backend and a fixed seed."""

import importlib.util
import os
import sys
from pathlib import Path

import matplotlib
import torch

# `python -m pytest` puts the repository root on sys.path, and there the folder kernels/
# (installed as effarch_kernels) shadows the Hugging Face package `kernels` that transformers
# looks for and imports. Drop the root when effarch is installed, so imports see what a user
# of the installed package sees.
_ROOT = Path(__file__).resolve().parents[1]
_saved_path = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
if (
    importlib.util.find_spec("effarch") is None
    or importlib.util.find_spec("effarch_kernels") is None
):
    sys.path[:] = _saved_path  # running from a checkout that is not installed

# Triton reads this when a kernel is defined, so it must be set before any kernel module is
# imported; effarch imports kernels lazily, so setting it here, first, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

matplotlib.use("Agg")

# Under pytest-xdist (the test command runs one worker per core) every worker computes on one
# thread: several workers each asking for every core would wait on one another.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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
