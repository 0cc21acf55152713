"""Empirical scaling exponents: fit ``y ~ c * n^p`` by least squares in log-log space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """``y ~ coefficient * n ** exponent``; ``r2`` is the fit quality in log space."""

    exponent: float
    coefficient: float
    r2: float
    n_points: int

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(n, dtype=float) ** self.exponent

    def __str__(self) -> str:
        return f"~ n^{self.exponent:.2f} (R^2 = {self.r2:.3f}, {self.n_points} points)"


def fit_exponent(
    sizes: Sequence[float],
    values: Sequence[float],
    *,
    min_size: float | None = None,
) -> PowerLawFit:
    """Fit ``values ~ c * sizes^p`` and return the exponent ``p``.

    ``log y = log c + p log n`` is fitted by ordinary least squares. Points with a
    non-finite or non-positive value (out-of-budget entries) are ignored, and so are sizes
    below ``min_size``: small problems are dominated by fixed overheads (kernel launches,
    Python), which flatten the curve and would understate the asymptotic exponent.

    Raises:
        ValueError: if fewer than two usable points remain.
    """
    if len(sizes) != len(values):
        raise ValueError(
            f"sizes and values must have the same length, got {len(sizes)} and {len(values)}"
        )
    pts = [
        (float(n), float(y))
        for n, y in zip(sizes, values, strict=True)
        if n is not None
        and y is not None
        and math.isfinite(float(y))
        and float(y) > 0
        and float(n) > 0
        and (min_size is None or float(n) >= min_size)
    ]
    if len(pts) < 2:
        raise ValueError(
            f"fit_exponent needs at least 2 points with positive finite values"
            f"{'' if min_size is None else f' and size >= {min_size}'}, got {len(pts)}"
        )
    if len({p[0] for p in pts}) < 2:
        raise ValueError(
            f"fit_exponent needs at least 2 distinct sizes among its usable points, got "
            f"{sorted({p[0] for p in pts})}"
        )
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(float(slope), float(math.exp(intercept)), r2, len(pts))


@dataclass(frozen=True)
class LineFit:
    """``y ~ intercept + slope * x`` by ordinary least squares; ``r2`` is the fraction of
    the variance of ``y`` the line explains (1 when all ``y`` are equal)."""

    intercept: float
    slope: float
    r2: float

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.intercept + self.slope * np.asarray(x, dtype=float)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Fit ``y = a + b x`` by least squares: the model of a cost with a fixed part and a part
    proportional to ``x`` (a decoding step's call overhead plus the bytes it reads), where a
    pure power law would report a misleading exponent below 1.

    >>> round(fit_line([1, 2, 4], [3, 5, 9]).slope, 9)
    2.0

    ``r2`` says how well a line fits, not that the cost is linear: at four sizes, each twice
    the last, a line through ``y = x^2`` still reaches 0.96.

    >>> round(fit_line([1, 2, 4, 8], [1, 4, 16, 64]).r2, 2)
    0.96

    The intercept and slope are returned as least squares gives them, unrounded (a slope in
    seconds per byte can be 1e-12).

    Raises:
        ValueError: fewer than two points, lengths that differ, a non-finite ``x`` or ``y``,
            or fewer than two distinct ``x``.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"fit_line needs at least 2 points, got {len(xs)}")
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    for name, arr, given in (("xs", x, xs), ("ys", y, ys)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite, got {list(given)}")
    if len(np.unique(x)) < 2:
        raise ValueError(f"xs must hold at least 2 distinct values, got {list(xs)}")
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    return LineFit(float(a), float(b), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0)
