"""Decode step time of the hybrid layouts where the bytes read dominate (chapter 6.1).

    python -m effarch.experiments hybrid-decode --out effarch/experiments/hybrid_decode_cpu.json

Chapter 6.1 times single-token decoding steps of six layouts (all attention, all Mamba,
Jamba, Samba, MiniMax-01, YOCO) at the contexts a notebook affords, with a batch of four:
there a step is mostly the fixed cost of calling eight layers, and the reads that grow
with the context are a small part of it. This run decodes a batch of ``batch`` sequences at
contexts up to ``contexts[-1]``, where the keys and values an attention layer reads in one
step (``2 T d`` numbers per sequence) are hundreds of megabytes, so that the slope of the
step time in ``T`` shows what each layout reads: eight attention layers, one (Jamba,
MiniMax-01), the cross-decoder's four readers of one shared cache (YOCO), or nothing that
grows (all Mamba; Samba's window). Models are built as on the page
(:func:`decode_layouts`), timed by :func:`~effarch.models.decode_step_time`, and each
layout's times are fitted by ``t(T) = a + b T`` (:func:`step_time_slopes`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..bench import fit_line
from ..models import YOCOLM, HybridLM, decode_step_time

__all__ = [
    "CONFIG",
    "READERS",
    "STORED",
    "decode_layouts",
    "hybrid_decode_experiment",
    "main",
    "step_time_slopes",
    "stored_hybrid_decode",
]

HERE = Path(__file__).resolve().parent
STORED = HERE / "hybrid_decode_cpu.json"
"""The card of the stored CPU run."""

CONFIG: dict[str, Any] = {
    "d_model": 64, "vocab": 256, "contexts": [1024, 4096, 16384], "batch": 64, "steps": 4,
    "repeats": 3, "device": "cpu",
}  # fmt: skip
"""Sizes of the stored CPU run (the page's layouts at its CPU width) and its device."""

READERS = {"all attention": 8, "all Mamba": 0, "jamba": 1, "samba": 0, "minimax": 1, "yoco": 4}
"""Layers that read a cache growing with the context in each step, per layout (YOCO: the
four cross-decoder layers read the one shared cache; Samba's windows of 16 stop growing at
15 held tokens)."""


def decode_layouts(d_model: int = 64, vocab: int = 256) -> dict[str, torch.nn.Module]:
    """The six eight-layer layouts of chapter 6.1, seeded and built as on the page (Jamba
    with 4 experts, top-2; YOCO with a 64-token window in its self-decoder), in eval mode."""
    torch.manual_seed(0)
    out: dict[str, torch.nn.Module] = {
        "all attention": HybridLM(vocab, d_model, "A", {"A": ("attention", {"n_heads": 2})},
                                  n_layers=8),
        "all Mamba": HybridLM(vocab, d_model, "M", {"M": ("mamba", {})}, n_layers=8),
    }  # fmt: skip
    for name in ("jamba", "samba", "minimax"):
        torch.manual_seed(0)
        kw = {"moe_kwargs": {"n_experts": 4, "k": 2}} if name == "jamba" else {}
        out[name] = HybridLM.preset(name, vocab, d_model, 8, **kw)
    torch.manual_seed(0)
    out["yoco"] = YOCOLM(vocab, d_model, 8, n_heads=2, n_kv_heads=2,
                         self_mixer=("sliding_window", {"window": 64}))  # fmt: skip
    return {k: m.eval() for k, m in out.items()}


def step_time_slopes(times: dict[str, list[Any]]) -> dict[str, tuple[float, float]]:
    """Least-squares ``t(T) = a + b T`` per layout of a :func:`decode_step_time` result
    (:func:`~effarch.bench.fit_line`): ``{name: (a seconds, b seconds per token of
    context)}``."""
    if len(times["context"]) < 2:
        raise ValueError(f"need at least two contexts to fit a slope, got {times['context']}")
    fits = {}
    for name, values in times.items():
        if name != "context":
            line = fit_line(times["context"], values)
            fits[name] = (line.intercept, line.slope)
    return fits


def hybrid_decode_experiment(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time every layout of :func:`decode_layouts` at ``config``'s contexts and batch; return
    the card (``config``, the times as :func:`~effarch.models.decode_step_time` returns
    them, the fitted slopes, the readers per layout, seconds and the torch version)."""
    cfg = {**CONFIG, **(config or {})}
    start = time.perf_counter()
    models = {
        n: m.to(cfg["device"]) for n, m in decode_layouts(cfg["d_model"], cfg["vocab"]).items()
    }
    times = decode_step_time(models, cfg["contexts"], steps=cfg["steps"],
                             repeats=cfg["repeats"], batch=cfg["batch"])  # fmt: skip
    return {
        "config": cfg,
        "times": times,
        "slopes": step_time_slopes(times),
        "readers": READERS,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def stored_hybrid_decode() -> dict[str, Any]:
    """The stored CPU card (:data:`STORED`)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m effarch.experiments hybrid-decode")
    parser.add_argument("--out", type=Path, default=STORED)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONFIG["contexts"])
    parser.add_argument("--batch", type=int, default=CONFIG["batch"])
    parser.add_argument("--device", default=CONFIG["device"])
    args = parser.parse_args(argv)
    card = hybrid_decode_experiment({"contexts": args.contexts, "batch": args.batch,
                                     "device": args.device})  # fmt: skip
    args.out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out} ({card['seconds']:.0f} s)")
