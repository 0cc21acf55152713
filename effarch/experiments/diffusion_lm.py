"""Masked diffusion and autoregressive models of the same size on the same data (chapter 7).

    python -m effarch.experiments diffusion-lm --out-dir effarch/experiments
    python -m effarch.experiments diffusion-lm --tasks perm --steps 100 --out-dir /tmp/x

Trains, for each task, a :class:`~effarch.diffusion.DiffusionLM` as a masked diffusion model
(bidirectional, LLaDA's loss: :func:`~effarch.diffusion.masked_diffusion_loss`) and the same
network with the causal mask as an autoregressive model (next-token cross-entropy), from the
same initialisation, on the same batches, for the same steps:

- ``perm``: :func:`~effarch.tasks.perm_copy` with ``n = 8`` symbols (16 tokens), whose
  samples can be checked exactly;
- ``text``: 64-byte windows of the standard-library text of chapter 3.

For text, chapter 7.2's models too, same size, data and recipe:

- ``block4``, ``block16``: block diffusion (BD3-LM) with blocks of 4 and 16 bytes
  (:func:`~effarch.diffusion.block_diffusion_loss`); with ``ar`` (blocks of 1) and
  ``diffusion`` (one block of 64) they make the block-size sweep;
- ``adapted``: the trained ``ar`` model turned into a diffusion model
  (:func:`~effarch.diffusion.from_autoregressive`: the shift, then attention-mask annealing
  over ``anneal_steps``) and trained ``adapt_steps`` with the diffusion loss; ``scratch``:
  a diffusion model trained from scratch for the same ``adapt_steps``.

Vocabulary: the task's symbols, then the mask token, then BOS (the AR model's first input),
so both models have the same parameters. Each model's float16 weights are stored as
``diffusion_<task>_<kind>.pt`` (under 4 MB) beside a card ``diffusion_lm_cpu.json``: the
configuration, the loss curves and the held-out negative log-likelihood per token (the AR
model's exact cross-entropy, the diffusion model's ELBO bound from LLaDA's estimator).
:func:`load_diffusion_model` loads them; the pages of chapter 7 use them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_tensor
from ..diffusion import (
    DiffusionLM,
    DiffusionLMConfig,
    ShiftedDenoiser,
    annealed_mask,
    block_diffusion_loss,
    block_elbo_samples,
    elbo_samples,
    forward_process,
    from_autoregressive,
    masked_diffusion_loss,
)
from ..models.bytelm import bits_per_byte, bits_per_byte_per_row, load_bytelm
from ..tasks import perm_copy
from ..tasks.text import byte_batches, heldout_windows, stdlib_corpus
from ..train import train

__all__ = ["CONFIG", "KINDS", "STORED", "byte_entropy", "diffusion_lm_experiment", "heldout",
           "heldout_nll", "judge_bits", "judge_bits_per_sample", "load_diffusion_model", "main",
           "stored_diffusion_lm", "task_kinds", "task_vocab"]  # fmt: skip

HERE = Path(__file__).resolve().parent
STORED = HERE / "diffusion_lm_cpu.json"
"""The card of the stored CPU run."""

CONFIG: dict[str, dict[str, Any]] = {
    "perm": {"n": 8, "d_model": 64, "n_layers": 4, "n_heads": 4, "d_ff": 192,
             "steps": 3000, "batch_size": 128, "lr": 3e-3, "eval_rows": 512},
    "text": {"seq_len": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 384,
             "steps": 4000, "batch_size": 32, "lr": 3e-3, "eval_rows": 256,
             "block_sizes": [4, 16], "adapt_steps": 1000, "anneal_steps": 500},
}  # fmt: skip
"""Model and training sizes of the stored CPU run, per task."""

KINDS = ("diffusion", "ar", "block4", "block16", "adapted", "scratch")
"""Every kind of model; ``perm`` trains the first two, ``text`` all."""


def task_kinds(task: str) -> tuple[str, ...]:
    """The kinds of model the stored run trains for ``task``."""
    return KINDS if task == "text" else KINDS[:2]


def task_vocab(task: str) -> dict[str, int]:
    """``{"vocab_size", "mask_id", "bos_id", "symbols"}`` of a task's models."""
    if task not in CONFIG:
        raise ValueError(f"task must be one of {sorted(CONFIG)}, got {task!r}")
    symbols = CONFIG["perm"]["n"] if task == "perm" else 256
    return {"symbols": symbols, "mask_id": symbols, "bos_id": symbols + 1,
            "vocab_size": symbols + 2}  # fmt: skip


def _model(task: str, kind: str, seed: int) -> DiffusionLM:
    c = CONFIG[task]
    torch.manual_seed(seed)
    cfg = DiffusionLMConfig(task_vocab(task)["vocab_size"], d_model=c["d_model"],
                            n_layers=c["n_layers"], n_heads=c["n_heads"], d_ff=c["d_ff"],
                            causal=kind == "ar")  # fmt: skip
    return DiffusionLM(cfg)


