"""Recall (MQAR) of full attention, a sliding window and NSA at one budget (chapter 3.2).

    python -m effarch.experiments sparse-recall --out effarch/experiments/sparse_recall_cpu.json

Trains the CPU-size recall experiment (:data:`~effarch.experiments.recall.RECALL_CPU`: 8
key-value pairs in 32 tokens, two layers of width 32), for 300 steps, with three mixers:
full softmax attention, sliding-window attention reading the last 8 tokens, and
:class:`~effarch.sparse.NativeSparseAttention` reading about as many: a window of 4 plus 2
selected blocks of 4 (the query's own and one chosen by content), with the pooled blocks of
the compressed branch. The page of chapter 3.2 plots the stored file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .recall import recall_experiment

__all__ = ["MIXERS", "STEPS", "STORED", "main", "sparse_recall"]

STORED = Path(__file__).resolve().parent / "sparse_recall_cpu.json"
"""The stored CPU run."""

MIXERS = {
    "attention": [{"n_heads": 1}],
    "sliding_window": [{"n_heads": 1, "window": 8}],
    "nsa": [{"n_heads": 1, "block": 4, "top_n": 2, "window": 4}],
}
"""Mixer -> its ``mixer_kwargs``: 8 tokens read at full resolution by both sparse mixers."""


STEPS = 300
"""Training steps of the stored run (fewer than :data:`~effarch.experiments.RECALL_CPU`'s)."""


def sparse_recall(progress: bool = True) -> list[dict[str, Any]]:
    """Run the three models (about 25 s on a CPU, :data:`STEPS` steps each); one record
    per mixer."""
    return recall_experiment("cpu", mixers=MIXERS, progress=progress, steps=STEPS)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments sparse-recall",
                                description=__doc__)  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    records = sparse_recall()
    args.out.write_text(json.dumps({"mixers": MIXERS, "records": records}, indent=1) + "\n")
    for r in records:
        print(f"{r['mixer']:>15}: recall {r['accuracy']:.3f}, state {r['state_size']}")
