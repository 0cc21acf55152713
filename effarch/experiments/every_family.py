"""Every family on one benchmark (chapter 9.1): recall, time, memory, parameters, FLOPs.

    python -m effarch.experiments every-family --out effarch/experiments/every_family_cpu.json
    python -m effarch.experiments every-family --steps 20 --lengths 64 128 --out x.json

One representative of each family of the survey, all two-layer language models of the same
width built from the book's mixers (:data:`FAMILIES`), measured in one run on one device:

- **recall**: each is trained on multi-query associative recall (MQAR, chapter 2.5: 8
  key-value pairs in 32 tokens) with chapter 2.5's recipe, from one seed, and its held-out
  accuracy recorded (:func:`recall_model`);
- **cost**: the same layouts at a wider width go through
  :func:`~effarch.models.profile_models`: parameters, FLOPs per token, prefill time against
  ``T``, decode time per token and memory held per sequence against the context.

The stored CPU run (``every_family_cpu.json`` beside this module) is what the 9.1 page
shows; a GPU run (``--device cuda`` with longer ``--lengths``) is what the book will show at
scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..models.hybrid import HybridLM, decode_memory, decode_step_time
from ..models.profile import profile_models
from ..models.tinylm import TinyLM
from ..tasks import mqar
from ..train import evaluate, train
from .hybrid_decode import step_time_slopes

__all__ = [
    "CONFIG",
    "DECODE_CONFIG",
    "DECODE_STORED",
    "FAMILIES",
    "decode_experiment",
    "every_family_experiment",
    "family_model",
    "main",
    "main_decode",
    "recall_model",
    "stored",
    "stored_decode",
    "train_recall",
]

HERE = Path(__file__).resolve().parent
STORED = HERE / "every_family_cpu.json"

CONFIG: dict[str, Any] = {
    "seq_len": 32, "n_pairs": 8, "vocab_size": 64, "d_model": 32, "n_layers": 2,
    "steps": 500, "batch_size": 32, "lr": 1e-2, "n_eval": 500, "seed": 0,
    "profile_d_model": 128, "lengths": [128, 256, 512, 1024, 2048],
    "contexts": [128, 256, 512, 1024, 2048], "repeats": 5,
}  # fmt: skip
"""Task, training and measuring sizes of the stored CPU run (timings: the smallest of
``repeats`` interleaved rounds; of three runs with 3 rounds, one measured several rows at
2,048 tokens over a third slower than the other two did)."""

_SLOW_DECAY = {"A_init_range": (1.0, 1.0), "dt_min": 0.001, "dt_max": 0.01}
_RECALL_INIT = {"A_init_range": (0.01, 0.1), "dt_min": 0.05, "dt_max": 0.5}
"""Mamba-2's initialisation for recall (chapter 2.5): slow decays, so a pair read early is
still in the state when its query comes. The Mamba-2 row and both hybrids' Mamba-2 layers
start from it."""

FAMILIES: dict[str, dict[str, Any]] = {
    "MHA": {"family": "softmax attention", "pattern": "A", "mixers": {"A": ("attention", {})}},
    "GQA": {"family": "efficient full attention", "pattern": "A",
            "mixers": {"A": ("attention", {"n_heads": 4, "n_kv_heads": 1})}},
    "MLA": {"family": "efficient full attention", "pattern": "A",
            "mixers": {"A": ("mla", {"decode_impl": "absorb"})}},  # decodes as DeepSeek does
    "sliding window": {"family": "sparse attention", "pattern": "A",
                       "mixers": {"A": ("sliding_window", {"window": 16})}},
    "NSA": {"family": "sparse attention", "pattern": "A",
            "mixers": {"A": ("nsa", {"block": 8, "top_n": 2, "window": 16})}},
    "linear attention": {"family": "linear attention", "pattern": "A",
                         "mixers": {"A": ("linear_attention", {})}},
    "RetNet": {"family": "linear attention", "pattern": "A", "mixers": {"A": ("retnet", {})}},
    "GLA": {"family": "linear attention", "pattern": "A",
            "mixers": {"A": ("gla", {"gate_logit_normalizer": 64})}},
    "DeltaNet": {"family": "linear attention", "pattern": "A",
                 "mixers": {"A": ("deltanet", {})}},
    "Gated DeltaNet": {"family": "linear attention", "pattern": "A",
                       "mixers": {"A": ("gated_deltanet", dict(_SLOW_DECAY))}},
    "RWKV-7": {"family": "linear RNN", "pattern": "A", "mixers": {"A": ("rwkv7", {})}},
    "Mamba-2": {"family": "state space model", "pattern": "A",
                "mixers": {"A": ("mamba2", dict(_RECALL_INIT))}},
    "TTT-Linear": {"family": "test-time training", "pattern": "A",
                   "mixers": {"A": ("ttt_linear", {})}},
    "hybrid (Mamba-2 + attention)": {"family": "hybrid", "pattern": "MA",
        "mixers": {"M": ("mamba2", dict(_RECALL_INIT)), "A": ("attention", {})}},
    "hybrid (Mamba-2 + window)": {"family": "hybrid", "pattern": "MA",
        "mixers": {"M": ("mamba2", dict(_RECALL_INIT)), "A": ("sliding_window", {"window": 16})}},
    "MHA + MoE FFN": {"family": "sparse MoE", "pattern": "A", "ffn": "E",
                      "mixers": {"A": ("attention", {})},
                      "moe_kwargs": {"n_experts": 8, "k": 2}},
}  # fmt: skip
"""Name -> the survey family it stands for and its :class:`~effarch.models.HybridLM`
layout (pattern repeated over the layers, mixers, FFN letters, MoE arguments). MoE experts
have the dense FFN's width (``d_ff = 2 d``), so the MoE model has ``k`` = 2 times the dense
FFN's active parameters."""


