"""Training with experts: MoE against dense at equal active compute (chapter 5.2), and a
trained dense model upcycled into an MoE against continuing it dense or starting an MoE from
scratch (chapter 5.3).

    python -m effarch.experiments moe-vs-dense --out effarch/experiments/moe_vs_dense_cpu.json
    python -m effarch.experiments moe-upcycle --out effarch/experiments/moe_upcycle_cpu.json
    python -m effarch.experiments moe-vs-dense --steps 40 --out x.json   # a quick look

Every model is chapter 5.1's byte-level TinyLM (attention mixer, width 64, 2 blocks) on the
standard-library text of chapter 3, from the same batches; MoE layers are balanced by
DeepSeek-V3's loss-free bias (speed 0.001, the best of chapter 5.1's run) and run the
grouped path.

``moe-vs-dense`` trains, for the same steps (:data:`DENSE_MODELS`): a dense SwiGLU FFN as
wide as two experts (the MoE's active compute), a dense FFN as wide as all experts (its total
parameters), 8 experts top-2, and fine-grained experts (DeepSeekMoE: 32 experts of a quarter
width, top-8, with and without one of them shared) at the same active compute.

``moe-upcycle`` trains the dense model of the same active width for ``pretrain`` steps,
then spends ``extra`` more steps (the same batches for every arm, drawn after the
pretraining's) on each of: continuing the dense model; the upcycled model (every FFN copied
into 8 experts, top-2, 1% noise, :func:`~effarch.models.upcycle_tinylm`); an MoE of the same
shape from scratch for the ``extra`` steps only, and for ``pretrain + extra`` steps (the
whole budget). Each continuation starts a fresh warmup-and-cosine schedule.

Both record the training loss at every step and the held-out loss (bits per byte) every
``eval_every`` steps, with each model's total and active parameters.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..models.bytelm import bits_per_byte
from ..models.tinylm import TinyLM, upcycle_tinylm
from ..moe import expert_load, update_bias
from ..tasks.text import byte_batches, heldout_windows, stdlib_corpus
from ..train import train

__all__ = [
    "CONFIG",
    "DENSE_MODELS",
    "STORED_UPCYCLE",
    "STORED_VS_DENSE",
    "active_parameters",
    "heldout_bits",
    "main_upcycle",
    "main_vs_dense",
    "moe_upcycle_experiment",
    "moe_vs_dense_experiment",
    "stored_moe_upcycle",
    "stored_moe_vs_dense",
]

STORED_VS_DENSE = Path(__file__).resolve().parent / "moe_vs_dense_cpu.json"
STORED_UPCYCLE = Path(__file__).resolve().parent / "moe_upcycle_cpu.json"

CONFIG: dict[str, Any] = {
    "d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 128, "batch_size": 16,
    "steps": 600, "lr": 3e-3, "seed": 0, "eval_windows": 32, "eval_every": 50,
    "bias_speed": 1e-3, "pretrain": 400, "extra": 300, "upcycle_experts": 8, "upcycle_k": 2,
    "upcycle_noise": 0.01,
}  # fmt: skip
"""The data, training and shared model settings of both experiments."""

DENSE_MODELS: dict[str, dict[str, Any]] = {
    "dense, d_ff 64 (= active)": {"d_ff": 64},
    "dense, d_ff 256 (= total)": {"d_ff": 256},
    "MoE 8 x 32, top-2": {"d_ff": 32, "n_experts": 8, "k": 2},
    "fine 32 x 8, top-8": {"d_ff": 8, "n_experts": 32, "k": 8},
    "fine 31 x 8, top-7 + 1 shared": {"d_ff": 8, "n_experts": 31, "k": 7, "n_shared": 1},
}
"""``moe-vs-dense``'s models: name -> FFN settings (``n_experts`` present: an MoE)."""


def _model(c: dict[str, Any], ffn: dict[str, Any]) -> TinyLM:
    torch.manual_seed(c["seed"])
    kw: dict[str, Any] = dict(mixer_kwargs={"n_heads": c["n_heads"]}, d_ff=ffn["d_ff"])
    if "n_experts" in ffn:
        moe = {key: ffn[key] for key in ("n_experts", "k", "n_shared") if key in ffn}
        kw.update(mlp="moe", moe_kwargs=dict(moe, impl="grouped"))
    return TinyLM(257, c["d_model"], c["n_layers"], "attention", **kw)


def active_parameters(model: TinyLM) -> int:
    """Parameters a token uses: all of them, except each MoE layer's unchosen experts."""
    total = model.num_parameters()
    for layer in model.moe_layers():
        total -= sum(p.numel() for p in layer.parameters()) - layer.active_parameters()
    return total


def heldout_bits(model: TinyLM, held: tuple[torch.Tensor, torch.Tensor]) -> float:
    """:func:`~effarch.models.bytelm.bits_per_byte` on ``held = (inputs, targets)``, in eval
    mode, the model's mode restored afterwards."""
    was = model.training
    model.eval()
    bits = bits_per_byte(model, *held)
    model.train(was)
    return bits