def _batches(task: str, seed: int):
    """``step -> (inputs, targets)``: AR inputs ``[BOS, x_0 .. x_{L-2}]``, targets ``x``."""
    c, v = CONFIG[task], task_vocab(task)
    if task == "perm":

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            x = perm_copy(c["batch_size"], c["n"], generator=g)
            bos = torch.full((len(x), 1), v["bos_id"], dtype=torch.long)
            return torch.cat([bos, x[:, :-1]], 1), x

        return batch
    text = byte_batches(stdlib_corpus().train, c["seq_len"], c["batch_size"], seed=seed)
    return lambda step: _to_bos(*text(step), v["bos_id"])


def _to_bos(inputs: torch.Tensor, targets: torch.Tensor, bos: int):
    inputs = inputs.clone()
    inputs[:, 0] = bos  # the corpus's BOS is 256, which is this vocabulary's mask token
    return inputs, targets


def heldout(task: str) -> torch.Tensor:
    """The held-out clean sequences ``x [N, L]`` of a task (deterministic)."""
    c = CONFIG[task]
    if task == "perm":
        return perm_copy(c["eval_rows"], c["n"], generator=torch.Generator().manual_seed(10**6))
    return heldout_windows(stdlib_corpus().heldout, c["seq_len"], c["eval_rows"])[1]


@torch.no_grad()
def heldout_nll(model: nn.Module, task: str, *, block_size: int | None = None,
                n_samples: int = 16) -> float:  # fmt: skip
    """Negative log-likelihood per token (nats) on :func:`heldout`: the AR model's exact
    cross-entropy; a diffusion model's ELBO bound (LLaDA's count estimator, averaged over
    ``n_samples`` draws per sequence), per block with ``block_size``."""
    x, v = heldout(task), task_vocab(task)
    model.eval()
    if isinstance(model, DiffusionLM) and model.cfg.causal:
        inputs = torch.cat([torch.full((len(x), 1), v["bos_id"]), x[:, :-1]], 1)
        logits = model(inputs).float()
        return F.cross_entropy(logits.flatten(0, 1), x.flatten()).item()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for i in range(0, len(x), 64):
        if block_size is None:
            e = elbo_samples(model, x[i : i + 64], v["mask_id"], n_samples, generator=g)
        else:
            e = block_elbo_samples(model, x[i : i + 64], block_size, v["mask_id"], n_samples,
                                   generator=g)  # fmt: skip
        total += e.mean(0).sum().item()
    return total / x.numel()


@functools.cache
def _judge() -> nn.Module:
    return load_bytelm()[0]


def _judge_inputs(tokens: torch.Tensor) -> torch.Tensor:
    """The judge's inputs for bytes ``tokens [N, L]``: ``[BOS, x_0 .. x_{L-2}]`` per row
    (BOS = 256), after checking that ``tokens`` holds int64 bytes."""
    check_tensor("tokens", tokens, ndim=2, dtypes=(torch.long,))
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < 256):
        raise ValueError(
            f"tokens must be bytes in [0, 255], got values in [{int(tokens.min())}, "
            f"{int(tokens.max())}]"
        )
    return torch.cat([torch.full((len(tokens), 1), 256), tokens[:, :-1]], 1)


@torch.no_grad()
def judge_bits(tokens: torch.Tensor) -> float:
    """How plausible byte sequences are to a third model: bits per byte.

    ``tokens [N, L]`` int64 bytes (0..255) are scored by chapter 3's trained byte model
    (:func:`~effarch.models.load_bytelm`), which reads ``[BOS, x_0 .. x_{L-2}]`` and
    predicts ``x``: ``-(1 / (N L)) sum_i log2 p(x_i | x_{<i})``. Neither model of this
    experiment was trained against it, so it judges both kinds of samples alike. Lower is
    more plausible; report :func:`byte_entropy` beside it, since a sampler that collapses
    onto a few frequent bytes also scores well.
    """
    return bits_per_byte(_judge(), _judge_inputs(tokens), tokens)


def judge_bits_per_sample(tokens: torch.Tensor) -> torch.Tensor:
    """:func:`judge_bits` of each row of ``tokens [N, L]``, in one pass of the judge:
    ``[N]`` float64 bits per byte (their mean is :func:`judge_bits`, up to rounding), for a
    standard error over samples (:func:`~effarch.models.bytelm.bits_per_byte_per_row`)."""
    return bits_per_byte_per_row(_judge(), _judge_inputs(tokens), tokens)


def byte_entropy(tokens: torch.Tensor) -> float:
    """Entropy in bits of the byte histogram of ``tokens`` (any shape), ``-sum_b p_b log2 p_b``:
    how varied a set of samples is (English text: about 4.5 bits)."""
    p = torch.bincount(tokens.flatten(), minlength=256).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log2()).sum().item()


