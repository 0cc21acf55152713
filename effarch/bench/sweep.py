"""Run several implementations over a range of sizes and collect a tidy table.

A sweep is the experiment behind every scaling figure in the book: for each size ``n``
it builds the inputs once, then measures each implementation's time, peak memory and
FLOPs. A series that grows past the time or memory budget (or runs out of memory) stops
there: its larger sizes are recorded as ``"out of budget"`` and the other series go on.
With ``rounds > 1`` the sweep then visits every size again and re-times each point,
keeping the least disturbed round, so that a slow spell of a shared machine does not bend
a curve.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from .._checks import (
    check_callable,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_sizes,
)
from .fit import PowerLawFit, fit_exponent
from .flops import format_flops, measure_flops
from .memory import format_bytes, peak_memory
from .timing import Timing, benchmark, format_seconds, synchronize

#: The ``status`` of a measured point, and of one skipped because it would exceed the budget.
OK = "ok"
OUT_OF_BUDGET = "out of budget"
#: The keys of every row of a :class:`SweepResult`, in the order its table prints them.
COLUMNS = (
    "impl",
    "size",
    "status",
    "time_s",
    "time_q25_s",
    "time_q75_s",
    "peak_bytes",
    "flops",
    "analytic_flops",
    "note",
)
MEASURES = ("time", "memory", "flops")


def is_out_of_memory(err: BaseException) -> bool:
    """True for the errors torch raises when an allocation fails (CPU or GPU)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


