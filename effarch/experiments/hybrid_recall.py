"""Recall of hybrid models against their share of attention layers and their window
(chapter 6.1).

    python -m effarch.experiments hybrid-recall --out effarch/experiments/hybrid_recall_cpu.json
    python -m effarch.experiments hybrid-recall --steps 20 --out x.json   # a quick look

Trains one :class:`~effarch.models.HybridLM` per layer pattern on multi-query associative
recall (MQAR, chapter 2.5), all from the same data and initialisation seed:

- the fraction of softmax attention layers among eight (0, 1/8, 1/4, 1/2, 1), the rest Mamba
  layers with a small state (``d_state = 2``: on their own they cannot hold 8 pairs);
- Samba-style alternation of Mamba and sliding-window attention, against the window.

Each record holds the pattern, the held-out recall accuracy, the parameters, and the
decoding memory per sequence at the task's length (the sum of the layers' state sizes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..models.hybrid import HybridLM
from ..tasks import mqar
from ..train import evaluate, train

__all__ = ["CONFIG", "RUNS", "STORED", "hybrid_recall_experiment", "main", "stored_hybrid_recall"]

STORED = Path(__file__).resolve().parent / "hybrid_recall_cpu.json"
"""The stored CPU run (the 6.1 page plots it)."""

CONFIG: dict[str, Any] = {
    "seq_len": 64, "n_pairs": 8, "vocab_size": 64, "d_model": 32, "n_heads": 1,
    "d_state": 2, "steps": 400, "batch_size": 32, "lr": 3e-3, "n_eval": 500, "seed": 0,
}  # fmt: skip
"""Task, model and training of every run."""

RUNS: dict[str, tuple[str, int | None]] = {
    "0/8 attention": ("MMMMMMMM", None),
    "1/8 attention": ("MMMMAMMM", None),
    "2/8 attention": ("MMMAMMMA", None),
    "4/8 attention": ("MAMAMAMA", None),
    "8/8 attention": ("AAAAAAAA", None),
    "Mamba + window 4": ("MSMSMSMS", 4),
    "Mamba + window 8": ("MSMSMSMS", 8),
    "Mamba + window 16": ("MSMSMSMS", 16),
    "Mamba + window 32": ("MSMSMSMS", 32),
}
"""Run name -> (layer pattern, window of the ``S`` layers)."""


def _model(c: dict[str, Any], pattern: str, window: int | None) -> HybridLM:
    torch.manual_seed(c["seed"])
    mixers = {
        "M": ("mamba", {"d_state": c["d_state"]}),
        "A": ("attention", {"n_heads": c["n_heads"]}),
        "S": ("sliding_window", {"n_heads": c["n_heads"], "window": window or c["seq_len"]}),
    }
    return HybridLM(c["vocab_size"], c["d_model"], pattern, mixers)


def hybrid_recall_experiment(
    *, steps: int | None = None, runs: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train every run of :data:`RUNS` (module docstring); returns the records as a dict."""
    c = dict(CONFIG, steps=steps or CONFIG["steps"])
    task = {"seq_len": c["seq_len"], "n_pairs": c["n_pairs"], "vocab_size": c["vocab_size"]}
    train_set = mqar(c["steps"] * c["batch_size"], seed=c["seed"], **task)
    eval_set = mqar(c["n_eval"], seed=c["seed"] + 1_000_003, **task)
    start = time.perf_counter()
    records = []
    for name in runs or list(RUNS):
        pattern, window = RUNS[name]
        model = _model(c, pattern, window)
        result = train(model, train_set, steps=c["steps"], batch_size=c["batch_size"],
                       lr=c["lr"], seed=c["seed"], progress=progress, desc=name)  # fmt: skip
        accuracy = evaluate(model, eval_set)
        records.append({
            "name": name, "pattern": pattern, "window": window,
            "attention_fraction": pattern.count("A") / len(pattern),
            "accuracy": accuracy, "final_loss": result.losses[-1],
            "parameters": model.num_parameters(),
            "state_numbers": sum(model.state_sizes(c["seq_len"])),
            "seconds": result.train_seconds,
        })  # fmt: skip
        if progress:
            print(f"{name:>20}: recall {accuracy:.3f}, {records[-1]['parameters']} params, "
                  f"{records[-1]['state_numbers']} state numbers", flush=True)  # fmt: skip
    return {"config": c, "records": records, "seconds": time.perf_counter() - start,
            "torch": torch.__version__}  # fmt: skip


def stored_hybrid_recall() -> dict[str, Any]:
    """The stored run (``hybrid_recall_cpu.json`` beside this module)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m effarch.experiments hybrid-recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--runs", nargs="+", default=None, choices=list(RUNS))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = hybrid_recall_experiment(steps=args.steps, runs=args.runs)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