def family_model(name: str, vocab_size: int, d_model: int, n_layers: int, seed: int) -> HybridLM:
    """The representative ``FAMILIES[name]`` at this size, initialised from ``seed``."""
    if name not in FAMILIES:
        raise ValueError(f"name must be one of {sorted(FAMILIES)}, got {name!r}")
    spec = FAMILIES[name]
    torch.manual_seed(seed)
    return HybridLM(
        vocab_size, d_model, spec["pattern"], spec["mixers"], ffn=spec.get("ffn", "D"),
        n_layers=n_layers, moe_kwargs=spec.get("moe_kwargs"),
    )  # fmt: skip


def recall_model(
    name: str, vocab_size: int, d_model: int, n_layers: int, seed: int
) -> TinyLM | HybridLM:
    """The model ``FAMILIES[name]`` is trained as on MQAR: a single-mixer layout is chapter
    2.5's :class:`~effarch.models.TinyLM` (its short convolution before mixers that have none
    of their own: the previous-token feature that recall builds on, and the recipe chapter
    2.5 trains with); a hybrid is its :class:`~effarch.models.HybridLM`, whose Mamba-2 layer
    has its own convolution."""
    if name not in FAMILIES:
        raise ValueError(f"name must be one of {sorted(FAMILIES)}, got {name!r}")
    spec = FAMILIES[name]
    if len(set(spec["pattern"])) > 1:
        return family_model(name, vocab_size, d_model, n_layers, seed)
    mixer, kwargs = spec["mixers"][spec["pattern"]]
    torch.manual_seed(seed)
    moe = spec.get("ffn", "D") == "E"
    return TinyLM(vocab_size, d_model, n_layers, mixer, mixer_kwargs=kwargs,
                  mlp="moe" if moe else "swiglu", moe_kwargs=spec.get("moe_kwargs"))  # fmt: skip


def train_recall(
    model: torch.nn.Module,
    *,
    steps: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    desc: str | None = None,
) -> dict[str, float]:
    """Train ``model`` on MQAR with the stored run's recipe and return its recall.

    The task, data seeds, batch size and learning rate are :data:`CONFIG`'s (8 pairs in 32
    tokens, ``steps`` steps, 500 held-out sequences), so a model of one's own gets a recall
    score comparable with the table's. ``model`` maps token ids ``[batch, seq]`` to logits
    ``[batch, seq, vocab]`` over ``CONFIG["vocab_size"]`` tokens.

    Returns ``{"accuracy", "final_loss", "train_seconds"}``: the held-out fraction of
    queries answered right, the last training loss and the training time.
    """
    c = dict(CONFIG, steps=steps or CONFIG["steps"])
    task = {"seq_len": c["seq_len"], "n_pairs": c["n_pairs"], "vocab_size": c["vocab_size"]}
    train_set = mqar(c["steps"] * c["batch_size"], seed=c["seed"], **task)
    eval_set = mqar(c["n_eval"], seed=c["seed"] + 1_000_003, **task)
    result = train(model.to(device), train_set, steps=c["steps"], batch_size=c["batch_size"],
                   lr=c["lr"], seed=c["seed"], progress=progress, desc=desc)  # fmt: skip
    return {
        "accuracy": evaluate(model, eval_set),
        "final_loss": result.losses[-1],
        "train_seconds": result.train_seconds,
    }


