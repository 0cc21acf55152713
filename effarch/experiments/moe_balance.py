"""Expert load balance during training: none, an auxiliary loss, or the loss-free bias
(chapter 5.1).

    python -m effarch.experiments moe-balance --out effarch/experiments/moe_balance_cpu.json
    python -m effarch.experiments moe-balance --steps 50 --out x.json   # a quick look

Trains one small byte-level TinyLM with MoE feed-forward layers (attention mixer, 8 SwiGLU
experts of width 32 per layer, top-2, Mixtral's softmax router) per strategy, on the
standard-library text of chapter 3, from the same initialisation and batches:

- ``none``: the cross-entropy alone;
- ``aux a``: plus ``a`` times the Switch/GShard loss of every MoE layer
  (:func:`~effarch.moe.load_balancing_loss`, averaged over layers);
- ``bias g``: DeepSeek-V3's auxiliary-loss-free update with speed ``g`` after every step
  (:func:`~effarch.moe.update_bias` on each layer's selection bias).

Every step records each layer's MaxVio and coefficient of variation over the batch's
tokens; at the end, the held-out loss (bits per byte) and the fraction of assignments a
capacity limit would drop, per capacity factor (capacity per sequence, Switch's grouping).
The page of chapter 5.1 plots the stored file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.tinylm import TinyLM
from ..moe import (
    apply_capacity,
    coefficient_of_variation,
    dropped_fraction,
    expert_capacity,
    expert_load,
    load_balancing_loss,
    max_violation,
    update_bias,
)
from ..tasks.text import byte_batches, heldout_windows, stdlib_corpus
from ..train import train

__all__ = ["CONFIG", "STORED", "STRATEGIES", "main", "moe_balance_experiment", "stored_moe_balance"]

STORED = Path(__file__).resolve().parent / "moe_balance_cpu.json"
"""The stored CPU run (the page plots it)."""

CONFIG: dict[str, Any] = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_experts": 8, "k": 2, "d_ff": 32,
    "seq_len": 128, "batch_size": 16, "steps": 400, "lr": 3e-3, "seed": 0,
    "capacity_factors": [0.5, 0.75, 1.0, 1.25, 1.5, 2.0], "eval_windows": 32,
}  # fmt: skip
"""The model, data and training of every run."""

STRATEGIES: dict[str, tuple[str, float]] = {
    "none": ("none", 0.0),
    "aux 0.001": ("aux", 1e-3),
    "aux 0.01": ("aux", 1e-2),
    "aux 0.1": ("aux", 1e-1),
    "bias 0.001": ("bias", 1e-3),
    "bias 0.01": ("bias", 1e-2),
}
"""Strategy name -> (kind, strength: alpha of the loss or gamma of the bias)."""


def _model(c: dict[str, Any]) -> TinyLM:
    torch.manual_seed(c["seed"])
    return TinyLM(257, c["d_model"], c["n_layers"], "attention",
                  mixer_kwargs={"n_heads": c["n_heads"]}, d_ff=c["d_ff"], mlp="moe",
                  moe_kwargs={"n_experts": c["n_experts"], "k": c["k"]})  # fmt: skip


def _run(name: str, c: dict[str, Any], data, held: tuple[torch.Tensor, torch.Tensor],
         progress: bool) -> dict[str, Any]:  # fmt: skip
    kind, strength = STRATEGIES[name]
    model = _model(c)
    layers = model.moe_layers()
    maxvio: list[list[float]] = []
    cv: list[list[float]] = []

    def aux(m):
        if kind != "aux":
            return torch.zeros(())
        return strength * sum(load_balancing_loss(layer.routing.logits, layer.routing.experts)
                              for layer in layers) / len(layers)  # fmt: skip

    def after(m, step):
        loads = [expert_load(layer.routing.experts, c["n_experts"]) for layer in layers]
        maxvio.append([max_violation(x).item() for x in loads])
        cv.append([coefficient_of_variation(x).item() for x in loads])
        if kind == "bias":
            for layer, load in zip(layers, loads, strict=True):
                update_bias(layer.gate.e_score_correction_bias, load, strength)

    result = train(model, data, steps=c["steps"], lr=c["lr"], seed=c["seed"], aux_loss=aux,
                   after_step=after, progress=progress, desc=name)  # fmt: skip
    model.eval()
    x, y = held
    with torch.no_grad():
        logits = model(x)
    bits = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item() / math.log(2)
    dropped = {}
    for cf in c["capacity_factors"]:
        cap = expert_capacity(c["seq_len"], c["n_experts"], c["k"], cf)
        fractions = []
        for layer in layers:
            experts = layer.routing.experts.view(x.shape[0], c["seq_len"], c["k"])
            fractions.append(dropped_fraction(apply_capacity(experts, c["n_experts"], cap)[1]))
        dropped[str(cf)] = [f.item() for f in fractions]
    final_load = [expert_load(layer.routing.experts, c["n_experts"]).tolist() for layer in layers]
    return {
        "strategy": name, "kind": kind, "strength": strength,
        "train_loss": result.losses, "maxvio": maxvio, "cv": cv,
        "heldout_bits_per_byte": bits, "dropped": dropped, "heldout_load": final_load,
        "heldout_maxvio": [max_violation(torch.tensor(x)).item() for x in final_load],
        "seconds": result.train_seconds,
    }  # fmt: skip


def moe_balance_experiment(
    *, steps: int | None = None, strategies: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every strategy (module docstring); returns the records as a dict."""
    c = dict(CONFIG, steps=steps or CONFIG["steps"])
    names = strategies or list(STRATEGIES)
    corpus = stdlib_corpus()
    data = byte_batches(corpus.train, c["seq_len"], c["batch_size"], seed=c["seed"])
    held = heldout_windows(corpus.heldout, c["seq_len"], c["eval_windows"])
    start = time.perf_counter()
    records = []
    for name in names:
        records.append(_run(name, c, data, held, progress))
        r = records[-1]
        if progress:
            print(f"{name:>11}: held-out {r['heldout_bits_per_byte']:.3f} bits/byte, final MaxVio "
                  f"{[round(v, 2) for v in r['maxvio'][-1]]}", flush=True)  # fmt: skip
    return {"config": c, "strategies": STRATEGIES, "records": records,
            "seconds": time.perf_counter() - start, "torch": torch.__version__}  # fmt: skip


def stored_moe_balance() -> dict[str, Any]:
    """The stored run (``moe_balance_cpu.json`` beside this module)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments moe-balance",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--strategies", nargs="+", default=None, choices=list(STRATEGIES))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = moe_balance_experiment(steps=args.steps, strategies=args.strategies)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
