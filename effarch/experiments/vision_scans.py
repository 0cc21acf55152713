"""Tiny image classifiers with different token mixers and scan orders (chapter 8.1).

    python -m effarch.experiments vision-scans --out effarch/experiments/vision_scans_cpu.json
    python -m effarch.experiments vision-scans --steps 50 --out /tmp/v.json
    python -m effarch.experiments vision-resolution --out effarch/experiments/vision_grid_cpu.json

Two parts, every model a :func:`~effarch.vision.vision_classifier` of about ``params``
parameters (the width chosen to match), trained with the book's trainer from the same seed:

- ``digits``: scikit-learn's 8x8 digits (grey values in [0, 1], one pixel per token, 64
  tokens), the 1500 training images of :func:`~effarch.tasks.digits_split`, accuracy on the
  297 held out, for ViT (``attention``), Vision Mamba (``bidirectional``), VMamba
  (``cross``) and Vision-RWKV (``vrwkv``);
- ``lines``: :func:`~effarch.tasks.planted_lines` (a vertical or a horizontal run of 4
  pixels in noise), one Mamba-2 mixer read in different orders (``raster``, ``column``,
  ``bidirectional``, ``cross``), for both axes, accuracy on 1000 fresh images.

The card (JSON, kilobytes) holds the loss curves, accuracies, parameters and seconds.

:func:`resolution_sweep` measures one mixer layer's forward time and peak memory against
the grid side, up to grids larger than a notebook can afford (``vision-resolution``; its
stored card is :data:`RESOLUTION_STORED`), so that the resolution where the scans overtake
attention is measured rather than extrapolated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..bench import sweep
from ..tasks import digits_split, load_digits, planted_lines
from ..train import train
from ..vision import GridMixer, vision_classifier

__all__ = ["CONFIG", "RESOLUTION_STORED", "STORED", "digits_data", "main", "main_resolution",
           "resolution_sweep", "stored_resolution", "stored_vision_scans",
           "train_digits_classifier", "vision_scans_experiment"]  # fmt: skip

HERE = Path(__file__).resolve().parent
STORED = HERE / "vision_scans_cpu.json"
"""The card of the stored CPU run."""

CONFIG: dict[str, Any] = {
    "params": 20000, "n_layers": 2, "batch_size": 64, "lr": 3e-3,
    "digits": {"scans": ["attention", "bidirectional", "cross", "vrwkv"], "steps": 800},
    "lines": {"scans": ["raster", "column", "bidirectional", "cross"], "steps": 500,
              "axes": ["vertical", "horizontal"], "eval": 1000},
}  # fmt: skip
"""Sizes of the stored CPU run."""
RESOLUTION_STORED = HERE / "vision_grid_cpu.json"
"""The card of the stored CPU resolution sweep."""
RESOLUTION_GRIDS = [16, 32, 64, 96, 128, 160, 192, 256]
"""Grid sides of the stored CPU resolution sweep."""


def digits_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train_images, train_labels), (heldout_images, heldout_labels))``, images
    ``[N, 1, 8, 8]`` float32 in [0, 1]."""
    images, labels = load_digits()
    tr, held = digits_split()
    return (images[tr, None], labels[tr]), (images[held, None], labels[held])


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return (pred == y).float().mean().item()


def _classify(model, inputs, targets):
    return F.cross_entropy(model(inputs), targets)