@dataclass
class SweepResult:
    """The tidy table of a sweep: one row per (implementation, size).

    Each row is a dict with the keys in :data:`COLUMNS`. Values that were not measured,
    or that lie beyond a series' budget, are ``nan``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    size_name: str = "n"

    @property
    def impls(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.setdefault(r["impl"], None)
        return list(seen)

    def series(self, impl: str, column: str = "time_s") -> tuple[list[int], list[float]]:
        """Sizes and values of ``column`` for the rows of ``impl`` that were measured."""
        if impl not in self.impls:
            raise ValueError(f"impl must be one of {self.impls}, got {impl!r}")
        check_choice("column", column, COLUMNS[3:9])
        pts = [
            (r["size"], r[column])
            for r in self.rows
            if r["impl"] == impl and r["status"] == OK and math.isfinite(r[column])
        ]
        return [p[0] for p in pts], [p[1] for p in pts]

    def fit(
        self, impl: str, column: str = "time_s", *, min_size: float | None = None
    ) -> PowerLawFit:
        """Fit ``column ~ c * size^p`` for one implementation (see ``fit_exponent``)."""
        sizes, values = self.series(impl, column)
        return fit_exponent(sizes, values, min_size=min_size)

    def below_from(self, impl: str, other: str, column: str = "time_s") -> int | None:
        """The smallest size from which ``impl``'s ``column`` stays below ``other``'s.

        Over the sizes both series measured: the returned size ``n`` has
        ``impl < other`` at ``n`` and at every larger common size (a crossover that holds);
        ``None`` when ``impl`` is not below ``other`` at the largest common size, or when
        they share no size.
        """
        a = dict(zip(*self.series(impl, column), strict=True))
        b = dict(zip(*self.series(other, column), strict=True))
        start = None
        for n in sorted(set(a) & set(b), reverse=True):
            if not a[n] < b[n]:
                break
            start = n
        return start

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (pandas is optional)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def table(self, columns: Sequence[str] = ("time_s", "peak_bytes", "flops")) -> str:
        """A plain-text table, sizes down, one column per implementation and quantity."""
        fmt = {"time_s": format_seconds, "peak_bytes": format_bytes, "flops": format_flops}
        fmt.update(analytic_flops=format_flops, time_q25_s=format_seconds)
        fmt.update(time_q75_s=format_seconds)
        header = [self.size_name] + [f"{i} {c}" for c in columns for i in self.impls]
        lines = [header]
        sizes = sorted({r["size"] for r in self.rows})
        index = {(r["impl"], r["size"]): r for r in self.rows}
        for n in sizes:
            line = [str(n)]
            for c in columns:
                for impl in self.impls:
                    r = index.get((impl, n))
                    if r is None:
                        line.append("")
                    elif r["status"] != OK:
                        line.append(r["status"])
                    else:
                        v = r[c]
                        line.append(fmt.get(c, str)(v) if math.isfinite(v) else "-")
            lines.append(line)
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(s.rjust(w) for s, w in zip(row, widths, strict=True)) for row in lines
        )

    def __str__(self) -> str:
        return self.table()


def _empty_row(impl: str, size: int, status: str, note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS, math.nan)
    row.update(impl=impl, size=size, status=status, note=note)
    return row


_NO_INPUTS = object()  # make_inputs ran out of memory (None is a valid single argument)


def sweep(
    impls: Mapping[str, Callable[..., Any]],
    sizes: Sequence[int],
    make_inputs: Callable[[int], Any],
    *,
    measure: Sequence[str] = ("time", "memory"),
    device: torch.device | str | None = None,
    time_budget: float | None = None,
    memory_budget: float | None = None,
    analytic_flops: Callable[[int], float] | Mapping[str, Callable[[int], float]] | None = None,
    warmup: int = 1,
    min_run_time: float = 0.1,
    size_name: str = "n",
    progress: bool = True,
    rounds: int = 1,
    agree: float | None = None,
) -> SweepResult:
    """Measure each implementation at each size; stop a series that exceeds its budget.

    Args:
        impls: ``{name: fn}``; each ``fn(*make_inputs(n))`` is one call to measure.
        sizes: the sizes ``n`` to visit, in increasing order (e.g. sequence lengths).
        make_inputs: ``n -> tuple of arguments`` (a non-tuple is passed as one argument).
            Inputs are built once per size and shared by all implementations, outside
            the timed region.
        measure: any of ``"time"``, ``"memory"`` and ``"flops"``.
        device: where the calls run (selects GPU timing and the CUDA allocator).
        time_budget: seconds per call; once a call takes longer, the series stops.
        memory_budget: bytes of peak memory; once a call needs more, the series stops.
        analytic_flops: ``n -> FLOPs`` (one formula for all, or one per implementation),
            stored beside the measured count.
        warmup, min_run_time: passed to :func:`~effarch.bench.benchmark`.
        size_name: the name of the size axis in tables and plots (``"T"``).
        progress: show a tqdm progress bar.
        rounds: how many times the sizes are visited (``"time"`` must be measured when
            ``rounds > 1``). The first round measures everything and its budgets decide
            where each series stops; every later round times again, size by size, each
            point the first round measured within budget. A point keeps the three timing
            columns of the round with the smallest lower quartile ``time_q25_s``:
            disturbances only ever add time, and a slow spell of a shared machine lasting
            seconds then spoils one round of a point rather than the point (as
            :func:`~effarch.bench.best_of_rounds` does for single calls).
        agree: when set (``rounds > 1``), a point is not timed again once a later round's
            lower quartile lies within this fraction of the best earlier one (``0.05``:
            5 %): two rounds far apart in time that agree were both undisturbed, and only
            the points whose rounds disagree pay for the remaining rounds. ``None`` (the
            default) times every point in every round.

    Returns:
        SweepResult: rows with status ``"ok"`` or ``"out of budget"``.

    Time against size, the best of three rounds:

    >>> res = sweep(
    ...     {"sum": lambda a: a.sum()},
    ...     [8, 64],
    ...     torch.ones,
    ...     measure="time",
    ...     min_run_time=0.001,
    ...     rounds=3,
    ...     progress=False,
    ... )
    >>> [r["size"] for r in res.rows], all(r["time_q25_s"] > 0 for r in res.rows)
    ([8, 64], True)
    """
    if not isinstance(impls, Mapping) or len(impls) == 0:
        raise ValueError(f"impls must be a non-empty mapping of name -> callable, got {impls!r}")
    for name, fn in impls.items():
        check_callable(f"impls[{name!r}]", fn)
    sizes = check_sizes("sizes", sizes)
    if sizes != sorted(sizes):
        raise ValueError(f"sizes must be increasing, got {sizes}")
    check_callable("make_inputs", make_inputs)
    if isinstance(measure, str):
        measure = (measure,)
    if not measure:
        raise ValueError(f"measure must name at least one of {list(MEASURES)}")
    for m in measure:
        check_choice("measure", m, MEASURES)
    check_positive_number("time_budget", time_budget, allow_none=True)
    check_positive_number("memory_budget", memory_budget, allow_none=True)
    check_positive_int("warmup", warmup, allow_zero=True)
    if isinstance(analytic_flops, Mapping):
        for name in analytic_flops:
            if name not in impls:
                raise ValueError(f"analytic_flops has a key {name!r} that is not in impls")
    elif analytic_flops is not None:
        check_callable("analytic_flops", analytic_flops)
    check_positive_int("rounds", rounds)
    check_positive_number("agree", agree, allow_none=True)
    if rounds > 1 and "time" not in measure:
        raise ValueError(
            f"rounds > 1 re-times every point, so measure must include 'time'; got "
            f"rounds={rounds} with measure={tuple(measure)}"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")

    result = SweepResult(size_name=size_name)
    stopped: dict[str, str] = {}
    total = rounds * len(sizes) * len(impls)
    bar = tqdm(total=total, disable=not progress, desc="sweep", leave=False)
    for n in sizes:
        active = [name for name in impls if name not in stopped]
        inputs: Any = _NO_INPUTS
        if active:
            try:
                inputs = make_inputs(n)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                for name in active:
                    stopped[name] = f"inputs for {size_name}={n} ran out of memory"
        if inputs is not _NO_INPUTS:
            inputs = _as_args(inputs)
        for name, fn in impls.items():
            bar.set_postfix_str(f"{name} {size_name}={n}")
            bar.update()
            if name in stopped:
                result.rows.append(_empty_row(name, n, OUT_OF_BUDGET, stopped[name]))
                continue
            row = _empty_row(name, n, OK)
            try:
                _measure_one(
                    row, fn, inputs, measure, dev, time_budget, memory_budget, warmup, min_run_time
                )
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                reason = f"out of memory at {size_name}={n}"
                stopped[name] = reason
                result.rows.append(_empty_row(name, n, OUT_OF_BUDGET, reason))
                _free(dev)
                continue
            if analytic_flops is not None:
                f = (
                    analytic_flops.get(name)
                    if isinstance(analytic_flops, Mapping)
                    else analytic_flops
                )
                if f is not None:
                    row["analytic_flops"] = float(f(n))
            if row["note"]:
                stopped[name] = f"{row['note']} at {size_name}={n}"
            result.rows.append(row)
        del inputs
        _free(dev)
    settled: set[tuple[str, int]] = set()  # points whose rounds agreed: not timed again
    for _ in range(rounds - 1):
        _retime(
            result, impls, sizes, make_inputs, dev, warmup, min_run_time, size_name, bar,
            agree, settled,
        )  # fmt: skip
    bar.close()
    return result


def _retime(
    result: SweepResult,
    impls: Mapping[str, Callable[..., Any]],
    sizes: Sequence[int],
    make_inputs: Callable[[int], Any],
    dev: torch.device,
    warmup: int,
    min_run_time: float,
    size_name: str,
    bar: Any,
    agree: float | None,
    settled: set[tuple[str, int]],
) -> None:
    """One more round of a sweep: time again each point measured within budget and not yet
    settled, and keep, per point, the timing with the smaller lower quartile. A point whose
    new lower quartile lies within ``agree`` of its best so far joins ``settled``."""
    index = {(r["impl"], r["size"]): r for r in result.rows}
    for n in sizes:
        todo = [
            name for name in impls if (name, n) not in settled and _retimable(index.get((name, n)))
        ]
        bar.update(len(impls) - len(todo))
        if not todo:
            continue
        try:
            inputs = _as_args(make_inputs(n))
            for name in todo:
                bar.set_postfix_str(f"{name} {size_name}={n}")
                bar.update()
                call = partial(impls[name], *inputs)
                timing = benchmark(call, device=dev, warmup=warmup, min_run_time=min_run_time)
                row = index[(name, n)]
                best = row["time_q25_s"]
                if agree is not None and abs(timing.q25 - best) <= agree * min(timing.q25, best):
                    settled.add((name, n))
                if timing.q25 < best:
                    row.update(_time_columns(timing))
        except Exception as err:  # the first round fitted; keep its timings at this size
            if not is_out_of_memory(err):
                raise
        finally:
            inputs = None
            _free(dev)


def _as_args(inputs: Any) -> tuple:
    """``make_inputs``'s value as the arguments of a call: a non-tuple is one argument."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _time_columns(timing: Timing) -> dict[str, float]:
    """A row's three timing columns from one :func:`~effarch.bench.benchmark` result."""
    return {"time_s": timing.median, "time_q25_s": timing.q25, "time_q75_s": timing.q75}


