"""Run the recall experiment from the command line and write its records as JSON.

    python -m effarch.tasks.recall --size cpu --out results.json
    python -m effarch.tasks.recall --size gpu --device cuda --out results_gpu.json
    python -m effarch.tasks.recall --size cpu --mixers attention deltanet --steps 100

Each record is one trained model (see :func:`effarch.models.recall_experiment`); the file
holds ``{"config": ..., "records": [...], "seconds": ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.tinylm import RECALL_CPU, RECALL_GPU, recall_experiment

__all__ = ["main"]

_SIZES = {"cpu": RECALL_CPU, "gpu": RECALL_GPU}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m effarch.tasks.recall",
        description="Train small language models on multi-query associative recall and "
        "record recall accuracy against state size and throughput.",
    )
    p.add_argument("--size", choices=sorted(_SIZES), default="cpu", help="experiment size")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--mixers", nargs="+", default=None, help="only these mixers of the size")
    p.add_argument("--steps", type=int, default=None, help="override the training steps")
    p.add_argument("--seed", type=int, default=None, help="override the seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv``, run the experiment, write the JSON file; return the records."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    config = dataclasses.replace(_SIZES[args.size], **overrides)
    device = torch.device(args.device) if args.device is not None else None
    start = time.perf_counter()
    records = recall_experiment(
        config, mixers=args.mixers, device=device, progress=not args.no_progress
    )
    seconds = time.perf_counter() - start
    used = {**dataclasses.asdict(config), "size": args.size, "torch": torch.__version__}
    if args.mixers is not None:
        used["mixers"] = {m: config.mixers[m] for m in args.mixers}
    payload = {"config": used, "records": records, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=list) + "\n")
    print(f"{len(records)} runs in {seconds:.0f} s -> {args.out}")
    return records


if __name__ == "__main__":
    main()
