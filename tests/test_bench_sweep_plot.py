"""sweep(): budgets, out-of-memory handling, the tidy table; and the plotting helpers."""

import math
import time

import numpy as np
import pytest
import torch

from effarch.bench import (
    DEVICES,
    OK,
    OUT_OF_BUDGET,
    DeviceSpec,
    measure_device,
    plot_kv_cache,
    plot_memory,
    plot_roofline,
    plot_scaling,
    sweep,
)


def _sleep_ms(n):
    time.sleep(n / 1000)


def test_sweep_builds_a_tidy_table():
    res = sweep(
        {"square": lambda a: a @ a, "sum": lambda a: a.sum()},
        [16, 32, 64],
        lambda n: torch.ones(n, n),
        measure=("time", "memory", "flops"),
        analytic_flops={"square": lambda n: 2 * n**3},
        min_run_time=0.01,
        progress=False,
    )
    assert res.impls == ["square", "sum"]
    assert len(res.rows) == 6
    assert all(r["status"] == OK for r in res.rows)
    sizes, flops = res.series("square", "flops")
    assert sizes == [16, 32, 64]
    assert flops == [2.0 * n**3 for n in sizes]  # FlopCounterMode's count
    assert res.series("square", "analytic_flops")[1] == flops
    assert math.isnan(res.rows[1]["analytic_flops"])  # no formula given for "sum"
    _, peaks = res.series("square", "peak_bytes")
    assert peaks == [4.0 * n * n for n in sizes]  # the output matrix, measured
    assert "square time_s" in res.table() and "64" in res.table()


def test_time_budget_stops_only_the_slow_series():
    res = sweep(
        {"slow": _sleep_ms, "fast": lambda n: None},
        [1, 5, 50, 100],
        lambda n: n,
        measure="time",
        time_budget=0.02,
        min_run_time=0.01,
        progress=False,
    )
    slow = [r for r in res.rows if r["impl"] == "slow"]
    assert [r["status"] for r in slow] == [OK, OK, OK, OUT_OF_BUDGET]
    assert slow[2]["time_s"] >= 0.05  # measured once, then the series stops
    assert "budget" in slow[2]["note"] and "n=50" in slow[3]["note"]
    assert math.isnan(slow[3]["time_s"])
    assert all(r["status"] == OK for r in res.rows if r["impl"] == "fast")


def test_memory_budget_stops_the_series():
    res = sweep(
        {"alloc": lambda n: torch.ones(n * 1024 * 256)},  # n MiB
        [1, 2, 8, 16],
        lambda n: n,
        measure="memory",
        memory_budget=4 * 2**20,
        progress=False,
    )
    assert [r["status"] for r in res.rows] == [OK, OK, OK, OUT_OF_BUDGET]
    assert res.rows[2]["peak_bytes"] == 8 * 2**20


class _RoundClock:
    """A clock that moves only when a measured call charges it: each call costs the
    milliseconds per unit of size that its round gives (``ms_per_round``: one list for every
    size, or ``{size: list}``), so the best round of each point is known. A size's round is
    how many times ``make_inputs`` has built it, less one."""

    def __init__(self, ms_per_round):
        self.now, self.ms_per_round = 0.0, ms_per_round
        self.built = {}  # n -> times make_inputs built it
        self.calls = {}  # (round, n) -> calls

    def __call__(self):
        return self.now

    @property
    def round(self):
        return max(self.built.values()) - 1

    def inputs(self, n):
        self.built[n] = self.built.get(n, 0) + 1
        return n

    def call(self, n):
        round_ = self.built[n] - 1
        self.calls[(round_, n)] = self.calls.get((round_, n), 0) + 1
        ms = self.ms_per_round
        self.now += (ms[n] if isinstance(ms, dict) else ms)[round_] * n / 1000


def test_rounds_keep_the_least_disturbed_round_of_each_point(monkeypatch):
    clock = _RoundClock(ms_per_round=[3.0, 1.0, 2.0])  # round 2: undisturbed
    monkeypatch.setattr(time, "perf_counter", clock)
    res = sweep(
        {"work": clock.call},
        [1, 2, 4],
        clock.inputs,
        measure="time",
        min_run_time=0.05,
        rounds=3,
        progress=False,
    )
    assert clock.round == 2  # three rounds, each building the inputs of every size
    assert {r for r, _ in clock.calls} == {0, 1, 2}
    sizes, q25 = res.series("work", "time_q25_s")
    assert sizes == [1, 2, 4]
    assert q25 == pytest.approx([1e-3 * n for n in sizes])  # round 2's 1 ms per unit
    _, median = res.series("work", "time_s")
    assert median == pytest.approx([1e-3 * n for n in sizes])  # from the same round


