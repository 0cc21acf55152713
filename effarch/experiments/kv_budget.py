"""Held-out loss of the stored ByteLM under every KV-cache policy and budget (chapter 3.3).

    python -m effarch.experiments kv-budget --out effarch/experiments/kv_budget_cpu.json
    python -m effarch.experiments kv-budget --length 512 --windows 1 --budgets 32 --out x.json

Decodes ``--windows`` held-out windows of ``--length`` bytes (longer than the model's
training window, so the full cache meets positions it never saw) one byte at a time with
:func:`effarch.sparse.decode` under each policy of :data:`POLICIES` at each budget, and
stores the loss per position (mean over windows, in bits per byte, binned), the mean loss
over the whole window and beyond the training length, the cache held at the end and the
tokens read per step, and the full-cache attention mass on the tokens read against the
oracle top-k of as many (per layer, mean over steps and windows). The
page of chapter 3.3 plots the stored file; this command reproduces it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..models.bytelm import load_bytelm
from ..sparse import (
    H2O,
    TOVA,
    FullCache,
    KVPolicy,
    Quest,
    SlidingWindow,
    StreamingLLM,
    decode,
)
from ..tasks.text import heldout_windows, stdlib_corpus

__all__ = ["POLICIES", "STORED", "kv_budget_experiment", "main", "stored_kv_budget"]

STORED = Path(__file__).resolve().parent / "kv_budget_cpu.json"
"""The stored CPU run (the page plots it)."""

POLICIES: dict[str, Callable[[int], KVPolicy]] = {
    "window": SlidingWindow,
    "sinks + window": lambda b: StreamingLLM(b, n_sink=4),
    "sinks + window, original positions": lambda b: StreamingLLM(b, n_sink=4, reposition=False),
    "H2O": H2O,
    "TOVA": TOVA,
    "Quest": lambda b: Quest(b, page_size=16),
}
"""Policy name -> constructor from the budget (tokens per layer)."""


def _binned(x: torch.Tensor, width: int) -> list[float]:
    n = math.ceil(len(x) / width)
    return [x[i * width : (i + 1) * width].mean().item() for i in range(n)]


def kv_budget_experiment(
    *,
    length: int = 1024,
    windows: int = 2,
    budgets: tuple[int, ...] = (32, 64, 128),
    bin_width: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment (see the module docstring); returns the records as a dict."""
    model, card = load_bytelm()
    train_len = card["config"]["train_len"]
    x, _ = heldout_windows(stdlib_corpus().heldout, length, windows)
    records = []
    start = time.perf_counter()
    runs = [("full", None)] + [(name, b) for b in budgets for name in POLICIES]
    for name, budget in runs:
        policy = FullCache() if budget is None else POLICIES[name](budget)
        runs = [decode(model, x[i], policy, recall=True) for i in range(windows)]
        b0 = budget or 0
        bits = torch.stack([r.nll for r in runs]).mean(0) / math.log(2)
        records.append({
            "policy": name, "budget": budget,
            "bits_per_byte": bits.mean().item(),
            "bits_per_byte_beyond_train_len": bits[train_len:].mean().item(),
            "curve": _binned(bits, bin_width),
            "held": int(runs[0].held[-1]),
            "read": torch.stack([r.read for r in runs]).mean().item(),
            # per layer, over the steps where the budget binds (all of them for the full cache)
            "kept_mass": torch.stack([r.kept_mass[b0:] for r in runs]).mean((0, 1)).tolist(),
            "oracle_mass": torch.stack([r.oracle_mass[b0:] for r in runs]).mean((0, 1)).tolist(),
        })  # fmt: skip
        if progress:
            r = records[-1]
            beyond = r["bits_per_byte_beyond_train_len"]
            print(f"{name:>36} budget {budget}: {r['bits_per_byte']:.3f} bits/byte "
                  f"({beyond:.3f} beyond {train_len})", flush=True)  # fmt: skip
    return {
        "config": {"length": length, "windows": windows, "budgets": list(budgets),
                   "bin_width": bin_width, "train_len": train_len, "policies": list(POLICIES)},
        "records": records,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }  # fmt: skip


def stored_kv_budget() -> dict[str, Any]:
    """The stored run (``kv_budget_cpu.json`` beside this module)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments kv-budget",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = kv_budget_experiment(length=args.length, windows=args.windows,
                                  budgets=tuple(args.budgets))  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
