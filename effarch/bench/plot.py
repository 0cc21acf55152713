"""Figures of the book: scaling curves with fitted exponents, memory curves, rooflines.

Every function draws into an existing ``matplotlib`` axis when given one (``ax=``) and
returns the axis, so figures can be composed side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .._checks import check_choice
from .roofline import DeviceSpec
from .sweep import COLUMNS, OK, SweepResult

_LABELS = {
    "time_s": ("time per call", "s", 1.0),
    "time_q25_s": ("time per call", "s", 1.0),
    "time_q75_s": ("time per call", "s", 1.0),
    "peak_bytes": ("peak memory", "MiB", 2.0**20),
    "flops": ("FLOPs (measured)", "GFLOP", 1e9),
    "analytic_flops": ("FLOPs (analytic)", "GFLOP", 1e9),
}


#: Each series gets its own line style and marker (and colour), so that overlapping curves
#: stay apart, also in grey print.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_scaling(
    result: SweepResult,
    column: str = "time_s",
    *,
    ax: plt.Axes | None = None,
    impls: Sequence[str] | None = None,
    fit: bool = True,
    fit_min_size: float | None = None,
    title: str | None = None,
) -> plt.Axes:
    """Log-log curve of ``column`` against size for each implementation.

    With ``fit=True`` each legend entry carries the fitted exponent, e.g.
    ``naive ~ T^1.98``, fitted on sizes ``>= fit_min_size``. A series that stopped at its
    budget ends with an ``x`` and says so in the legend. Time is drawn with the
    interquartile range as an error bar.
    """
    check_choice("column", column, COLUMNS[3:9])
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    what, unit, div = _LABELS[column]
    for i, impl in enumerate(impls or result.impls):
        style = dict(marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)], ms=4)
        sizes, values = result.series(impl, column)
        if not sizes:
            continue
        label = impl
        if fit and len(sizes) >= 2:
            eligible = [s for s in sizes if fit_min_size is None or s >= fit_min_size]
            if len(eligible) >= 2:
                p = result.fit(impl, column, min_size=fit_min_size).exponent
                label = f"{impl} ~ {result.size_name}^{p:.2f}"
        stopped = any(r["impl"] == impl and r["status"] != OK for r in result.rows)
        if stopped:
            label += " (stops: out of budget)"
        y = np.asarray(values) / div
        if column == "time_s":
            _, lo = result.series(impl, "time_q25_s")
            _, hi = result.series(impl, "time_q75_s")
            err = np.abs(np.vstack([y - np.asarray(lo) / div, np.asarray(hi) / div - y]))
            (line, *_) = ax.errorbar(sizes, y, yerr=err, capsize=2, label=label, **style)
        else:
            (line,) = ax.plot(sizes, y, label=label, **style)
        if stopped:
            ax.plot(sizes[-1], y[-1], "x", ms=10, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{result.size_name} (log scale)")
    ax.set_ylabel(f"{what} [{unit}] (log scale)")
    ax.set_title(title or f"{what} vs {result.size_name}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_memory(result: SweepResult, **kwargs) -> plt.Axes:
    """Peak memory against size: :func:`plot_scaling` on the ``peak_bytes`` column."""
    return plot_scaling(result, "peak_bytes", **kwargs)


def plot_roofline(
    devices: Sequence[DeviceSpec],
    *,
    points: Sequence[tuple[str, float, float]] = (),
    ax: plt.Axes | None = None,
    intensity_range: tuple[float, float] = (0.1, 1e4),
    title: str = "Roofline",
) -> plt.Axes:
    """Attainable FLOP/s against arithmetic intensity for each device.

    ``points`` are ``(label, intensity [FLOP/byte], achieved FLOP/s)`` of measured
    kernels, drawn as markers under the roofs.
    """
    if len(devices) == 0:
        raise ValueError("devices must hold at least one DeviceSpec")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    x = np.logspace(np.log10(intensity_range[0]), np.log10(intensity_range[1]), 200)
    for d in devices:
        if not isinstance(d, DeviceSpec):
            raise TypeError(f"devices must hold DeviceSpec objects, got {type(d).__name__}")
        y = np.minimum(d.peak_flops, x * d.bandwidth) / 1e12
        (line,) = ax.plot(x, y, label=f"{d.name} (ridge {d.ridge_point:.0f} FLOP/B)")
        ax.axvline(d.ridge_point, color=line.get_color(), ls=":", lw=0.8)
    for label, intensity, achieved in points:
        ax.plot(intensity, achieved / 1e12, "o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity [FLOP/byte]")
    ax.set_ylabel("attainable throughput [TFLOP/s]")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_kv_cache(
    series: Mapping[str, Callable[[int], float]],
    contexts: Sequence[int],
    *,
    devices: Sequence[DeviceSpec] = (),
    ax: plt.Axes | None = None,
    title: str = "KV cache against context length",
) -> plt.Axes:
    """Cache size against context length, with the memory of each device as a ceiling.

    ``series`` maps a label to ``context -> bytes`` (for instance a ``functools.partial``
    of :func:`effarch.attention.kv_cache_bytes`).
    """
    if len(series) == 0:
        raise ValueError("series must hold at least one label -> function")
    if len(contexts) == 0:
        raise ValueError("contexts must not be empty")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(contexts)
    for label, fn in series.items():
        ax.plot(x, [fn(int(n)) / 2**30 for n in x], marker="o", ms=3, label=label)
    for d in devices:
        if d.memory_bytes == d.memory_bytes:  # not NaN
            ax.axhline(d.memory_bytes / 2**30, ls="--", lw=0.8, color="gray")
            ax.annotate(
                f"{d.name} memory",
                (x[0], d.memory_bytes / 2**30),
                fontsize="x-small",
                va="bottom",
                color="gray",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length [tokens] (log scale)")
    ax.set_ylabel("KV cache [GiB] (log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return ax