def test_later_rounds_time_only_points_measured_within_budget(monkeypatch):
    clock = _RoundClock(ms_per_round=[1.0, 0.5])
    monkeypatch.setattr(time, "perf_counter", clock)
    res = sweep(
        {"work": clock.call},
        [1, 10, 100, 1000],
        clock.inputs,
        measure="time",
        time_budget=0.05,  # 100 units take 0.1 s: measured once, and 1000 is skipped
        min_run_time=0.05,
        rounds=2,
        progress=False,
    )
    assert [r["status"] for r in res.rows] == [OK, OK, OK, OUT_OF_BUDGET]
    assert clock.calls[(0, 100)] == 1  # the probe that went over the budget
    assert (1, 100) not in clock.calls and (1, 1000) not in clock.calls
    assert res.rows[2]["time_q25_s"] == pytest.approx(0.1)  # the first round's probe
    assert res.rows[1]["time_q25_s"] == pytest.approx(0.005)  # round 2: 0.5 ms per unit


def test_points_whose_rounds_agree_are_not_timed_again(monkeypatch):
    """agree=0.05: after the second round, a point within 5 % of its first round is settled
    and left out of the third; the others are timed a third time and keep their best."""
    ms = {1: [1.0, 1.03, 9.0], 2: [3.0, 1.0, 0.5], 4: [1.0, 2.0, 0.9]}  # size -> per round
    clock = _RoundClock(ms_per_round=ms)
    monkeypatch.setattr(time, "perf_counter", clock)
    res = sweep(
        {"work": clock.call}, [1, 2, 4], clock.inputs, measure="time", min_run_time=0.05,
        rounds=3, agree=0.05, progress=False,
    )  # fmt: skip
    assert clock.built == {1: 2, 2: 3, 4: 3}  # size 1 settled after two rounds: 1.03 vs 1.0 ms
    assert (2, 1) not in clock.calls and (2, 2) in clock.calls and (2, 4) in clock.calls
    _, q25 = res.series("work", "time_q25_s")
    assert q25 == pytest.approx([1e-3, 2 * 0.5e-3, 4 * 0.9e-3])  # the best round of each
    # without agree, every point is timed in every round (and size 1 keeps its 1.0 ms)
    clock = _RoundClock(ms_per_round=ms)
    monkeypatch.setattr(time, "perf_counter", clock)
    res = sweep(
        {"work": clock.call}, [1, 2, 4], clock.inputs, measure="time", min_run_time=0.05,
        rounds=3, progress=False,
    )  # fmt: skip
    assert clock.built == {1: 3, 2: 3, 4: 3}
    assert res.series("work", "time_q25_s")[1][0] == pytest.approx(1e-3)


def test_out_of_memory_is_out_of_budget_and_others_go_on():
    def greedy(n):
        if n >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return n

    def cpu_greedy(n):
        if n >= 32:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 TB")
        return n

    res = sweep(
        {"greedy": greedy, "cpu greedy": cpu_greedy, "modest": lambda n: n},
        [16, 32, 64, 128],
        lambda n: n,
        measure="time",
        min_run_time=0.005,
        progress=False,
    )
    status = {(r["impl"], r["size"]): r["status"] for r in res.rows}
    assert [status[("greedy", n)] for n in (16, 32, 64, 128)] == [OK, OK] + [OUT_OF_BUDGET] * 2
    assert [status[("cpu greedy", n)] for n in (16, 32, 64, 128)] == [OK] + [OUT_OF_BUDGET] * 3
    assert all(status[("modest", n)] == OK for n in (16, 32, 64, 128))


def test_inputs_that_run_out_of_memory_stop_every_series():
    def make(n):
        if n > 2:
            raise MemoryError
        return n

    res = sweep(
        {"a": lambda n: n, "b": lambda n: n},
        [1, 2, 4],
        make,
        measure="time",
        min_run_time=0.005,
        progress=False,
    )
    assert [r["status"] for r in res.rows if r["size"] == 4] == [OUT_OF_BUDGET] * 2


def test_sweep_lets_real_bugs_through():
    with pytest.raises(ZeroDivisionError):
        sweep({"bug": lambda n: 1 / 0}, [1], lambda n: n, measure="time", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "err", "words"),
    [
        (dict(impls={}), ValueError, "impls must be a non-empty"),
        (dict(impls={"x": 3}), TypeError, r"impls\['x'\] must be callable"),
        (dict(sizes=[]), ValueError, "sizes must not be empty"),
        (dict(sizes=[4, 2]), ValueError, "increasing"),
        (dict(sizes=[0, 2]), ValueError, r"sizes\[0\]"),
        (dict(sizes="128"), TypeError, "sizes must be a sequence"),
        (dict(make_inputs=None), TypeError, "make_inputs must be callable"),
        (dict(time_budget=-1.0), ValueError, "time_budget"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(measure=("speed",)), ValueError, "measure"),
        (dict(measure=()), ValueError, "measure"),
        (dict(analytic_flops={"other": lambda n: n}), ValueError, "analytic_flops"),
        (dict(rounds=0), ValueError, "rounds"),
        (dict(rounds=2, measure=("memory",)), ValueError, "must include 'time'"),
        (dict(rounds=2, agree=-0.1), ValueError, "agree"),
    ],
)
def test_sweep_rejects_bad_input(kwargs, err, words):
    args = dict(impls={"f": lambda n: n}, sizes=[1, 2], make_inputs=lambda n: n)
    args.update(kwargs)
    with pytest.raises(err, match=words):
        sweep(args.pop("impls"), args.pop("sizes"), args.pop("make_inputs"), progress=False, **args)


