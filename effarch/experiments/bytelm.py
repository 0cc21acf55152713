"""Train the book's small byte-level language model and store it with its card.

    python -m effarch.experiments bytelm --device cuda --steps 8000 --out-dir effarch/models
    python -m effarch.experiments bytelm --device cuda --time-budget 240 --out-dir run/
    python -m effarch.experiments bytelm --steps 50 --seq-len 64 --out-dir /tmp/tiny  # smoke

Trains :class:`~effarch.models.ByteLM` (default sizes) on the standard library's source
files (:func:`~effarch.tasks.stdlib_corpus`, the training split) with
:func:`effarch.train.train` (AdamW, warmup then cosine, clipping), then writes

* ``bytelm.pt``: the state dict in float16 (about 3.3 MB);
* ``bytelm.json``: the card: configuration, recipe (steps, batch, window, learning rate,
  seed, tokens seen), corpus description, the loss curve (means over bins of steps),
  held-out bits per byte at the training window and at 2x and 4x it, and the attention
  mass on the BOS position per layer against uniform attention.

``--time-budget S`` sets the number of steps from the measured speed of a short trial run
so that training takes about ``S`` seconds; the card records the steps used, and
``--steps N`` repeats a run exactly (same seed, same batches; bitwise only on the same
device and library versions).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..models.bytelm import (
    ByteLM,
    ByteLMConfig,
    bits_per_byte,
    config_dict,
    sink_mass,
)
from ..tasks.text import byte_batches, heldout_windows, stdlib_corpus
from ..train import train

__all__ = ["main", "train_bytelm"]


def _loss_curve(losses: list[float], bins: int = 100) -> list[list[float]]:
    """``[step, mean loss]`` over ``bins`` equal bins of steps (step = the bin's last)."""
    n = len(losses)
    width = max(1, n // bins)
    return [
        [min(i + width, n), sum(losses[i : i + width]) / len(losses[i : i + width])]
        for i in range(0, n, width)
    ]


def _steps_for_budget(
    model: ByteLM, data: Any, seconds: float, batch_tokens: int, lr: float
) -> tuple[int, float]:
    """Steps that fit in ``seconds`` at the speed of a 40-step trial on a copy."""
    trial = train(copy.deepcopy(model), data, steps=40, lr=lr, progress=False)
    tokens_per_s = trial.tokens_per_s
    steps = int(seconds * tokens_per_s / batch_tokens) // 100 * 100
    return max(steps, 100), tokens_per_s


def train_bytelm(
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    batch_size: int = 64,
    seq_len: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    eval_windows: int = 128,
    progress: bool = True,
) -> tuple[ByteLM, dict[str, Any]]:
    """Train a default-size :class:`ByteLM`; return it (float32) and its card."""
    if (steps is None) == (time_budget is None):
        raise ValueError("give exactly one of steps and time_budget")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    corpus = stdlib_corpus()
    torch.manual_seed(seed)
    cfg = ByteLMConfig(train_len=seq_len)
    model = ByteLM(cfg).to(device)
    data = byte_batches(corpus.train, seq_len, batch_size, seed=seed)
    measured_speed = None
    if steps is None:
        steps, measured_speed = _steps_for_budget(
            model, data, float(time_budget), batch_size * seq_len, lr
        )
        print(f"time budget {time_budget} s -> {steps} steps", flush=True)
    result = train(model, data, steps=steps, lr=lr, seed=seed, progress=progress, desc="ByteLM")
    model.eval()
    heldout = {}
    for mult in (1, 2, 4):
        t = seq_len * mult
        n = max(eval_windows // mult, 8)
        x, y = heldout_windows(corpus.heldout, t, n)
        heldout[str(t)] = bits_per_byte(model, x, y, batch_size=max(1, 32 // mult))
    x, _ = heldout_windows(corpus.heldout, seq_len, 16)
    mass, uniform = sink_mass(model.attention_probs(x.to(device)).cpu())
    card = {
        "model": "ByteLM",
        "config": config_dict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "tokens": result.tokens,
            "lr": lr,
            "schedule": f"linear warmup {steps // 10} steps, then cosine to 0",
            "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1 on matrices)",
            "grad_clip": 1.0,
            "seed": seed,
            "time_budget_s": time_budget,
            "trial_tokens_per_s": measured_speed,
            "command": (
                f"python -m effarch.experiments bytelm --steps {steps} --batch-size "
                f"{batch_size} --seq-len {seq_len} --lr {lr} --seed {seed} "
                f"--eval-windows {eval_windows} --out-dir effarch/models"
            ),  # fmt: skip
        },
        "corpus": corpus.description,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "train_seconds": result.train_seconds,
        "loss_curve": _loss_curve(result.losses),
        "heldout_bits_per_byte": heldout,
        "bos_attention_mass": {
            "per_layer": mass.mean(-1).tolist(),
            "per_layer_head": mass.tolist(),
            "uniform": uniform,
            "windows": 16,
            "window_len": seq_len,
        },
    }
    return model.float().cpu(), card


def save(model: ByteLM, card: dict[str, Any], out_dir: Path) -> None:
    """Write ``bytelm.pt`` (float16 state dict) and ``bytelm.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / "bytelm.pt")
    (out_dir / "bytelm.json").write_text(json.dumps(card, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments bytelm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--steps", type=int)
    group.add_argument("--time-budget", type=float, help="seconds of training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, card = train_bytelm(
        steps=args.steps, time_budget=args.time_budget, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, seed=args.seed, device=args.device,
        eval_windows=args.eval_windows, progress=not args.quiet,
    )  # fmt: skip
    save(model, card, args.out_dir)
    summary = {k: card[k] for k in ("parameters", "train_seconds", "heldout_bits_per_byte")}
    summary["bos_mass"] = card["bos_attention_mass"]["per_layer"]
    summary["uniform"] = card["bos_attention_mass"]["uniform"]
    print(json.dumps(summary, indent=1), f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
