"""The timing and memory tools against quantities known in advance.

Timing is tested on a fake clock (``time.perf_counter`` replaced by one that only moves when
a call charges it), so every statistic is known exactly and no assertion depends on how
busy the machine is.
"""

import gc
import math
import time

import pytest
import torch

from effarch.bench import benchmark, format_bytes, format_seconds, measure_flops, peak_memory
from effarch.bench import timing as timing_module

U = 2.0**-10  # about 1 ms, a binary fraction: the sums and quotients below are exact


class FakeClock:
    """Stands still until ``charge(seconds)`` moves it; counts how often it is read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def charge(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def test_benchmark_reports_the_statistics_of_known_call_times(clock):
    durations = iter([0.5, 5 * U, 1 * U, 4 * U, 2 * U, 3 * U, 100.0])
    calls = []

    def fn():
        calls.append(gc.isenabled())
        clock.charge(next(durations))

    t = benchmark(fn, warmup=1, min_run_time=15 * U)
    # the warm-up call (0.5 s) is not timed; timing stops once 1+2+3+4+5 = 15 U are timed
    assert t.times == (5 * U, 1 * U, 4 * U, 2 * U, 3 * U) and t.n == 5
    assert (t.min, t.q25, t.median, t.q75, t.max) == (U, 2 * U, 3 * U, 4 * U, 5 * U)
    assert t.iqr == 2 * U
    assert t.method == "time.perf_counter"
    assert len(calls) == 6 and clock.reads == 2 * 5  # one start and one end read per call
    assert calls[0] and not any(calls[1:])  # the collector is off while calls are timed
    assert gc.isenabled()  # and on again afterwards


def test_benchmark_warms_up_before_timing(clock):
    def make_fn():
        n = 0

        def fn():
            nonlocal n
            n += 1
            clock.charge(1.0 if n == 1 else U)  # a slow first call (lazy init)

        return fn

    assert benchmark(make_fn(), warmup=1, min_run_time=4 * U).max == U  # not timed
    assert benchmark(make_fn(), warmup=0, min_run_time=4 * U).max == 1.0  # timed


def test_benchmark_times_fast_calls_in_blocks(clock):
    cost = 2.0**-20  # about 1 us: far below MIN_BLOCK_S, so the clock's reads would matter
    calls = 0

    def fn():
        nonlocal calls
        calls += 1
        clock.charge(cost)

    t = benchmark(fn, warmup=2, min_run_time=64 * timing_module.MIN_BLOCK_S)
    number = math.ceil(timing_module.MIN_BLOCK_S / cost)  # the rule of the module docstring
    assert number > 1
    assert t.median == t.min == t.max == cost  # per call, not per block
    assert calls == 2 + 1 + t.n * number  # warm-up, the probe, then whole blocks
    assert clock.reads == 2 * (1 + t.n)
    assert t.n * number * cost >= 64 * timing_module.MIN_BLOCK_S  # min_run_time was timed
    assert (t.n - 1) * number * cost < 64 * timing_module.MIN_BLOCK_S  # and not much more


def test_benchmark_orders_cheap_and_expensive_work(clock):
    """A fake machine that runs each matmul for real and charges its clock for the FLOPs
    the toolkit counts: 512x the FLOPs must read as 512x the time per call, whether the
    call is timed in blocks (the cheap one) or alone (the expensive one)."""
    a, b = torch.randn(64, 64), torch.randn(512, 512)
    flops = {n: measure_flops(lambda x=x: x @ x).total for n, x in ((64, a), (512, b))}
    assert flops[512] == 512 * flops[64] == 2 * 512**3
    rate = 2.0**40  # FLOP/s of the fake machine

    def timed(x, n):
        def fn():
            x @ x
            clock.charge(flops[n] / rate)

        return benchmark(fn, min_run_time=2**-9)

    cheap, dear = timed(a, 64), timed(b, 512)
    assert cheap.median < timing_module.MIN_BLOCK_S <= dear.median  # both paths are used
    assert dear.median == 512 * cheap.median == flops[512] / rate


def test_benchmark_on_the_real_clock():
    seen = []
    t = benchmark(lambda: seen.append(gc.isenabled()) or sum(range(1000)), min_run_time=0.01)
    assert t.method == "time.perf_counter"
    assert t.n >= 1 and len(t.times) == t.n
    assert t.min <= t.q25 <= t.median <= t.q75 <= t.max
    assert all(math.isfinite(x) and x >= 0 for x in t.times)
    assert seen[0] and not any(seen[1:]) and gc.isenabled()


def test_grad_to_none_resets_gradients_before_every_call_outside_the_timing(clock, monkeypatch):
    x = torch.ones(3, requires_grad=True)
    cost = 2.0**-20  # fast, yet timed one call at a time
    entered_with_none, read_with_none = [], []

    def fn():
        entered_with_none.append(x.grad is None)
        (2 * x).sum().backward()  # d/dx sum(2x) = 2
        clock.charge(cost)

    def read():
        read_with_none.append(x.grad is None)
        return clock()

    monkeypatch.setattr(time, "perf_counter", read)
    t = benchmark(fn, warmup=2, min_run_time=8 * cost, grad_to_none=[x])
    assert len(entered_with_none) == 2 + t.n and all(entered_with_none)
    assert t.n == 8 and t.times == (cost,) * 8  # every call is a sample: no blocks
    assert torch.equal(x.grad, torch.full((3,), 2.0))  # one call's gradient, not a sum
    # reset before the start read, gradient written before the end read: reset is not timed
    assert read_with_none == [True, False] * t.n


def test_without_grad_to_none_gradients_add_up(clock):
    x = torch.ones(3, requires_grad=True)
    calls = 0

    def fn():
        nonlocal calls
        calls += 1
        (2 * x).sum().backward()
        clock.charge(U)

    benchmark(fn, warmup=2, min_run_time=4 * U)
    assert calls == 2 + 4
    assert torch.equal(x.grad, torch.full((3,), 2.0 * calls))


def test_grad_to_none_is_passed_to_do_bench(monkeypatch):
    triton_testing = pytest.importorskip("triton.testing")
    seen = {}

    def do_bench(fn, **kwargs):
        seen.update(kwargs)
        return [3.0, 1.0, 2.0]  # milliseconds

    monkeypatch.setattr(timing_module, "_has_triton", lambda: True)
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    x = torch.ones(2, requires_grad=True)
    x.grad = torch.ones(2)
    calls = []
    t = benchmark(lambda: calls.append(x.grad), device="cuda", grad_to_none=(x,))
    assert seen["grad_to_none"] == [x] and seen["return_mode"] == "all"
    assert calls == [None]  # our own warm-up call resets too
    assert t.method == "triton.testing.do_bench" and t.times == (3e-3, 1e-3, 2e-3)
    assert t.median == 2e-3
    benchmark(lambda: None, device="cuda")
    assert seen["grad_to_none"] is None


@pytest.mark.parametrize(
    ("kwargs", "err", "words"),
    [
        (dict(fn=42), TypeError, "fn must be callable"),
        (dict(fn=lambda: None, min_run_time=-1), ValueError, "min_run_time"),
        (dict(fn=lambda: None, warmup=-1), ValueError, "warmup"),
        (dict(fn=lambda: None, method="stopwatch"), ValueError, "method"),
        (dict(fn=lambda: None, method="do_bench"), ValueError, "CUDA"),
        (dict(fn=lambda: None, grad_to_none=torch.ones(2)), TypeError, "grad_to_none must be"),
        (dict(fn=lambda: None, grad_to_none=[torch.ones(2), 1.0]), TypeError, r"grad_to_none\[1\]"),
        (dict(fn=lambda: None, grad_to_none="x"), TypeError, "grad_to_none must be"),
    ],
)
def test_benchmark_rejects_bad_input(kwargs, err, words):
    fn = kwargs.pop("fn")
    with pytest.raises(err, match=words):
        benchmark(fn, **kwargs)


def test_peak_memory_sees_a_known_allocation():
    n = 1_000_000
    usage = peak_memory(lambda: torch.ones(n, dtype=torch.float32))
    assert usage.peak == 4 * n
    assert usage.retained == 4 * n  # the returned tensor is still held


def test_peak_memory_is_a_peak_not_a_sum():
    def fn():
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 4 MB: 8 MB held here, the peak
        del a
        c = torch.ones(500_000)  # 2 MB: 6 MB held
        del b, c
        return None

    usage = peak_memory(fn)
    assert 8_000_000 <= usage.peak <= 8_000_000 + 256  # + a few bytes of scalar temporaries
    assert usage.retained == 0


def test_peak_memory_ignores_inputs_allocated_before():
    x = torch.ones(2_000_000)
    usage = peak_memory(lambda: x.sum())
    assert usage.peak < 1024  # only the scalar result


def test_peak_memory_of_a_matmul_matches_its_output():
    a, b = torch.randn(300, 400), torch.randn(400, 500)
    usage = peak_memory(lambda: a @ b)
    assert usage.peak >= 300 * 500 * 4
    assert usage.peak <= 2 * 300 * 500 * 4  # no hidden copies of the inputs


def test_peak_memory_rejects_bad_input():
    with pytest.raises(TypeError, match="fn must be callable"):
        peak_memory("not a function")
    with pytest.raises(ValueError, match="CPU or CUDA"):
        peak_memory(lambda: None, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            peak_memory(lambda: None, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_peak_memory_on_gpu_sees_a_known_allocation():  # pragma: no cover - GPU only
    n = 1 << 22
    usage = peak_memory(lambda: torch.ones(n, device="cuda"), device="cuda")
    assert usage.peak >= 4 * n


def test_formatters():
    assert format_seconds(0.0012) == "1.2 ms"
    assert format_seconds(2.5) == "2.5 s"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(512) == "512 B"
    assert format_seconds(float("nan")) == "n/a"


def test_cpu_threads_sets_and_restores_the_pool():
    from effarch.bench import cpu_threads

    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(1, device="cuda"):  # a GPU run keeps the CPU pool as it is
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("restored even when the block fails")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be a positive int"), cpu_threads(0):
        pass