def _train(model: TinyLM, c: dict[str, Any], data, held, steps: int, name: str,
           progress: bool) -> dict[str, Any]:  # fmt: skip
    layers = model.moe_layers()
    evals: list[tuple[int, float]] = [(0, heldout_bits(model, held))]

    def after(m, step):
        for layer in layers:
            load = expert_load(layer.routing.experts, layer.n_experts)
            update_bias(layer.gate.e_score_correction_bias, load, c["bias_speed"])
        if (step + 1) % c["eval_every"] == 0 or step + 1 == steps:
            evals.append((step + 1, heldout_bits(model, held)))

    result = train(model, data, steps=steps, lr=c["lr"], seed=c["seed"], after_step=after,
                   progress=progress, desc=name)  # fmt: skip
    record = {
        "name": name, "train_loss": result.losses, "eval": evals,
        "heldout_bits_per_byte": evals[-1][1], "parameters": model.num_parameters(),
        "active_parameters": active_parameters(model), "seconds": result.train_seconds,
    }  # fmt: skip
    if progress:
        print(f"{name:>32}: held-out {record['heldout_bits_per_byte']:.3f} bits/byte, "
              f"{record['parameters']} params ({record['active_parameters']} active)",
              flush=True)  # fmt: skip
    return record


def _setup(c: dict[str, Any]):
    corpus = stdlib_corpus()
    data = byte_batches(corpus.train, c["seq_len"], c["batch_size"], seed=c["seed"])
    held = heldout_windows(corpus.heldout, c["seq_len"], c["eval_windows"])
    return data, held


def moe_vs_dense_experiment(
    *, steps: int | None = None, models: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train every model of :data:`DENSE_MODELS` for the same steps (module docstring)."""
    c = dict(CONFIG, steps=steps or CONFIG["steps"])
    data, held = _setup(c)
    start = time.perf_counter()
    records = []
    for name in models or list(DENSE_MODELS):
        model = _model(c, DENSE_MODELS[name])
        records.append(_train(model, c, data, held, c["steps"], name, progress) | {
            "ffn": DENSE_MODELS[name]})  # fmt: skip
    return {"config": c, "records": records, "seconds": time.perf_counter() - start,
            "torch": torch.__version__}  # fmt: skip


def moe_upcycle_experiment(
    *, pretrain: int | None = None, extra: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Dense pretraining, then four ways of spending ``extra`` more steps (module docstring)."""
    c = dict(CONFIG)
    c["pretrain"] = pretrain or c["pretrain"]
    c["extra"] = extra or c["extra"]
    p, e = c["pretrain"], c["extra"]
    data, held = _setup(c)

    def later(step: int):  # the continuation's batches: those after the pretraining's
        return data(step + p)

    start = time.perf_counter()
    dense_ffn = DENSE_MODELS["dense, d_ff 64 (= active)"]
    moe_ffn = {"d_ff": dense_ffn["d_ff"], "n_experts": c["upcycle_experts"], "k": c["upcycle_k"]}
    base = _model(c, dense_ffn)
    records = [_train(base, c, data, held, p, "dense pretraining", progress)]
    upcycled = upcycle_tinylm(base, c["upcycle_experts"], c["upcycle_k"],
                              noise=c["upcycle_noise"], seed=c["seed"])  # fmt: skip
    for layer in upcycled.moe_layers():
        layer.impl = "grouped"
    arms = [
        ("dense, continued", copy.deepcopy(base), later, e),
        ("upcycled MoE", upcycled, later, e),
        ("MoE from scratch, extra steps", _model(c, moe_ffn), later, e),
        ("MoE from scratch, all steps", _model(c, moe_ffn), data, p + e),
    ]
    for name, model, batches, steps in arms:
        records.append(_train(model, c, batches, held, steps, name, progress))
    return {"config": c, "records": records, "seconds": time.perf_counter() - start,
            "torch": torch.__version__}  # fmt: skip


def stored_moe_vs_dense() -> dict[str, Any]:
    """The stored ``moe-vs-dense`` run (``moe_vs_dense_cpu.json`` beside this module)."""
    return json.loads(STORED_VS_DENSE.read_text())


def stored_moe_upcycle() -> dict[str, Any]:
    """The stored ``moe-upcycle`` run (``moe_upcycle_cpu.json`` beside this module)."""
    return json.loads(STORED_UPCYCLE.read_text())


def _parser(prog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m effarch.experiments {prog}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main_vs_dense(argv: list[str] | None = None) -> None:
    """Command line of ``moe-vs-dense``: see the module docstring."""
    p = _parser("moe-vs-dense")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--models", nargs="+", default=None, choices=list(DENSE_MODELS))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = moe_vs_dense_experiment(steps=args.steps, models=args.models)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


def main_upcycle(argv: list[str] | None = None) -> None:
    """Command line of ``moe-upcycle``: see the module docstring."""
    p = _parser("moe-upcycle")
    p.add_argument("--pretrain", type=int, default=None)
    p.add_argument("--extra", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = moe_upcycle_experiment(pretrain=args.pretrain, extra=args.extra)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