def _synthetic_result():
    """O(n) and O(n^2) workloads measured for real: the fit must tell them apart."""
    return sweep(
        {"linear": lambda a: a.cumsum(0), "quadratic": lambda a: a[:, None] * a[None, :]},
        [512, 1024, 2048, 4096],
        lambda n: torch.ones(n),
        measure=("memory",),
        progress=False,
        size_name="T",
    )


def test_plot_scaling_labels_the_fitted_exponent():
    res = _synthetic_result()
    ax = plot_memory(res)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "linear ~ T^1.00"
    assert labels[1] == "quadratic ~ T^2.00"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "MiB" in ax.get_ylabel() and "T" in ax.get_xlabel()
    # overlapping curves stay apart: each series its own line style and marker
    series = [line for line in ax.get_lines() if line.get_label() in labels]
    assert len(series) == 2
    assert len({(line.get_linestyle(), line.get_marker()) for line in series}) == 2


def test_plot_scaling_marks_out_of_budget_series():
    res = sweep(
        {"slow": _sleep_ms, "fast": lambda n: None},
        [1, 2, 40, 80],
        lambda n: n,
        measure="time",
        time_budget=0.01,
        min_run_time=0.005,
        progress=False,
    )
    ax = plot_scaling(res)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("slow" in s and "out of budget" in s for s in labels)
    assert not any("fast" in s and "out of budget" in s for s in labels)


def test_roofline_model():
    h100 = DEVICES["H100"]
    assert h100.ridge_point == pytest.approx(989e12 / 3.35e12)
    assert h100.attainable(1.0) == pytest.approx(3.35e12)  # memory-bound: I * bandwidth
    assert h100.attainable(1e4) == h100.peak_flops  # compute-bound: the flat roof
    for name in ("T4", "A100", "H100", "H200"):
        assert DEVICES[name].peak_flops > 1e13 and DEVICES[name].bandwidth > 1e11
    with pytest.raises(ValueError, match="intensity"):
        h100.attainable(-1)


def test_measure_device_measures_this_cpu():
    spec = measure_device("cpu", matmul_size=256, copy_bytes=8 * 2**20, repeats=2)
    assert spec.name == "this CPU"
    assert 1e8 < spec.peak_flops < 1e13  # between a slow core and a very fast CPU
    assert 1e8 < spec.bandwidth < 1e12


def test_plot_roofline_and_kv_cache():
    ax = plot_roofline([DEVICES["T4"], DEVICES["H100"]], points=[("decode", 1.0, 3e12)])
    assert len(ax.get_lines()) >= 5  # two roofs, two ridges, one point
    with pytest.raises(ValueError, match="devices"):
        plot_roofline([])
    with pytest.raises(TypeError, match="DeviceSpec"):
        plot_roofline(["H100"])
    ax = plot_kv_cache({"x": lambda n: n * 2**20}, [1024, 2048], devices=[DEVICES["H200"]])
    line = ax.get_lines()[0]
    assert np.allclose(line.get_ydata(), [1.0, 2.0])  # GiB
    with pytest.raises(ValueError, match="series"):
        plot_kv_cache({}, [1])
    assert isinstance(DeviceSpec("x", 1.0, 1.0).ridge_point, float)


def test_below_from_is_the_start_of_a_lead_that_holds():
    from effarch.bench.sweep import COLUMNS, SweepResult

    def row(impl, size, t, status=OK):
        r = dict.fromkeys(COLUMNS, math.nan)
        r.update(impl=impl, size=size, status=status, note="", time_s=t)
        return r

    fast = {1: 5.0, 2: 1.0, 4: 3.0, 8: 1.0, 16: 1.0}  # below at 2, above at 4, below after
    slow = {1: 2.0, 2: 2.0, 4: 2.0, 8: 2.0, 16: 2.0, 32: 2.0}
    res = SweepResult(
        [row("a", n, t) for n, t in fast.items()] + [row("b", n, t) for n, t in slow.items()]
    )
    assert res.below_from("a", "b") == 8  # the lead at 2 does not hold; 32: only b measured
    assert res.below_from("b", "a") is None  # a is below at the largest common size
    res.rows.append(row("a", 32, math.nan, OUT_OF_BUDGET))
    assert res.below_from("a", "b") == 8
    with pytest.raises(ValueError, match="impl"):
        res.below_from("a", "c")