def every_family_experiment(
    *,
    steps: int | None = None,
    lengths: list[int] | None = None,
    contexts: list[int] | None = None,
    names: list[str] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train and measure every family of :data:`FAMILIES` (module docstring)."""
    c = dict(CONFIG, steps=steps or CONFIG["steps"])
    c["lengths"] = lengths or CONFIG["lengths"]
    c["contexts"] = contexts or CONFIG["contexts"]
    names = names or list(FAMILIES)
    start = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        model = recall_model(name, c["vocab_size"], c["d_model"], c["n_layers"], c["seed"])
        fit = train_recall(model, steps=c["steps"], device=device, progress=progress, desc=name)
        records[name] = {"family": FAMILIES[name]["family"], **fit}
        if progress:
            print(f"{name:>30}: recall {records[name]['accuracy']:.3f}", flush=True)
    wide = {
        n: family_model(n, c["vocab_size"], c["profile_d_model"], c["n_layers"], c["seed"])
        .to(device)
        .eval()
        for n in names
    }
    prof = profile_models(wide, lengths=c["lengths"], contexts=c["contexts"],
                          repeats=c["repeats"], seed=c["seed"])  # fmt: skip
    for name in names:
        records[name].update(prof["models"][name])
    return {"config": c, "records": records, "seconds": time.perf_counter() - start,
            "device": device, "torch": torch.__version__}  # fmt: skip


DECODE_STORED = HERE / "every_family_decode_cpu.json"
"""The card of the stored CPU decode run (:func:`decode_experiment`)."""
DECODE_CONFIG: dict[str, Any] = {"contexts": [1024, 4096, 16384], "batch": 32, "steps": 4,
                                 "repeats": 3, "device": "cpu"}  # fmt: skip
"""Sizes and device of the stored decode run (the profile's width and depth, :data:`CONFIG`)."""


def decode_experiment(
    names: list[str] | None = None, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Decode step time where the bytes read dominate, for every family.

    Each representative (:func:`family_model` at the profile's width) decodes a batch of
    ``batch`` sequences after each context (:func:`~effarch.models.decode_step_time`), and
    holds :func:`~effarch.models.decode_memory`'s bytes per sequence there. Per family, the
    card keeps the step times, the bytes held, the fit ``t(T) = a + b T``
    (:func:`~effarch.experiments.hybrid_decode.step_time_slopes`) and the bytes held per
    token of context (the slope of memory in ``T``): a step that must read all it holds has
    ``b`` proportional to them.
    """
    c = {**CONFIG, **DECODE_CONFIG, **(config or {})}
    names = names or list(FAMILIES)
    start = time.perf_counter()
    models = {
        n: family_model(n, c["vocab_size"], c["profile_d_model"], c["n_layers"], c["seed"])
        .to(c["device"])
        .eval()
        for n in names
    }
    times = decode_step_time(models, c["contexts"], steps=c["steps"], repeats=c["repeats"],
                             batch=c["batch"], seed=c["seed"])  # fmt: skip
    fits = step_time_slopes(times)  # t(T) = a + b T per family
    records = {}
    for n, m in models.items():
        held = decode_memory(m, c["contexts"])["total"]
        records[n] = {
            "family": FAMILIES[n]["family"],
            "decode_seconds": times[n],
            "memory_bytes": held,
            "intercept": fits[n][0],
            "slope": fits[n][1],
            "bytes_per_token": (held[-1] - held[0]) / (c["contexts"][-1] - c["contexts"][0]),
        }
    return {"config": c, "records": records, "seconds": time.perf_counter() - start,
            "torch": torch.__version__}  # fmt: skip


def stored_decode() -> dict[str, Any]:
    """The stored CPU decode run (:data:`DECODE_STORED`)."""
    return json.loads(DECODE_STORED.read_text())


def main_decode(argv: list[str] | None = None) -> None:
    """``python -m effarch.experiments every-family-decode --out FILE``."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments every-family-decode")
    p.add_argument("--out", type=Path, default=DECODE_STORED)
    p.add_argument("--names", nargs="+", default=None, choices=list(FAMILIES))
    p.add_argument("--contexts", type=int, nargs="+", default=DECODE_CONFIG["contexts"])
    p.add_argument("--batch", type=int, default=DECODE_CONFIG["batch"])
    p.add_argument("--device", default=DECODE_CONFIG["device"])
    args = p.parse_args(argv)
    card = decode_experiment(args.names, {"contexts": args.contexts, "batch": args.batch,
                                          "device": args.device})  # fmt: skip
    args.out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out} ({card['seconds']:.0f} s)")


def stored() -> dict[str, Any]:
    """The stored CPU run (``every_family_cpu.json`` beside this module)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m effarch.experiments every-family",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=None)
    p.add_argument("--names", nargs="+", default=None, choices=list(FAMILIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = every_family_experiment(steps=args.steps, lengths=args.lengths,
                                     contexts=args.contexts, names=args.names,
                                     device=args.device)  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
