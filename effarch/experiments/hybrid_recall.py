"""Recall of hybrid models against their share of attention layers and their window
(chapter 6.1).

    python -m effarch.experiments hybrid-recall --out effarch/experiments/hybrid_recall_cpu.json
    python -m effarch.experiments hybrid-recall --steps 20 --out x.json   # a quick look

(The stored run was made as two processes of one thread each, ``OMP_NUM_THREADS=1`` and the
runs split between them with ``--runs``, their records then concatenated in the order of
:data:`RUNS`.)

Trains one :class:`~effarch.models.HybridLM` per layer pattern and seed on multi-query
associative recall (MQAR, chapter 2.5), on the same data:

- the fraction of softmax attention layers among eight (0, 1/8, 1/4, 1/2, 1), the rest Mamba
  layers with a small state (``d_state = 2``: on their own they cannot hold 8 pairs);
- Samba-style alternation of Mamba and sliding-window attention, against the window.

Parameters are matched layer for layer: the attention layers' single head is ``head_dim = 56``
wide, which gives an attention layer exactly a Mamba layer's number of parameters. As in chapter
2.5's models, a short convolution over the last two tokens precedes every attention layer
(Mamba has its own): it lets one layer see the previous token, which recall needs, and
without it the attention-heavy models do not learn the task at this budget.

No single learning rate suits every layout at this budget: at 3e-3 eight attention layers were
still far from fitted after 400 steps (loss 2.6, recall 0.20), at chapter 2.5's 1e-2 the
Mamba-heavy layouts stalled. As in Zoology's MQAR study (Arora et al., 2023), each layout is
therefore trained at every learning rate of ``CONFIG["lrs"]`` and keeps the run with the lower
final training loss (chosen on the training data, never on the held-out accuracy).

Each record holds the pattern, the seed, the held-out recall accuracy, the last training
loss, the parameters, and the decoding memory per sequence at the task's length (the sum of
the layers' state sizes).
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

__all__ = [
    "CONFIG",
    "RUNS",
    "STORED",
    "hybrid_recall_experiment",
    "main",
    "run_model",
    "stored_hybrid_recall",
]

STORED = Path(__file__).resolve().parent / "hybrid_recall_cpu.json"
"""The stored CPU run (the 6.1 page plots it)."""

CONFIG: dict[str, Any] = {
    "seq_len": 64, "n_pairs": 8, "vocab_size": 64, "d_model": 32, "n_heads": 1,
    "head_dim": 56, "short_conv": 2, "d_state": 2, "steps": 400, "batch_size": 32,
    "lrs": [3e-3, 1e-2], "n_eval": 500, "seed": 0, "seeds": [0, 1],
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


def run_model(name: str, *, seed: int = 0, config: dict[str, Any] | None = None) -> HybridLM:
    """The untrained model of run ``name`` of :data:`RUNS` (initialised from ``seed``) under
    ``config`` (default :data:`CONFIG`)."""
    if name not in RUNS:
        raise ValueError(f"name must be one of {sorted(RUNS)}, got {name!r}")
    c = CONFIG if config is None else config
    pattern, window = RUNS[name]
    torch.manual_seed(seed)
    attn = {"n_heads": c["n_heads"], "head_dim": c["head_dim"]}
    mixers = {
        "M": ("mamba", {"d_state": c["d_state"]}),
        "A": ("attention", attn),
        "S": ("sliding_window", {**attn, "window": window or c["seq_len"]}),
    }
    return HybridLM(c["vocab_size"], c["d_model"], pattern, mixers, short_conv=c["short_conv"])


def hybrid_recall_experiment(
    *,
    steps: int | None = None,
    runs: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every run of :data:`RUNS` once per seed and learning rate, keeping per seed the
    learning rate with the lower final training loss (module docstring); returns the records
    as a dict. The data are the same for every seed; the seed sets the initialisation and
    the order of the batches."""
    c = dict(CONFIG, steps=steps or CONFIG["steps"], seeds=list(seeds or CONFIG["seeds"]))
    task = {"seq_len": c["seq_len"], "n_pairs": c["n_pairs"], "vocab_size": c["vocab_size"]}
    train_set = mqar(c["steps"] * c["batch_size"], seed=c["seed"], **task)
    eval_set = mqar(c["n_eval"], seed=c["seed"] + 1_000_003, **task)
    start = time.perf_counter()
    records = []
    for seed in c["seeds"]:
        for name in runs or list(RUNS):
            pattern, window = RUNS[name]
            tried = []
            for lr in c["lrs"]:
                model = run_model(name, seed=seed, config=c)
                result = train(model, train_set, steps=c["steps"], batch_size=c["batch_size"],
                               lr=lr, seed=seed, progress=progress,
                               desc=f"{name}, lr {lr}")  # fmt: skip
                tried.append((result.losses[-1], lr, model, result.train_seconds))
            loss, lr, model, _ = min(tried, key=lambda x: x[0])
            accuracy = evaluate(model, eval_set)
            records.append({
                "name": name, "seed": seed, "pattern": pattern, "window": window,
                "attention_fraction": pattern.count("A") / len(pattern),
                "accuracy": accuracy, "final_loss": loss, "lr": lr,
                "final_loss_by_lr": {str(x[1]): x[0] for x in tried},
                "parameters": model.num_parameters(),
                "state_numbers": sum(model.state_sizes(c["seq_len"])),
                "seconds": sum(x[3] for x in tried),
            })  # fmt: skip
            if progress:
                print(f"{name:>20} seed {seed}: recall {accuracy:.3f} at lr {lr}, "
                      f"{records[-1]['parameters']} params, "
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
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = hybrid_recall_experiment(steps=args.steps, runs=args.runs, seeds=args.seeds)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