def _train_one(
    task: str, kind: str, steps: int | None, seed: int, models: dict[str, nn.Module]
) -> tuple[nn.Module, dict]:
    c = CONFIG[task]
    v = task_vocab(task)
    mask_id = v["mask_id"]
    g = torch.Generator().manual_seed(seed + 1)
    block = int(kind[5:]) if kind.startswith("block") else None
    n_steps = steps or c["steps"]
    after_step = None
    if kind == "adapted":
        if "ar" not in models:
            raise ValueError("the adapted model starts from the ar model: train ar first")
        model = from_autoregressive(models["ar"], v["bos_id"])
        n_steps = steps or c["adapt_steps"]
        anneal = c["anneal_steps"] if steps is None else max(1, steps // 2)

        def after_step(m: nn.Module, step: int) -> None:
            m.mask_mod = None if step + 1 >= anneal else annealed_mask((step + 1) / anneal)

    else:
        model = _model(task, "ar" if kind == "ar" else "diffusion", seed)
        if kind == "scratch":
            n_steps = steps or c["adapt_steps"]

    def diffusion_loss(m, inputs, targets):
        if block is not None:
            return block_diffusion_loss(m, targets, block, mask_id, generator=g)
        xt, masked, t = forward_process(targets, mask_id, generator=g)
        return masked_diffusion_loss(m(xt), targets, masked, t)

    t0 = time.perf_counter()
    res = train(model, _batches(task, seed), steps=n_steps, lr=c["lr"],
                loss_fn=None if kind == "ar" else diffusion_loss, after_step=after_step,
                desc=f"{task} {kind}", seed=seed)  # fmt: skip
    if kind == "adapted":
        model.mask_mod = None
    nll = heldout_nll(model, task, block_size=block)
    every = max(1, len(res.losses) // 200)
    record = {
        "task": task, "kind": kind, "steps": res.steps, "seconds": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_size": block, "loss_every": every, "losses": res.losses[::every],
        "heldout_nll": nll, "heldout_bits": nll / math.log(2),
    }  # fmt: skip
    return model, record


def diffusion_lm_experiment(
    out_dir: Path,
    *,
    tasks: list[str] | None = None,
    kinds: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train every (task, kind), store the weights under ``out_dir``; return the card.

    ``kinds`` restricts the kinds (an ``adapted`` run loads the stored ``ar`` weights when it
    does not train them). The card's ``config`` is :data:`CONFIG` as written; a ``steps``
    override shows in each run's ``steps``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card: dict[str, Any] = {"config": CONFIG, "seed": seed, "runs": []}
    t0 = time.perf_counter()
    for task in tasks or list(CONFIG):
        models: dict[str, nn.Module] = {}
        for kind in task_kinds(task):
            if kinds is not None and kind not in kinds:
                continue
            if kind == "adapted" and "ar" not in models:
                models["ar"] = load_diffusion_model(task, "ar", directory=out_dir)
            model, record = _train_one(task, kind, steps, seed, models)
            models[kind] = model
            inner = model.model if isinstance(model, ShiftedDenoiser) else model
            sd = {k: v.half() for k, v in inner.state_dict().items()}
            torch.save(sd, out_dir / f"diffusion_{task}_{kind}.pt")
            card["runs"].append(record)
            print(f"\n{task} {kind}: held-out {record['heldout_bits']:.3f} bits per token")
    card["seconds"] = time.perf_counter() - t0
    return card


def stored_diffusion_lm() -> dict[str, Any]:
    """The stored card (:data:`STORED`)."""
    return json.loads(STORED.read_text())


def load_diffusion_model(task: str, kind: str, *, directory: Path | None = None) -> nn.Module:
    """A stored model (float32, eval mode): ``task`` in ``perm``, ``text``; ``kind`` one of
    :func:`task_kinds`. ``adapted`` is a :class:`~effarch.diffusion.ShiftedDenoiser`, the
    others a :class:`~effarch.diffusion.DiffusionLM` (causal for ``ar``)."""
    if task not in CONFIG:
        raise ValueError(f"task must be one of {sorted(CONFIG)}, got {task!r}")
    if kind not in task_kinds(task):
        raise ValueError(f"kind must be one of {task_kinds(task)}, got {kind!r}")
    model = _model(task, "ar" if kind == "ar" else "diffusion", 0)
    path = (directory or HERE) / f"diffusion_{task}_{kind}.pt"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    if kind == "adapted":
        return ShiftedDenoiser(model, task_vocab(task)["bos_id"]).eval()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments diffusion-lm",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=None, choices=list(CONFIG))
    p.add_argument("--kinds", nargs="+", default=None, choices=list(KINDS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    card = diffusion_lm_experiment(args.out_dir, tasks=args.tasks, kinds=args.kinds,
                                   steps=args.steps, seed=args.seed)  # fmt: skip
    out = args.out_dir / "diffusion_lm_cpu.json"
    if out.exists():  # keep the runs not trained again
        old = json.loads(out.read_text())
        done = {(r["task"], r["kind"]) for r in card["runs"]}
        keep = [r for r in old["runs"] if (r["task"], r["kind"]) not in done]
        card["seconds"] += sum(r["seconds"] for r in keep)
        card["runs"] = keep + card["runs"]
    out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {out} in {card['seconds']:.0f} s")
