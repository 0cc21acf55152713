"""FLOP counting (measured against analytic) and exponent fitting."""

import math
import time

import numpy as np
import pytest
import torch

from effarch.attention import attention_mask, naive_attention
from effarch.bench import attention_flops, fit_exponent, matmul_flops, measure_flops, sweep
from effarch.bench.timing import MIN_BLOCK_S


@pytest.mark.parametrize(("m", "k", "n"), [(3, 5, 7), (64, 128, 32), (1, 1, 1)])
def test_measured_matmul_flops_equal_2mkn(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    count = measure_flops(lambda: a @ b)
    assert count.total == matmul_flops(m, k, n) == 2 * m * k * n
    assert count.by_operator == {"mm": 2 * m * k * n}


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv"), [(17, 17, 4, 4), (8, 33, 6, 2), (64, 64, 2, 1)])
def test_naive_attention_flops_match_the_formula(tq, tk, hq, hkv):
    q = torch.randn(2, tq, hq, 16)
    k, v = torch.randn(2, tk, hkv, 16), torch.randn(2, tk, hkv, 16)
    measured = measure_flops(lambda: naive_attention(q, k, v)).total
    assert measured == attention_flops(2, tq, hq, 16, seq_k=tk)
    # the same by hand: QK^T and PV are each B*H*Tq*Tk multiply-adds per head dim
    assert measured == 2 * (2 * 2 * hq * tq * tk * 16)


@pytest.mark.parametrize(("tq", "tk"), [(1, 1), (5, 5), (3, 9), (9, 3), (100, 257), (257, 100)])
def test_causal_attention_flops_count_the_unmasked_pairs(tq, tk):
    pairs = int(attention_mask(tq, tk, causal=True).sum())  # brute force over the mask
    assert attention_flops(1, tq, 1, 8, seq_k=tk, causal=True) == 2 * pairs * 16


def test_flop_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="fn must be callable"):
        measure_flops(3)
    with pytest.raises(ValueError, match="seq_q"):
        attention_flops(1, 0, 1, 8)
    with pytest.raises(TypeError, match="head_dim"):
        attention_flops(1, 4, 1, 8.0)


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5, 3.0])
def test_fit_recovers_exact_power_laws(p):
    n = np.array([16, 32, 64, 128, 256, 512])
    fit = fit_exponent(n, 3.0 * n**p)
    assert fit.exponent == pytest.approx(p, abs=1e-9)
    assert fit.coefficient == pytest.approx(3.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_tolerates_noise_and_ignores_missing_points():
    rng = np.random.default_rng(0)
    n = 2.0 ** np.arange(6, 16)
    y = 1e-6 * n**2 * np.exp(rng.normal(0, 0.05, n.size))
    y[-1] = math.nan  # an out-of-budget point
    fit = fit_exponent(n, y)
    assert fit.exponent == pytest.approx(2.0, abs=0.05)
    assert fit.n_points == n.size - 1


def test_fit_min_size_drops_the_overhead_dominated_head():
    n = 2.0 ** np.arange(4, 14)
    y = 1e-5 + 1e-9 * n**2  # a constant overhead hides the quadratic at small n
    assert fit_exponent(n, y).exponent < 1.5
    assert fit_exponent(n, y, min_size=2**11).exponent == pytest.approx(2.0, abs=0.02)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        fit_exponent([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_exponent([1, 2], [1, math.nan])


def test_sweep_plus_fit_finds_linear_and_quadratic_work(monkeypatch):
    """Measured, not synthetic: O(n) and O(n^2) matrix products run for real over a sweep;
    their FLOPs are counted by the toolkit and their time is read on a fake clock that each
    call charges for its FLOPs (a machine of 2^27 FLOP/s), so no assertion depends on the
    load of this machine. Both columns must fit the exponents 1 and 2."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    rate, c = 2.0**27, 4
    a, b = torch.ones(2048, 2048), torch.ones(2048, c)
    work = {"linear": lambda n: 2 * n * c * c, "quadratic": lambda n: 2 * n * n * c}

    def linear(n):
        a[:n, :c] @ b[:c]  # [n, c] @ [c, c]
        now[0] += work["linear"](n) / rate

    def quadratic(n):
        a[:n, :n] @ b[:n]  # [n, n] @ [n, c]
        now[0] += work["quadratic"](n) / rate

    sizes = [2**k for k in range(6, 12)]
    result = sweep({"linear": linear, "quadratic": quadratic}, sizes, lambda n: n,
                   measure=("time", "flops"), analytic_flops=work, min_run_time=2**-7,
                   progress=False)  # fmt: skip
    assert len(result.rows) == 2 * len(sizes)
    for row in result.rows:
        assert row["status"] == "ok" and row["flops"] == row["analytic_flops"]
        assert row["time_s"] == row["analytic_flops"] / rate  # seconds per call, exactly
    # the cheapest calls are timed in blocks, the dearest one at a time
    assert result.rows[0]["time_s"] < MIN_BLOCK_S <= result.rows[-1]["time_s"]
    for column in ("flops", "time_s"):
        assert result.fit("linear", column).exponent == pytest.approx(1.0, abs=1e-9)
        assert result.fit("quadratic", column).exponent == pytest.approx(2.0, abs=1e-9)


def test_cpu_sdpa_counted_like_its_matrix_products():
    """PyTorch's counter skips the CPU SDPA kernel; measure_flops counts it as the two
    products it stands for (naive attention's bmm count), grouped heads included."""
    import torch.nn.functional as F

    from effarch.attention import naive_attention
    from effarch.bench import measure_flops

    q, k = torch.randn(2, 4, 24, 8), torch.randn(2, 4, 40, 8)
    v = torch.randn(2, 4, 40, 16)
    sdpa = measure_flops(lambda: F.scaled_dot_product_attention(q, k, v)).total
    naive = measure_flops(
        lambda: naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ).total
    assert sdpa == naive == 2 * 2 * 4 * 24 * 40 * (8 + 16)


def test_fit_line_recovers_intercept_and_slope():
    from effarch.bench import fit_line

    xs = [1.0, 3.0, 10.0, 30.0]
    line = fit_line(xs, [0.25 + 1.5 * x for x in xs])
    assert line.intercept == pytest.approx(0.25) and line.slope == pytest.approx(1.5)
    assert line.predict(2.0) == pytest.approx(3.25)
    # noisy: least squares against numpy's polyfit, an independent implementation
    ys = [2.0, 2.9, 6.1, 12.2]
    b, a = np.polyfit(xs, ys, 1)
    got = fit_line(xs, ys)
    assert got.slope == pytest.approx(b) and got.intercept == pytest.approx(a)
    # R^2 of a least-squares line is the squared correlation of x and y
    assert got.r2 == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2)
    assert line.r2 == pytest.approx(1.0) and fit_line([1, 2], [5, 5]).r2 == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        fit_line([1.0], [2.0])
    with pytest.raises(ValueError, match="same length"):
        fit_line([1.0, 2.0], [2.0])


def test_cpu_sdpa_backward_is_counted_as_twice_its_forward():
    import torch.nn.functional as F

    from effarch.bench import measure_flops

    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    forward = measure_flops(lambda: F.scaled_dot_product_attention(q, k, v)).total

    def both():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def with_matmuls():  # the same attention as matmuls: forward 2 products, backward 4
        s = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1)
        (s @ v).sum().backward()

    assert measure_flops(both).total == 3 * forward == measure_flops(with_matmuls).total


def test_fits_reject_degenerate_input_and_keep_small_slopes():
    from effarch.bench import fit_exponent, fit_line

    xs = [1e6, 2e6, 4e6]
    assert fit_line(xs, [1e-3 + 3e-13 * x for x in xs]).slope == pytest.approx(3e-13, rel=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        fit_line([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        fit_line([1, 2, 3], [1, float("nan"), 3])
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_exponent([2, 2, 2], [1, 2, 3])


def test_measuring_helpers_name_bad_arguments():
    from effarch._kernels import use_triton
    from effarch.bench import measure_device, sweep
    from effarch.survey import mixer_state_elements

    with pytest.raises(ValueError, match="repeats"):
        measure_device(repeats=0)
    with pytest.raises(ValueError, match="n_kv_heads"):
        mixer_state_elements("gqa", 10, n_heads=32, n_kv_heads=48)
    with pytest.raises(ValueError, match="at least one tensor"):
        use_triton("auto", None)
    # None is a valid single argument (it used to mean "out of memory")
    r = sweep({"f": lambda x: x}, [1], lambda n: None, measure=("time",), progress=False,
              min_run_time=1e-3)  # fmt: skip
    assert [row["status"] for row in r.rows] == ["ok"]
