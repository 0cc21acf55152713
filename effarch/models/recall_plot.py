"""Plots of the recall-memory trade-off (records of :func:`effarch.models.recall_experiment`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_recall_tradeoff", "recall_table", "stored_recall_records"]

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
    """Recall accuracy against state size (left) and against decoding throughput (right).

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
    ax_t.set_xlabel("inference throughput (tokens / s, log scale)")
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
    """The records of a finished :func:`~effarch.models.recall_experiment` run, as stored.

    ``python -m effarch.tasks.recall --size cpu --out effarch/tasks/recall_cpu.json`` writes
    them; the package ships the CPU-size run so that a page can plot the full experiment
    without retraining every model. Returns the JSON object (``records`` and run metadata).
    """
    import json
    from importlib import resources

    if size not in ("cpu",):
        raise ValueError(f"size must be 'cpu' (the only stored run), got {size!r}")
    text = resources.files("effarch.tasks").joinpath(f"recall_{size}.json").read_text()
    return json.loads(text)