def _fit(scan: str, batch, steps: int, seed: int, desc: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = vision_classifier(scan, CONFIG["params"], n_layers=CONFIG["n_layers"])
    t0 = time.perf_counter()
    res = train(model, batch, steps=steps, lr=CONFIG["lr"], loss_fn=_classify, desc=desc,
                seed=seed)  # fmt: skip
    every = max(1, len(res.losses) // 100)
    return model, {
        "scan": scan, "steps": steps, "seconds": time.perf_counter() - t0,
        "d_model": model.embed.proj.out_features,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_every": every, "losses": res.losses[::every],
    }  # fmt: skip


def train_digits_classifier(
    scan: str, *, steps: int, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one :func:`~effarch.vision.vision_classifier` (``scan``, about ``CONFIG["params"]``
    parameters) on the training digits for ``steps`` steps, as the stored run does.

    Returns ``(model, record)``: the record holds ``scan``, ``steps``, ``seconds``,
    ``d_model``, ``parameters``, the loss curve and ``accuracy`` on the 297 held-out digits.
    The batches come from ``seed`` and are the same for every ``scan``.
    """
    (xtr, ytr), (xte, yte) = digits_data()
    bs = CONFIG["batch_size"]

    def digits_batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        i = torch.randint(len(xtr), (bs,), generator=g)
        return xtr[i], ytr[i]

    model, rec = _fit(scan, digits_batch, steps, seed, f"digits {scan}")
    rec["accuracy"] = _accuracy(model, xte, yte)
    return model, rec


def vision_scans_experiment(*, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run both parts (``steps`` overrides every run's steps); return the card. Its
    ``config`` is :data:`CONFIG` as written; an override shows in each run's ``steps``."""
    card: dict[str, Any] = {"config": CONFIG, "seed": seed, "digits": [], "lines": []}
    t0 = time.perf_counter()
    bs = CONFIG["batch_size"]
    for scan in CONFIG["digits"]["scans"]:
        _, rec = train_digits_classifier(scan, steps=steps or CONFIG["digits"]["steps"], seed=seed)
        card["digits"].append(rec)
        print(f"\ndigits {scan}: {rec['accuracy']:.3f}")
    for axis in CONFIG["lines"]["axes"]:
        xe, ye = planted_lines(CONFIG["lines"]["eval"], axis=axis,
                               generator=torch.Generator().manual_seed(10**6))  # fmt: skip

        def lines_batch(step: int, axis=axis):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            return planted_lines(bs, axis=axis, generator=g)

        for scan in CONFIG["lines"]["scans"]:
            model, rec = _fit(scan, lines_batch, steps or CONFIG["lines"]["steps"], seed,
                              f"lines {axis} {scan}")  # fmt: skip
            rec["axis"] = axis
            rec["accuracy"] = _accuracy(model, xe, ye)
            card["lines"].append(rec)
            print(f"\nlines {axis} {scan}: {rec['accuracy']:.3f}")
    card["seconds"] = time.perf_counter() - t0
    return card


def resolution_sweep(
    grids: list[int],
    *,
    kinds: tuple[str, ...] = ("attention", "bidirectional", "cross"),
    d_model: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Forward time and peak memory of one :class:`~effarch.vision.GridMixer` of each kind,
    batch 1, on a ``g x g`` grid for each ``g`` in ``grids``, on the CPU.

    Measured by :func:`~effarch.bench.sweep` (time: the median of repeated calls, or one
    call where a single call lasts ``min_run_time`` or longer; memory:
    :func:`~effarch.bench.peak_memory`), under ``torch.no_grad()``. Returns the card:
    ``grids``, ``tokens`` (``g^2``), ``time`` and ``memory`` (per kind, one value per grid),
    ``d_model``, ``seconds`` and the torch version.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    layers = {k: GridMixer(d_model, k).eval() for k in kinds}
    with torch.no_grad():
        result = sweep(layers, grids, lambda g: torch.randn(1, g, g, d_model),
                       size_name="grid", progress=False)  # fmt: skip
    return {
        "grids": list(grids),
        "tokens": [g * g for g in grids],
        "time": {k: result.series(k, "time_s")[1] for k in kinds},
        "memory": {k: result.series(k, "peak_bytes")[1] for k in kinds},
        "d_model": d_model,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
    }


def stored_resolution() -> dict[str, Any]:
    """The stored resolution sweep (:data:`RESOLUTION_STORED`)."""
    return json.loads(RESOLUTION_STORED.read_text())


def main_resolution(argv: list[str] | None = None) -> None:
    """Command line of the resolution sweep (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments vision-resolution")
    p.add_argument("--grids", type=int, nargs="+", default=RESOLUTION_GRIDS)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    card = resolution_sweep(args.grids)
    args.out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out} in {card['seconds']:.0f} s")


def stored_vision_scans() -> dict[str, Any]:
    """The stored card (:data:`STORED`)."""
    return json.loads(STORED.read_text())


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m effarch.experiments vision-scans",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    card = vision_scans_experiment(steps=args.steps, seed=args.seed)
    args.out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {args.out} in {card['seconds']:.0f} s")
