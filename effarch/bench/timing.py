"""Wall-clock timing that can be trusted.

* CPU: our own loop on the monotonic ``time.perf_counter`` clock, with the garbage collector
  off inside each timed block (as ``timeit`` does). A call that takes at least
  :data:`MIN_BLOCK_S` is timed on its own; faster calls are timed in blocks of
  ``number = ceil(MIN_BLOCK_S / probe)`` calls (``probe``: the first timed call, then
  discarded) and every block gives one sample, ``block time / number``, so the cost of
  reading the clock stays negligible. Samples are collected until ``min_run_time`` seconds
  of calls have been timed (the probe counts when it is a sample).
* GPU: ``triton.testing.do_bench`` when Triton is installed (CUDA events, L2 flush between
  runs), otherwise the same loop, which synchronises the device around every block.

Either way the call is warmed up first and the result is a :class:`Timing` with the median
and the spread of the repeats. A call that alone lasts ``min_run_time`` or longer is timed
once after its warm-up (``n = 1``, no spread): raise ``min_run_time`` to repeat it.
``grad_to_none`` resets gradients
before every call, outside the timed region, as ``triton.testing.do_bench`` does.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .._checks import check_callable, check_positive_int, check_positive_number, check_tensor

#: Calls faster than this (seconds) are timed in blocks lasting at least this long.
MIN_BLOCK_S = 1e-4
#: The most calls in one timed block (reached only by calls faster than 0.1 ns).
MAX_BLOCK_CALLS = 1_000_000
METHODS = ("auto", "perf_counter", "do_bench")
K = TypeVar("K", bound=Hashable)


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
    """Format a duration with a readable unit, 3 significant digits: ``0.0012 -> '1.2 ms'``."""
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


@contextlib.contextmanager
def cpu_threads(n: int = 1, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block on ``n`` CPU threads (PyTorch's intra-op pool), then restore the count.

    Timing small operations on a shared CPU is steadier on one thread: a multi-threaded op
    waits for its threads to be scheduled, a fixed cost that swamps short inputs when other
    work shares the cores, and bends fitted exponents. On a GPU (``device`` not a CPU) it
    changes nothing.

    >>> with cpu_threads(1):
    ...     torch.get_num_threads()
    1
    """
    check_positive_int("n", n)
    before = torch.get_num_threads()
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_of_rounds(
    runs: Mapping[K, Callable[[], Callable[[], Any]]],
    *,
    repeats: int,
    device: torch.device | str | None = None,
    threads: int | None = None,
) -> dict[K, float]:
    """The smallest wall-clock time of each run over ``repeats`` interleaved rounds.

    ``runs[key]()`` prepares one run, untimed (it may copy a cache, warm a step up, draw
    inputs), and returns the call to time. Every round visits all keys in their order, so a
    slow spell of a shared machine falls on all of them alike, and the minimum over the rounds
    is kept because disturbances only ever add time. The garbage collector is off and
    ``device`` is synchronised around each timed call, which runs on ``threads`` CPU threads
    (:func:`cpu_threads`) when given; the preparation keeps PyTorch's own setting.

    Use it where one call is long or stateful enough to time on its own (a prefill, a few
    decoding steps from a copied cache); :func:`benchmark` times a repeatable call instead.

    >>> best = best_of_rounds({"sum": lambda: lambda: sum(range(1000))}, repeats=3)
    >>> best["sum"] > 0
    True
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"runs must be a non-empty mapping key -> preparation, got {runs!r}")
    for key, prepare in runs.items():
        check_callable(f"runs[{key!r}]", prepare)
    check_positive_int("repeats", repeats)
    if threads is not None:
        check_positive_int("threads", threads)
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for key, prepare in runs.items():
            call = prepare()
            on_threads = (
                contextlib.nullcontext() if threads is None else cpu_threads(threads, device)
            )
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                with on_threads:
                    synchronize(device)
                    start = time.perf_counter()
                    call()
                    synchronize(device)
                    elapsed = time.perf_counter() - start
            finally:
                if gc_was_on:
                    gc.enable()
            best[key] = min(best[key], elapsed)
    return best


def _has_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def _check_grad_to_none(grad_to_none: Any) -> list[torch.Tensor]:
    if grad_to_none is None:
        return []
    if isinstance(grad_to_none, (torch.Tensor, str, bytes)) or not isinstance(
        grad_to_none, Sequence
    ):
        raise TypeError(
            "grad_to_none must be None or a sequence of tensors (a list or tuple; wrap a "
            f"single tensor in a list), got {type(grad_to_none).__name__}"
        )
    return [check_tensor(f"grad_to_none[{i}]", x) for i, x in enumerate(grad_to_none)]


def _clock_loop(
    fn: Callable[[], Any], dev: torch.device, min_run_time: float, grads: list[torch.Tensor]
) -> list[float]:
    """Seconds per call of ``fn``, one sample per timed block, until ``min_run_time``
    seconds of calls have been timed (see the module docstring)."""

    def timed(number: int) -> float:
        for x in grads:  # outside the timed region; number is 1 whenever grads are reset
            x.grad = None
        synchronize(dev)
        gc_was_on = gc.isenabled()
        gc.disable()  # as timeit does: no collection pause inside a timed block
        try:
            start = time.perf_counter()  # looked up per call: tests substitute a fake clock
            for _ in range(number):
                fn()
            synchronize(dev)
            return time.perf_counter() - start
        finally:
            if gc_was_on:
                gc.enable()

    probe = timed(1)
    number = 1
    if not grads and probe < MIN_BLOCK_S:
        number = MAX_BLOCK_CALLS if probe <= 0 else math.ceil(MIN_BLOCK_S / probe)
        number = min(number, MAX_BLOCK_CALLS)
    times = [probe] if number == 1 else []
    elapsed = probe if number == 1 else 0.0
    while elapsed < min_run_time or not times:
        block = timed(number)
        times.append(block / number)
        elapsed += block
    return times


def benchmark(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    min_run_time: float = 0.2,
    method: str = "auto",
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time ``fn()`` robustly and return a :class:`Timing` in seconds.

    Args:
        fn: a callable taking no arguments (wrap arguments in a ``lambda``).
        device: where ``fn`` runs; ``"cuda"`` selects event-based GPU timing. ``None``
            means the CPU.
        warmup: calls made before timing starts (lazy init, autotuning, caches).
        min_run_time: seconds of repeated calls to collect (at least one call is timed).
        method: ``"auto"``, ``"perf_counter"`` (the ``time.perf_counter`` loop of the module
            docstring, any device) or ``"do_bench"`` (``triton.testing.do_bench``, GPU only).
            ``"auto"`` picks ``"do_bench"`` on a CUDA device with Triton installed.
        grad_to_none: tensors whose ``.grad`` is set to ``None`` before every call (our
            warm-up calls and every timed call), outside the timed region, as
            ``triton.testing.do_bench(grad_to_none=)`` does (it gets them under
            ``"do_bench"``). Pass the leaves of a ``fn`` that runs a backward pass, so that
            each call writes fresh gradients instead of adding to the previous ones (which
            would time an extra addition and let the gradients grow). With
            ``"perf_counter"``, calls are then timed one at a time, never in blocks.
            Example: ``benchmark(lambda: loss(x).backward(), grad_to_none=[x])``.

    Returns:
        Timing with median, quartiles, min, max and the number of samples ``n``.

    Raises:
        TypeError: ``fn`` is not callable, ``grad_to_none`` is not a sequence of tensors.
        ValueError: a non-positive ``min_run_time``, a negative ``warmup``, an unknown
            ``method``, or ``"do_bench"`` without CUDA and Triton.
    """
    check_callable("fn", fn)
    check_positive_int("warmup", warmup, allow_zero=True)
    check_positive_number("min_run_time", min_run_time)
    grads = _check_grad_to_none(grad_to_none)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = dev.type == "cuda"
    if method == "do_bench" and not (on_gpu and _has_triton()):
        raise ValueError("method='do_bench' needs a CUDA device and triton installed")
    if method == "auto":
        method = "do_bench" if on_gpu and _has_triton() else "perf_counter"

    for _ in range(warmup):
        for x in grads:
            x.grad = None
        fn()
    synchronize(dev)

    if method == "do_bench":
        import triton.testing

        ms = triton.testing.do_bench(
            fn,
            warmup=25,
            rep=max(1, int(min_run_time * 1000)),
            grad_to_none=grads or None,
            return_mode="all",
        )
        return _summarise([t * 1e-3 for t in ms], "triton.testing.do_bench")

    return _summarise(_clock_loop(fn, dev, min_run_time, grads), "time.perf_counter")
