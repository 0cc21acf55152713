"""Run the benchmark scripts from a source checkout, with or without the package installed.

The repository holds the package ``effarch`` at its root and the kernels in ``kernels/``,
which an install (``pip install -e .``) maps to the name ``effarch_kernels``. On a machine
where neither is installed, :func:`use_source_checkout` puts the root on ``sys.path`` and
links ``kernels/`` under the name ``effarch_kernels`` in a temporary folder, and passes both
on through ``PYTHONPATH`` to the subprocesses a script starts (pytest, the experiments).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_source_checkout() -> list[str]:
    """Make ``effarch`` and ``effarch_kernels`` importable from this checkout when they are
    not installed; return the folders added to ``sys.path`` (none when both import)."""
    added = []
    if importlib.util.find_spec("effarch") is None:
        added.append(str(ROOT))
    if importlib.util.find_spec("effarch_kernels") is None:
        shim = Path(tempfile.mkdtemp(prefix="effarch_checkout_"))
        (shim / "effarch_kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
        added.append(str(shim))
    if added:
        sys.path[:0] = added
        rest = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(added + ([rest] if rest else []))
    return added
