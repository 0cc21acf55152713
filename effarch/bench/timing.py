"""Wall-clock timing that can be trusted.

* CPU: :class:`torch.utils.benchmark.Timer` (a monotonic ``perf_counter`` clock, blocked
  repeats until ``min_run_time`` has passed, thread count pinned).
* GPU: ``triton.testing.do_bench`` when Triton is installed (CUDA events, L2 flush between
  runs), otherwise the same Torch timer, which synchronises the device around every block.

Either way the call is warmed up first and the result is a :class:`Timing` with the median
and the spread of the repeats, never a single number.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_callable, check_positive_int, check_positive_number


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one timed function.

    ``median`` is the headline figure; ``q25``/``q75`` bound the middle half of the
    repeats and ``iqr = q75 - q25`` is the spread reported beside it.
    """

    median: float
    q25: float
    q75: float
    min: float
    max: float
    n: int
    method: str
    times: tuple[float, ...] = field(repr=False, default=())

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def __str__(self) -> str:
        return (
            f"{format_seconds(self.median)} (IQR {format_seconds(self.iqr)}, "
            f"n={self.n}, {self.method})"
        )


def format_seconds(s: float) -> str:
    """Format a duration with a readable unit: ``0.0012 -> '1.20 ms'``."""
    if s != s:  # NaN
        return "n/a"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= factor:
            return f"{s / factor:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], statistics.median(times), q[2]


def _summarise(times: list[float], method: str) -> Timing:
    q25, med, q75 = _quantiles(times)
    return Timing(
        median=med,
        q25=q25,
        q75=q75,
        min=min(times),
        max=max(times),
        n=len(times),
        method=method,
        times=tuple(times),
    )


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available():
            torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def _has_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def benchmark(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    min_run_time: float = 0.2,
    method: str = "auto",
) -> Timing:
    """Time ``fn()`` robustly and return a :class:`Timing` in seconds.

    Args:
        fn: a callable taking no arguments (wrap arguments in a ``lambda``).
        device: where ``fn`` runs; ``"cuda"`` selects event-based GPU timing. ``None``
            means the CPU.
        warmup: calls made before timing starts (lazy init, autotuning, caches).
        min_run_time: seconds of repeated calls to collect (at least one call is timed).
        method: ``"auto"``, ``"torch"`` (``torch.utils.benchmark``) or ``"do_bench"``
            (``triton.testing.do_bench``, GPU only).

    Returns:
        Timing with median, quartiles, min, max and the number of samples ``n``.
    """
    check_callable("fn", fn)
    check_positive_int("warmup", warmup, allow_zero=True)
    check_positive_number("min_run_time", min_run_time)
    if method not in ("auto", "torch", "do_bench"):
        raise ValueError(f"method must be one of ['auto', 'torch', 'do_bench'], got {method!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = dev.type == "cuda"
    if method == "do_bench" and not (on_gpu and _has_triton()):
        raise ValueError("method='do_bench' needs a CUDA device and triton installed")
    if method == "auto":
        method = "do_bench" if on_gpu and _has_triton() else "torch"

    for _ in range(warmup):
        fn()
    synchronize(dev)

    if method == "do_bench":
        import triton.testing

        ms = triton.testing.do_bench(
            fn, warmup=25, rep=max(1, int(min_run_time * 1000)), return_mode="all"
        )
        return _summarise([t * 1e-3 for t in ms], "triton.testing.do_bench")

    import torch.utils.benchmark as torch_benchmark  # imports triton: keep it lazy

    timer = torch_benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    )
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    synchronize(dev)
    return _summarise(list(measurement.times), "torch.utils.benchmark")
