"""The timing and memory tools against quantities known in advance."""

import time

import pytest
import torch

from effarch.bench import benchmark, format_bytes, format_seconds, peak_memory


def test_benchmark_measures_a_known_sleep():
    t = benchmark(lambda: time.sleep(0.004), min_run_time=0.05)
    assert 0.0039 <= t.median <= 0.03  # never less than the sleep; loaded machines add a bit
    assert t.q25 <= t.median <= t.q75
    assert t.min <= t.q25 and t.q75 <= t.max
    assert t.n >= 2 and len(t.times) == t.n
    assert t.method == "torch.utils.benchmark"


def test_benchmark_orders_cheap_and_expensive_work():
    a = torch.randn(64, 64)
    b = torch.randn(512, 512)
    cheap = benchmark(lambda: a @ a, min_run_time=0.05)
    dear = benchmark(lambda: b @ b, min_run_time=0.05)
    assert dear.median > 10 * cheap.median  # 512x more FLOPs


def test_benchmark_warms_up_before_timing():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        if len(calls) == 1:
            time.sleep(0.2)  # a slow first call (lazy init) must not be timed

    t = benchmark(fn, warmup=1, min_run_time=0.02)
    assert t.max < 0.1


@pytest.mark.parametrize(
    ("kwargs", "err", "words"),
    [
        (dict(fn=42), TypeError, "fn must be callable"),
        (dict(fn=lambda: None, min_run_time=-1), ValueError, "min_run_time"),
        (dict(fn=lambda: None, warmup=-1), ValueError, "warmup"),
        (dict(fn=lambda: None, method="stopwatch"), ValueError, "method"),
        (dict(fn=lambda: None, method="do_bench"), ValueError, "CUDA"),
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
