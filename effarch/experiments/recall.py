r"""The recall experiment: which token mixers recall, at what state size and speed.

Multi-query associative recall (MQAR, :func:`effarch.tasks.mqar`; Arora et al., 2023,
*Zoology*) separates the mixers: softmax attention looks a key up in its KV cache, a recurrent
mixer must have stored every binding in its fixed state. :func:`recall_experiment` trains a
:class:`~effarch.models.TinyLM` per (mixer, state size) with one recipe
(:func:`effarch.train.train`) and records held-out recall, state size
(:func:`~effarch.models.mixer_state_size`), parameters and throughput. :data:`RECALL_CPU` and
:data:`RECALL_GPU` are its two sizes (:class:`RecallConfig`).

From the command line, the records go to a JSON file::

    python -m effarch.experiments recall --size cpu --out results.json
    python -m effarch.experiments recall --size gpu --device cuda --out results_gpu.json
    python -m effarch.experiments recall --size cpu --mixers attention deltanet --steps 100

The file holds ``{"config": ..., "records": [...], "seconds": ...}``. The package ships the
CPU-size run (``recall_cpu.json`` beside this module, read by :func:`stored_recall_records`) so
that a page can plot the full experiment without retraining every model;
:func:`plot_recall_tradeoff` and :func:`recall_table` draw records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._checks import check_choice
from ..models import MIXERS, TinyLM
from ..tasks.mqar import mqar
from ..train import evaluate, train

__all__ = [
    "RECALL_CPU",
    "RECALL_GPU",
    "RecallConfig",
    "main",
    "plot_recall_tradeoff",
    "recall_experiment",
    "recall_table",
    "stored_recall_records",
]


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallConfig:
    """One size of the recall experiment (see :func:`recall_experiment`).

    ``seq_len``, ``n_pairs`` and ``vocab_size`` size the MQAR task
    (:func:`effarch.tasks.mqar`); ``d_model``, ``n_layers`` and ``d_ff`` the :class:`TinyLM`
    around each mixer (``d_ff=None``: the model's default); ``steps``, ``batch_size``,
    ``lr``, ``weight_decay`` and ``warmup`` the training (:func:`train`), where
    ``lr_by_mixer`` may override ``lr`` per mixer.

    Attributes:
        n_train: training examples (default ``steps * batch_size``: every step sees new ones).
        n_eval: held-out examples for the accuracy.
        mixers: mixer name -> the ``mixer_kwargs`` of each state size to train.
        seed: seeds the data and every model's initialisation.
    """

    seq_len: int
    n_pairs: int
    vocab_size: int
    d_model: int
    n_layers: int
    steps: int
    batch_size: int
    lr: float
    mixers: Mapping[str, Sequence[Mapping[str, Any]]]
    weight_decay: float = 0.1
    warmup: int | None = None
    d_ff: int | None = None
    n_train: int | None = None
    n_eval: int = 1000
    lr_by_mixer: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """The ``(mixer, mixer_kwargs)`` pairs to train, in order."""
        return [(name, dict(kw)) for name, variants in self.mixers.items() for kw in variants]


#: The CPU size: 7 mixers, 13 runs, two layers of width 32 recalling 8 key-value pairs in
#: 32 tokens. The recurrent mixers have a small state (128 numbers per layer: 8 heads of
#: width 4, or ``d_state = 2``) and a large one (1024: one head of width 32, or
#: ``d_state = 16``); attention's state is its KV cache, ``2 * 32 * 32 = 2048`` numbers at
#: the full context. The decays of the gated mixers start slow (GLA's gate temperature 64,
#: Gated DeltaNet's and Mamba-2's ``A dt`` near 0.005) so that a binding survives the
#: 32 tokens while the model is still learning to use it.
RECALL_CPU = RecallConfig(
    seq_len=32,
    n_pairs=8,
    vocab_size=64,
    d_model=32,
    n_layers=2,
    steps=1200,
    batch_size=32,
    lr=1e-2,
    lr_by_mixer={"gla": 3e-3},  # at 1e-2 the one-head GLA does not learn in 1200 steps
    n_eval=1000,
    mixers={
        "attention": [{"n_heads": 1}],
        "linear_attention": [{"n_heads": h, "normalize": False} for h in (8, 1)],
        "gla": [
            {"n_heads": h, "expand_k": 1.0, "gate_logit_normalizer": 64, "chunk_size": 16}
            for h in (8, 1)
        ],
        "deltanet": [{"n_heads": h} for h in (8, 1)],
        "gated_deltanet": [
            {"n_heads": h, "expand_v": 1, "A_init_range": (1.0, 1.0), "dt_min": 1e-3,
             "dt_max": 1e-2}
            for h in (8, 1)
        ],
        "mamba": [{"d_state": n} for n in (2, 16)],
        "mamba2": [
            {"d_state": n, "A_init_range": (0.01, 0.1), "dt_min": 0.05, "dt_max": 0.5}
            for n in (2, 16)
        ],
    },
)  # fmt: skip

#: The GPU size: 256 tokens holding 32 key-value pairs from an 8192-token vocabulary
#: (Zoology's setting), width 128, three state sizes per recurrent mixer (1024, 4096 and
#: 16384 numbers per layer: 16, 4 or 1 heads, or ``d_state`` 4, 16, 64) and longer training.
#: Attention's KV cache is ``2 * 256 * 128 = 65536`` numbers.
RECALL_GPU = RecallConfig(
    seq_len=256,
    n_pairs=32,
    vocab_size=8192,
    d_model=128,
    n_layers=2,
    steps=6000,
    batch_size=128,
    lr=3e-3,
    n_eval=2000,
    mixers={
        "attention": [{"n_heads": 2}],
        "linear_attention": [{"n_heads": h, "normalize": False} for h in (16, 4, 1)],
        "gla": [
            {"n_heads": h, "expand_k": 1.0, "gate_logit_normalizer": 256} for h in (16, 4, 1)
        ],
        "deltanet": [{"n_heads": h} for h in (16, 4, 1)],
        "gated_deltanet": [
            {"n_heads": h, "expand_v": 1, "A_init_range": (1.0, 1.0), "dt_min": 1e-3,
             "dt_max": 1e-2}
            for h in (16, 4, 1)
        ],
        "mamba": [{"d_state": n} for n in (4, 16, 64)],
        "mamba2": [
            {"d_state": n, "A_init_range": (0.01, 0.1), "dt_min": 0.01, "dt_max": 0.1}
            for n in (4, 16, 64)
        ],
    },
)  # fmt: skip

_SIZES = {"cpu": RECALL_CPU, "small": RECALL_CPU, "gpu": RECALL_GPU, "large": RECALL_GPU}


def recall_experiment(
    config: RecallConfig | str = "cpu",
    *,
    mixers: Sequence[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train a :class:`TinyLM` per (mixer, state size) on MQAR and measure its recall.

    Every run uses the same data (training stream and held-out set, from ``config.seed``)
    and the same initialisation seed, so runs differ only in the mixer.

    Args:
        config: a :class:`RecallConfig`, or ``"cpu"`` / ``"gpu"`` (also ``"small"`` /
            ``"large"``, the book's profiles) for :data:`RECALL_CPU` / :data:`RECALL_GPU`.
        mixers: restrict to these mixer names of the config, or replace its mixers by a
            mapping name -> list of ``mixer_kwargs``.
        device: where to train (default CPU).
        progress: progress bars (one over the runs, one per run's training).
        **overrides: fields of the config to change, e.g. ``steps=100``.

    Returns:
        One record (a dict) per run, with the keys ``mixer``, ``mixer_kwargs``,
        ``state_size`` (elements per layer and sequence at ``seq_len``), ``params``,
        ``accuracy``, ``final_loss``, ``train_tokens_per_s``, ``infer_tokens_per_s``
        (forward passes over the held-out set), ``wall_s`` (the whole run), and the task and
        model sizes.
    """
    if isinstance(config, str):
        check_choice("config", config, tuple(_SIZES))
        config = _SIZES[config]
    if not isinstance(config, RecallConfig):
        raise TypeError(f"config must be a RecallConfig or a size name, got {type(config)}")
    try:
        config = dataclasses.replace(config, **overrides)
    except TypeError as err:
        names = [f.name for f in dataclasses.fields(RecallConfig)]
        raise TypeError(f"overrides must be fields of RecallConfig {names}: {err}") from None
    if mixers is not None:
        if isinstance(mixers, Mapping):
            chosen = dict(mixers)
        elif isinstance(mixers, Sequence) and not isinstance(mixers, str):
            unknown = [m for m in mixers if m not in config.mixers]
            if unknown:
                raise ValueError(
                    f"mixers must be names of the config's mixers {list(config.mixers)}, "
                    f"got unknown {unknown}; pass a mapping name -> kwargs list for others"
                )
            chosen = {m: config.mixers[m] for m in mixers}
        else:
            raise TypeError(f"mixers must be a list of names or a mapping, got {type(mixers)}")
        config = dataclasses.replace(config, mixers=chosen)
    for name in config.mixers:
        if name not in MIXERS:
            raise ValueError(f"mixer names must be in {sorted(MIXERS)}, got {name!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    c = config
    task = {"seq_len": c.seq_len, "n_pairs": c.n_pairs, "vocab_size": c.vocab_size}
    n_train = c.n_train if c.n_train is not None else c.steps * c.batch_size
    train_set = mqar(n_train, seed=c.seed, **task)
    eval_set = mqar(c.n_eval, seed=c.seed + 1_000_003, **task)  # another stream: held out

    records: list[dict[str, Any]] = []
    runs = c.runs()
    outer = tqdm(runs, desc="recall experiment", disable=not progress)
    for name, kwargs in outer:
        label = f"{name} {kwargs}" if kwargs else name
        outer.set_postfix_str(label)
        t0 = time.perf_counter()
        torch.manual_seed(c.seed)
        model = TinyLM(c.vocab_size, c.d_model, c.n_layers, name, mixer_kwargs=kwargs,
                       d_ff=c.d_ff).to(dev)  # fmt: skip
        result = train(
            model, train_set, steps=c.steps, batch_size=c.batch_size,
            lr=c.lr_by_mixer.get(name, c.lr), weight_decay=c.weight_decay, warmup=c.warmup,
            seed=c.seed, progress=progress, desc=name,
        )  # fmt: skip
        t1 = time.perf_counter()
        accuracy = evaluate(model, eval_set)
        infer_s = time.perf_counter() - t1
        records.append(
            {
                "mixer": name,
                "mixer_kwargs": kwargs,
                "state_size": model.state_size(c.seq_len),
                "params": model.num_parameters(),
                "accuracy": accuracy,
                "final_loss": result.losses[-1],
                "train_tokens_per_s": result.tokens_per_s,
                "infer_tokens_per_s": c.n_eval * c.seq_len / infer_s,
                "wall_s": time.perf_counter() - t0,
                "steps": c.steps,
                "batch_size": c.batch_size,
                "d_model": c.d_model,
                "n_layers": c.n_layers,
                "device": str(dev),
                **task,
            }
        )
    return records


# --------------------------------------------------------------------------------------------
# Plots and tables of the records
# --------------------------------------------------------------------------------------------


_LABELS = {
    "attention": "softmax attention",
    "linear_attention": "linear attention",
    "gla": "GLA",
    "deltanet": "DeltaNet",
    "gated_deltanet": "Gated DeltaNet",
    "mamba": "Mamba",
    "mamba2": "Mamba-2",
    "hgrn": "HGRN",
    "retnet": "RetNet",
    "rwkv7": "RWKV-7",
    "sliding_window": "sliding window",
}

_REQUIRED = ("mixer", "state_size", "accuracy", "infer_tokens_per_s")


def _check_records(records: Any) -> list[Mapping[str, Any]]:
    if not isinstance(records, Sequence) or not records:
        raise ValueError("records must be a non-empty list of recall_experiment records")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or any(key not in r for key in _REQUIRED):
            raise ValueError(
                f"records[{i}] must be a mapping with the keys {list(_REQUIRED)}, got {r!r}"
            )
    return list(records)


def _by_mixer(records: list[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(r["mixer"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["state_size"])
    return out


def plot_recall_tradeoff(
    records: Sequence[Mapping[str, Any]], axes: Any = None, title: str = ""
) -> Any:
    """Recall accuracy against state size (left) and against forward throughput (right):
    ``infer_tokens_per_s``, held-out tokens per second of one timed, parallel
    :func:`~effarch.train.evaluate` pass (batched forward passes, not token-by-token decoding).

    One line per mixer through its state sizes; softmax attention (whose "state" is its KV
    cache at the sequence length) is drawn as a star. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    rows = _by_mixer(_check_records(records))
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    else:
        fig = axes[0].figure
    ax_s, ax_t = axes
    for mixer, rs in rows.items():
        label = _LABELS.get(mixer, mixer)
        style = dict(marker="*", ms=14, ls="none") if mixer == "attention" else dict(marker="o")
        (line,) = ax_s.plot([r["state_size"] for r in rs], [r["accuracy"] for r in rs],
                            label=label, **style)  # fmt: skip
        ax_t.plot([r["infer_tokens_per_s"] for r in rs], [r["accuracy"] for r in rs],
                  color=line.get_color(), label=label, **style)  # fmt: skip
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    ax_s.set_xlabel("state per layer (elements, log scale)")
    ax_s.set_ylabel("MQAR recall accuracy (held out)")
    ax_s.set_title("Recall against memory")
    ax_t.set_xlabel("forward throughput on the held-out set (tokens / s, log scale)")
    ax_t.set_ylabel("MQAR recall accuracy (held out)")
    ax_t.set_title("Recall against speed")
    ax_t.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    return fig


def recall_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the records: mixer, state size, parameters and accuracy."""
    rows = _by_mixer(_check_records(records))
    lines = [f"{'mixer':18s} {'state/layer':>12s} {'params':>9s} {'accuracy':>9s}"]
    for mixer, rs in rows.items():
        for r in rs:
            params = f"{r['params']:,}" if "params" in r else "-"
            lines.append(
                f"{_LABELS.get(mixer, mixer):18s} {r['state_size']:>12,} {params:>9s} "
                f"{r['accuracy']:9.3f}"
            )
    return "\n".join(lines)


def stored_recall_records(size: str = "cpu") -> dict[str, Any]:
    """The records of a finished :func:`recall_experiment` run, as stored.

    ``python -m effarch.experiments recall --size cpu --out effarch/experiments/recall_cpu.json``
    writes them; the package ships the CPU-size run so that a page can plot the full experiment
    without retraining every model. Returns the JSON object (``records`` and run metadata).
    """
    if size not in ("cpu",):
        raise ValueError(f"size must be 'cpu' (the only stored run), got {size!r}")
    text = resources.files("effarch.experiments").joinpath(f"recall_{size}.json").read_text()
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


_CLI_SIZES = {"cpu": RECALL_CPU, "gpu": RECALL_GPU}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m effarch.experiments recall",
        description="Train small language models on multi-query associative recall and "
        "record recall accuracy against state size and throughput.",
    )
    p.add_argument("--size", choices=sorted(_CLI_SIZES), default="cpu", help="experiment size")
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
    config = dataclasses.replace(_CLI_SIZES[args.size], **overrides)
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
