"""Run an experiment of the book from the command line and store its records.

    python -m effarch.experiments recall --size cpu --out results.json
    python -m effarch.experiments recall --size gpu --device cuda --out results_gpu.json
    python -m effarch.experiments recall --size cpu --mixers attention deltanet --steps 100
    python -m effarch.experiments bytelm --device cuda --steps 8000 --out-dir effarch/models
    python -m effarch.experiments kv-budget --out effarch/experiments/kv_budget_cpu.json
    python -m effarch.experiments moe-balance --out effarch/experiments/moe_balance_cpu.json
    python -m effarch.experiments moe-vs-dense --out effarch/experiments/moe_vs_dense_cpu.json
    python -m effarch.experiments moe-upcycle --out effarch/experiments/moe_upcycle_cpu.json
    python -m effarch.experiments hybrid-decode --out effarch/experiments/hybrid_decode_cpu.json
    python -m effarch.experiments hybrid-recall --out effarch/experiments/hybrid_recall_cpu.json
    python -m effarch.experiments every-family --out effarch/experiments/every_family_cpu.json
    python -m effarch.experiments every-family-decode
    python -m effarch.experiments diffusion-lm --out-dir effarch/experiments
    python -m effarch.experiments multimodal-diffusion --out-dir effarch/experiments
    python -m effarch.experiments vision-scans --out effarch/experiments/vision_scans_cpu.json
    python -m effarch.experiments vision-resolution --out effarch/experiments/vision_grid_cpu.json
    python -m effarch.experiments multimodal-moe --out effarch/experiments/multimodal_moe_cpu.json

The first argument names the experiment; the rest are its own (``recall --help``).
"""

from __future__ import annotations

import sys

from . import (
    bytelm,
    diffusion_lm,
    every_family,
    hybrid_decode,
    hybrid_recall,
    kv_budget,
    moe_balance,
    moe_training,
    multimodal_diffusion,
    multimodal_moe,
    recall,
    sparse_recall,
    vision_scans,
)

EXPERIMENTS = {
    "bytelm": bytelm.main,
    "diffusion-lm": diffusion_lm.main,
    "every-family": every_family.main,
    "every-family-decode": every_family.main_decode,
    "hybrid-decode": hybrid_decode.main,
    "hybrid-recall": hybrid_recall.main,
    "kv-budget": kv_budget.main,
    "moe-balance": moe_balance.main,
    "moe-upcycle": moe_training.main_upcycle,
    "moe-vs-dense": moe_training.main_vs_dense,
    "multimodal-diffusion": multimodal_diffusion.main,
    "multimodal-moe": multimodal_moe.main,
    "recall": recall.main,
    "sparse-recall": sparse_recall.main,
    "vision-resolution": vision_scans.main_resolution,
    "vision-scans": vision_scans.main,
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv[0]`` (an experiment's name) to its command line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in EXPERIMENTS:
        names = ", ".join(EXPERIMENTS)
        raise SystemExit(f"usage: python -m effarch.experiments {{{names}}} [options]")
    EXPERIMENTS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