def _retimable(row: dict[str, Any] | None) -> bool:
    """Whether a later round times this point again: measured, timed, within budget."""
    return (
        row is not None
        and row["status"] == OK
        and not row["note"]
        and math.isfinite(row["time_q25_s"])
    )


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _measure_one(
    row: dict[str, Any],
    fn: Callable[..., Any],
    inputs: tuple,
    measure: Sequence[str],
    dev: torch.device,
    time_budget: float | None,
    memory_budget: float | None,
    warmup: int,
    min_run_time: float,
) -> None:
    call = lambda: fn(*inputs)
    if "memory" in measure:
        usage = peak_memory(call, device=dev)
        row["peak_bytes"] = float(usage.peak)
        if memory_budget is not None and usage.peak > memory_budget:
            row["note"] = f"peak {format_bytes(usage.peak)} > budget {format_bytes(memory_budget)}"
    if "flops" in measure:
        row["flops"] = float(measure_flops(call).total)
    if "time" in measure:
        # One timed probe first: a call slower than the budget is recorded as measured
        # once and ends the series, instead of being repeated for min_run_time.
        synchronize(dev)
        t0 = time.perf_counter()
        call()
        synchronize(dev)
        probe = time.perf_counter() - t0
        if time_budget is not None and probe > time_budget:
            row.update(time_s=probe, time_q25_s=probe, time_q75_s=probe)
            note = f"time {format_seconds(probe)} > budget {format_seconds(time_budget)}"
            row["note"] = f"{row['note']}; {note}" if row["note"] else note
            return
        timing = benchmark(call, device=dev, warmup=max(warmup - 1, 0), min_run_time=min_run_time)
        row.update(_time_columns(timing))
        if time_budget is not None and timing.median > time_budget:
            note = f"time {format_seconds(timing.median)} > budget {format_seconds(time_budget)}"
            row["note"] = f"{row['note']}; {note}" if row["note"] else note
