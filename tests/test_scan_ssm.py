"""The parallel scan, HGRN, Mamba's selective scan, Mamba-2's SSD and S4D, each against loops.

Everything runs in float64 unless a test says otherwise, so agreement is to ~1e-12.
"""

import math

import pytest
import torch

from effarch.linear.hgrn import hgrn
from effarch.scan import (
    blelloch_scan,
    hillis_steele_scan,
    hillis_steele_schedule,
    linear_recurrence,
    scan_depth,
    scan_work,
)
from effarch.ssm.s4 import (
    discretize,
    fft_conv,
    s4d_init,
    ssm_kernel,
    ssm_powers,
    ssm_recurrence,
)
from effarch.ssm.selective import selective_scan
from effarch.ssm.ssd import segsum, ssd, ssd_matrix, ssd_recurrent

F64 = torch.float64
LENGTHS = [1, 17, 64, 100, 257]


def close(actual, expected, rtol=1e-10, atol=1e-11):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- scan


def loop_recurrence(a, b, h0=None):
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("method", ["blelloch", "hillis_steele", "sequential"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_recurrence_matches_loop(T, method, with_h0):
    a = torch.rand(2, T, 3, 2, dtype=F64)
    b = torch.randn(2, T, 3, 2, dtype=F64)
    h0 = torch.randn(2, 3, 2, dtype=F64) if with_h0 else None
    close(linear_recurrence(a, b, h0, method=method), loop_recurrence(a, b, h0))


def test_linear_recurrence_plain_and_complex():
    a, b = torch.rand(3, 50, dtype=F64), torch.randn(3, 50, dtype=F64)  # no trailing dims
    close(linear_recurrence(a, b), loop_recurrence(a, b))
    a = torch.polar(torch.rand(2, 40, 3, dtype=F64), torch.randn(2, 40, 3, dtype=F64))
    b = torch.randn(2, 40, 3, dtype=torch.complex128)
    for method in ("blelloch", "hillis_steele"):
        close(linear_recurrence(a, b, method=method), loop_recurrence(a, b))


def test_scan_depth_counts_the_steps_taken():
    for T in range(1, 300):
        a, b = torch.rand(1, T), torch.randn(1, T)
        assert (
            hillis_steele_scan(a, b)[1] == scan_depth(T, "hillis_steele") == math.ceil(math.log2(T))
        )
        depth = blelloch_scan(a, b)[1]
        assert depth == scan_depth(T, "blelloch")
        if T > 1:
            log = math.ceil(math.log2(T))
            assert log <= depth <= 2 * log - 1
            if T & (T - 1) == 0:  # powers of two: up and down sweeps of log2 T levels
                assert depth == 2 * log - 1
        assert scan_depth(T, "sequential") == T - 1


def test_scan_work_counts_the_combines():
    for T in range(1, 300):
        # Hillis-Steele: one combine per arrow of its schedule
        assert scan_work(T, "hillis_steele") == sum(map(len, hillis_steele_schedule(T)))
        assert scan_work(T, "sequential") == T - 1
        assert T - 1 <= scan_work(T, "blelloch") < 2 * T
        if T > 1 and T & (T - 1) == 0:  # powers of two: the closed forms
            log = int(math.log2(T))
            assert scan_work(T, "blelloch") == 2 * T - 2 - log
            assert scan_work(T, "hillis_steele") == T * log - T + 1
    with pytest.raises(ValueError, match="method must be one of"):
        scan_work(8, "fast")


def test_linear_recurrence_decays_underflow_without_nan():
    T = 4096
    a = torch.rand(2, T, 4) * 0.05  # float32: products underflow to 0 within a few dozen steps
    a[:, ::7] = 0.0  # exact resets
    a[:, 1::5] = 1.0  # and exact carries
    b = torch.randn(2, T, 4)
    h0 = torch.full((2, 4), 1e30)
    for method in ("blelloch", "hillis_steele"):
        h = linear_recurrence(a, b, h0, method=method)
        assert torch.isfinite(h).all()
        close(h, loop_recurrence(a, b, h0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["blelloch", "hillis_steele"])
def test_linear_recurrence_gradcheck(method):
    a = torch.rand(1, 11, 2, dtype=F64, requires_grad=True)
    b = torch.randn(1, 11, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: linear_recurrence(*t, method=method), (a, b, h0))


# ----------------------------------------------------------------------------- HGRN


def hgrn_inputs(b, t, d, dtype=F64):
    x = torch.randn(b, t, d, dtype=dtype)
    return x, torch.nn.functional.logsigmoid(torch.randn(b, t, d, dtype=dtype))  # log gates < 0


@pytest.mark.parametrize("T", [1, 17, 100])
def test_hgrn_scan_matches_recurrent_and_loop(T):
    x, g = hgrn_inputs(2, T, 5)
    h0 = torch.randn(2, 5, dtype=F64)
    o, final = hgrn(x, g, initial_state=h0, output_final_state=True)
    o_r, final_r = hgrn(x, g, initial_state=h0, output_final_state=True, mode="recurrent")
    close(o, o_r)
    close(final, final_r)
    close(o, loop_recurrence(g.exp(), x, h0))
    close(final, o[:, -1])
    assert hgrn(x, g)[1] is None


def test_hgrn_states_compose():
    x, g = hgrn_inputs(2, 60, 4)
    o, final = hgrn(x, g, output_final_state=True)
    o1, s1 = hgrn(x[:, :23], g[:, :23], output_final_state=True)
    o2, s2 = hgrn(x[:, 23:], g[:, 23:], initial_state=s1, output_final_state=True)
    close(torch.cat([o1, o2], dim=1), o)
    close(s2, final)


def test_hgrn_gradients_match_recurrent():
    x, g = hgrn_inputs(1, 9, 3)
    x, g = x.requires_grad_(), g.requires_grad_()
    h0 = torch.randn(1, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, g, h0: hgrn(x, g, initial_state=h0, output_final_state=True),
        (x, g, h0),
    )
    w = torch.randn(1, 9, 3, dtype=F64)
    grads = []
    for mode in ("scan", "recurrent"):
        o, s = hgrn(x, g, initial_state=h0, output_final_state=True, mode=mode)
        grads.append(torch.autograd.grad((o * w).sum() + s.sum(), (x, g, h0)))
    for gs, gr in zip(*grads, strict=True):
        close(gs, gr)


def test_hgrn_float32_dtypes():
    x, g = hgrn_inputs(1, 10, 3, dtype=torch.float32)
    o, s = hgrn(x, g, output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    o16, s16 = hgrn(x.bfloat16(), g.bfloat16(), output_final_state=True)
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32


# ----------------------------------------------------------------------------- selective scan


def brute_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):
    """Scalar loops over batch, channel, state and time; B, C are [Bt, T, G, N]."""
    nb, nt, nd = u.shape
    n = A.shape[1]
    y = torch.zeros(nb, nt, nd, dtype=F64)
    last = torch.zeros(nb, nd, n, dtype=F64)
    for bi in range(nb):
        for d in range(nd):
            gb = d // (nd // B.shape[2])
            gc = d // (nd // C.shape[2])
            for k in range(n):
                x = 0.0
                for t in range(nt):
                    step = float(delta[bi, t, d])
                    if delta_bias is not None:
                        step += float(delta_bias[d])
                    if softplus:
                        step = math.log1p(math.exp(step))
                    inp = step * float(B[bi, t, gb, k]) * float(u[bi, t, d])
                    x = math.exp(step * float(A[d, k])) * x + inp
                    y[bi, t, d] += x * float(C[bi, t, gc, k])
                last[bi, d, k] = x
            for t in range(nt):
                if D is not None:
                    y[bi, t, d] += float(D[d]) * float(u[bi, t, d])
                if z is not None:
                    zz = float(z[bi, t, d])
                    y[bi, t, d] *= zz / (1 + math.exp(-zz))
    return y, last


def selective_inputs(nb, nt, nd, n, gb=None, gc=None):
    u = torch.randn(nb, nt, nd, dtype=F64)
    delta = torch.rand(nb, nt, nd, dtype=F64)
    A = -torch.rand(nd, n, dtype=F64) * 2
    B = torch.randn(nb, nt, n, dtype=F64) if gb is None else torch.randn(nb, nt, gb, n, dtype=F64)
    C = torch.randn(nb, nt, n, dtype=F64) if gc is None else torch.randn(nb, nt, gc, n, dtype=F64)
    return u, delta, A, B, C


@pytest.mark.parametrize(
    ("gb", "gc", "extras"),
    [(None, None, False), (2, 4, False), (1, 2, True), (None, 2, True)],
)
def test_selective_scan_matches_brute_force(gb, gc, extras):
    u, delta, A, B, C = selective_inputs(2, 7, 4, 3, gb, gc)
    kw = {}
    if extras:
        kw = dict(
            D=torch.randn(4, dtype=F64),
            z=torch.randn(2, 7, 4, dtype=F64),
            delta_bias=torch.randn(4, dtype=F64),
            delta_softplus=True,
        )
    as4 = lambda t: t if t.ndim == 4 else t.unsqueeze(2)
    y_ref, last_ref = brute_selective_scan(
        u, delta, A, as4(B), as4(C), kw.get("D"), kw.get("z"), kw.get("delta_bias"), bool(kw)
    )
    for mode in ("scan", "recurrent"):
        y, last = selective_scan(u, delta, A, B, C, **kw, return_last_state=True, mode=mode)
        close(y, y_ref)
        close(last, last_ref)
    assert isinstance(selective_scan(u, delta, A, B, C, **kw), torch.Tensor)


@pytest.mark.parametrize("T", [1, 100, 257])
def test_selective_scan_modes_agree(T):
    u, delta, A, B, C = selective_inputs(2, T, 8, 4, 2, 4)
    z = torch.randn_like(u)
    kw = dict(D=torch.randn(8, dtype=F64), z=z, delta_softplus=True, return_last_state=True)
    y, last = selective_scan(u, delta, A, B, C, **kw)
    y_r, last_r = selective_scan(u, delta, A, B, C, **kw, mode="recurrent")
    close(y, y_r)
    close(last, last_r)


@pytest.mark.parametrize("mode", ["scan", "recurrent"])
@pytest.mark.parametrize("split", [0, 1, 6, 11])
def test_selective_scan_initial_state_continues_a_sequence(mode, split):
    """Feeding a sequence in two pieces, the second from the first's last state, is one
    pass over the whole (checked against the scalar loops of the brute force)."""
    u, delta, A, B, C = selective_inputs(2, 11, 4, 3, 2, 1)
    kw = dict(D=torch.randn(4, dtype=F64), delta_bias=torch.randn(4, dtype=F64),
              delta_softplus=True)  # fmt: skip
    y_ref, last_ref = brute_selective_scan(u, delta, A, B, C, kw["D"], None, kw["delta_bias"], True)
    part = lambda t, lo, hi: t[:, lo:hi]
    y1, h = selective_scan(*(part(t, 0, split) for t in (u, delta)), A,
                           *(part(t, 0, split) for t in (B, C)), **kw,
                           return_last_state=True, mode=mode)  # fmt: skip
    y2, last = selective_scan(*(part(t, split, 11) for t in (u, delta)), A,
                              *(part(t, split, 11) for t in (B, C)), **kw,
                              return_last_state=True, mode=mode, initial_state=h)  # fmt: skip
    close(torch.cat([y1, y2], dim=1), y_ref)
    close(last, last_ref)
    # an empty piece hands the state through unchanged
    _, same = selective_scan(*(part(t, 0, 0) for t in (u, delta)), A,
                             *(part(t, 0, 0) for t in (B, C)), return_last_state=True,
                             mode=mode, initial_state=last)  # fmt: skip
    close(same, last)


def test_selective_scan_initial_state_errors():
    u, delta, A, B, C = selective_inputs(2, 5, 4, 3)
    with pytest.raises(
        ValueError, match=r"initial_state must have shape \[B, D, N\] = \(2, 4, 3\)"
    ):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 3, 4, dtype=F64))
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor or None"):
        selective_scan(u, delta, A, B, C, initial_state=[0.0])
    with pytest.raises(TypeError, match="initial_state must be a floating tensor"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 4, 3, dtype=torch.long))


def test_selective_scan_float32_computes_in_float32():
    u, delta, A, B, C = (t.float() for t in selective_inputs(1, 9, 4, 2))
    y, last = selective_scan(u.bfloat16(), delta, A, B, C, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32


# ----------------------------------------------------------------------------- SSD


def ssd_inputs(nb, nt, h, p, g, n, dtype=F64):
    x = torch.randn(nb, nt, h, p, dtype=dtype)
    dt = torch.randn(nb, nt, h, dtype=dtype) - 1.0  # softplus'd below
    A = -torch.rand(h, dtype=dtype) * 2 - 0.1
    B = torch.randn(nb, nt, g, n, dtype=dtype)
    C = torch.randn(nb, nt, g, n, dtype=dtype)
    return x, dt, A, B, C


def ssd_via_selective_scan(x, dt, A, B, C, D, z, dt_bias):
    """SSD is a selective scan with A scalar per head: channels = heads x head dim."""
    nb, nt, h, p = x.shape
    n = B.shape[-1]
    y, last = selective_scan(
        x.reshape(nb, nt, h * p),
        dt.repeat_interleave(p, dim=2),
        A.repeat_interleave(p)[:, None].expand(h * p, n),
        B,
        C,
        D=D.repeat_interleave(p),
        z=z.reshape(nb, nt, h * p),
        delta_bias=dt_bias.repeat_interleave(p),
        delta_softplus=True,
        return_last_state=True,
    )
    return y.reshape(nb, nt, h, p), last.reshape(nb, h, p, n)


@pytest.mark.parametrize("T", LENGTHS)
def test_ssd_matches_recurrent_and_selective_scan(T):
    x, dt, A, B, C = ssd_inputs(2, T, 4, 3, 2, 5)
    D, z, dt_bias = torch.randn(4, dtype=F64), torch.randn_like(x), torch.randn(4, dtype=F64)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
    y_rec, s_rec = ssd_recurrent(x, dt, A, B, C, **kw)
    y_sel, s_sel = ssd_via_selective_scan(x, dt, A, B, C, D, z, dt_bias)
    close(y_rec, y_sel)
    close(s_rec, s_sel)
    for q in (16, 32, 64):
        y, s = ssd(x, dt, A, B, C, chunk_size=q, **kw)
        close(y, y_rec)
        close(s, s_rec)


@pytest.mark.parametrize("q", [16, 32, 64])
def test_ssd_initial_and_final_states_compose(q):
    x, dt, A, B, C = ssd_inputs(2, 100, 4, 2, 4, 3)
    D = torch.randn(4, 2, dtype=F64)  # per-channel skip [H, P]
    h0 = torch.randn(2, 4, 2, 3, dtype=F64)
    kw = dict(chunk_size=q, D=D, dt_softplus=True, return_final_states=True)
    y, s = ssd(x, dt, A, B, C, initial_states=h0, **kw)
    y_r, s_r = ssd_recurrent(x, dt, A, B, C, D=D, dt_softplus=True, initial_states=h0,
                             return_final_states=True)  # fmt: skip
    close(y, y_r)
    close(s, s_r)
    cut = 37  # not on a chunk boundary
    y1, s1 = ssd(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], initial_states=h0, **kw)
    y2, s2 = ssd(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], initial_states=s1, **kw)
    close(torch.cat([y1, y2], dim=1), y)
    close(s2, s)


def test_ssd_gradients_match_recurrent():
    x, dt, A, B, C = ssd_inputs(1, 20, 2, 2, 1, 3)
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C)]
    w = torch.randn_like(x)
    grads = []
    for fn, kw in ((ssd, dict(chunk_size=8)), (ssd_recurrent, {})):
        y = fn(*inputs, dt_softplus=True, **kw)
        grads.append(torch.autograd.grad((y * w).sum(), inputs))
    for gs, gr in zip(*grads, strict=True):
        close(gs, gr)


def test_ssd_matrix_is_the_quadratic_form():
    x, dt, A, B, C = ssd_inputs(2, 40, 3, 2, 3, 4)
    y = ssd(x, dt, A, B, C, chunk_size=16, dt_softplus=True)
    M = ssd_matrix(dt, A, B, C, head=1, batch=1, dt_softplus=True)
    assert M.shape == (40, 40)
    assert torch.equal(M.triu(1), torch.zeros_like(M))
    close(M @ x[1, :, 1], y[1, :, 1])
    # semiseparable: every block below the diagonal has rank at most N = 4
    for k in (10, 20, 30):
        assert torch.linalg.matrix_rank(M[k:, :k]) <= 4


def test_segsum_is_difference_of_cumsums():
    a = -torch.rand(3, 12, dtype=F64)
    s = segsum(a)
    cs = a.cumsum(-1)
    lower = torch.ones(12, 12, dtype=torch.bool).tril()
    close(s[..., lower], (cs[..., :, None] - cs[..., None, :])[..., lower])
    assert torch.isneginf(s[..., ~lower]).all()


def test_segsum_is_one_function_for_ssd_and_per_key_decays():
    """effarch.ssm.segsum is effarch.scan.segsum; along dim=-2 ([T, K] decays, as GLA's) it
    is the scalar segsum of every key column, by explicit loops."""
    import effarch.scan
    import effarch.ssm

    assert effarch.ssm.segsum is effarch.scan.segsum is segsum
    g = -torch.rand(2, 9, 5, dtype=F64)  # [B, T, K]
    got = segsum(g, dim=-2)  # [B, T, T, K]
    assert got.shape == (2, 9, 9, 5)
    for i in range(9):
        for j in range(9):
            want = (
                g[:, j + 1 : i + 1].sum(1) if j <= i else torch.full((2, 5), -math.inf, dtype=F64)
            )
            close(got[:, i, j], want)
    with pytest.raises(ValueError, match="dim must be an int"):
        segsum(g, dim=3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        segsum([1.0, 2.0])


def test_ssd_long_sequence_strong_decay_is_finite():
    x, dt, A, B, C = ssd_inputs(1, 16384, 2, 4, 1, 4, dtype=torch.float32)
    A = torch.tensor([-8.0, -0.01])  # one head forgets within a step, one barely decays
    dt = dt + 3.0  # softplus(dt) ~ 2: the log decay of a chunk reaches below -1000
    y, s = ssd(x, dt, A, B, C, dt_softplus=True, return_final_states=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    y64, s64 = ssd(*(t.double() for t in (x, dt, A, B, C)), dt_softplus=True,
                   return_final_states=True)  # fmt: skip
    close(y.double(), y64, rtol=1e-4, atol=1e-4)
    close(s.double(), s64, rtol=1e-4, atol=1e-4)
    # gradients stay finite too (on a shorter stretch, to keep the test quick)
    inputs = [t[:, :2048].clone().requires_grad_() for t in (x, dt, B, C)]
    A = A.clone().requires_grad_()
    y, s = ssd(*inputs[:2], A, *inputs[2:], dt_softplus=True, return_final_states=True)
    (y.sum() + s.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (*inputs, A))


# ----------------------------------------------------------------------------- S4 / S4D


def run_discrete(A_bar, B_bar, u):
    x = torch.zeros_like(B_bar)
    for uk in u:
        x = A_bar * x + B_bar * uk
    return x


@pytest.mark.parametrize("a", [-1.3, complex(-0.5, 2.0)])
def test_discretizations_converge_to_the_ode_solution(a):
    """x' = a x + b u, x(0) = 0, up to time 2."""
    dtype = F64 if isinstance(a, float) else torch.complex128
    A, B = torch.tensor([a], dtype=dtype), torch.tensor([0.7], dtype=dtype)
    t_end = 2.0
    # constant input u = 1: x(t) = b / a (e^{a t} - 1)
    exact = B / A * (torch.exp(A * t_end) - 1)
    errors = {"zoh": [], "bilinear": []}
    for steps in (10, 20, 40, 80, 160):
        for method in errors:
            A_bar, B_bar = discretize(A, B, t_end / steps, method)
            errors[method].append((run_discrete(A_bar, B_bar, [1.0] * steps) - exact).abs().item())
    assert max(errors["zoh"]) < 1e-12  # ZOH is exact for piecewise-constant input
    ratios = [e0 / e1 for e0, e1 in zip(errors["bilinear"], errors["bilinear"][1:], strict=False)]
    assert all(3.5 < r < 4.5 for r in ratios), ratios  # second order: error ~ dt^2
    assert errors["bilinear"][-1] < 1e-4

    # u(t) = cos(w t), sampled at the end of each step: both converge (first order here)
    w = 3.0
    # cos(w t) = (e^{iwt} + e^{-iwt}) / 2; input e^{st} has particular solution e^{st} / (s - a)
    particular = lambda t: sum(
        B / 2 * torch.exp(torch.tensor(s * t)) / (s - A) for s in (1j * w, -1j * w)
    )
    exact = particular(t_end) - particular(0.0) * torch.exp(A * t_end)
    for method in ("zoh", "bilinear"):
        errs = []
        for steps in (50, 100, 200, 400, 800):
            dt = t_end / steps
            A_bar, B_bar = discretize(A, B, dt, method)
            u = [math.cos(w * dt * (k + 1)) for k in range(steps)]
            errs.append((run_discrete(A_bar, B_bar, u) - exact).abs().item())
        ratios = [e0 / e1 for e0, e1 in zip(errs, errs[1:], strict=False)]
        assert all(1.8 < r < 2.2 for r in ratios), errs  # error ~ dt
        assert errs[-1] < 5e-3


def test_dense_discretization_matches_diagonal_in_the_eigenbasis():
    A = torch.tensor([[0.0, 1.0], [-4.0, -0.5]], dtype=F64)
    B = torch.tensor([0.3, -1.1], dtype=F64)
    lam, V = torch.linalg.eig(A)
    Vinv = torch.linalg.inv(V)
    for method in ("zoh", "bilinear"):
        A_bar, B_bar = discretize(A, B, 0.1, method, diagonal=False)
        lam_bar, b_bar = discretize(lam, Vinv @ B.to(V.dtype), 0.1, method)
        close((V @ torch.diag(lam_bar) @ Vinv).real, A_bar)
        close((V @ b_bar).real, B_bar)
    A_bar, B_bar = discretize(torch.zeros(2, 2, dtype=F64), B[:, None], 0.25, diagonal=False)
    close(A_bar, torch.eye(2, dtype=F64))  # singular A: the block exponential still works
    close(B_bar, 0.25 * B[:, None])
    A_bar, B_bar = discretize(torch.zeros(2, dtype=F64), B, 0.25)  # and the diagonal limit
    close(B_bar, 0.25 * B)


def direct_causal_conv(u, K):
    nb, nt, h = u.shape
    y = torch.zeros_like(u)
    for t in range(nt):
        for s in range(min(t + 1, K.shape[1])):
            y[:, t] += K[:, s] * u[:, t - s]
    return y


@pytest.mark.parametrize("L", [5, 33, 50])
def test_fft_conv_matches_direct_convolution(L):
    u = torch.randn(2, 33, 3, dtype=F64)
    K = torch.randn(3, L, dtype=F64)
    close(fft_conv(u, K), direct_causal_conv(u, K))
    assert fft_conv(u.float(), K.float()).dtype == torch.float32
    # channels-last in memory, not a transposed view: a GELU's backward on a view runs
    # several times slower
    assert fft_conv(u, K).is_contiguous()


@pytest.mark.parametrize("kind", ["lin", "inv"])
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_convolution_equals_recurrence(kind, method):
    H, N, T = 3, 8, 64
    A = s4d_init(N, kind, dtype=torch.complex128).expand(H, N // 2)
    B = torch.ones(H, N // 2, dtype=torch.complex128)
    C = torch.randn(H, N // 2, dtype=torch.complex128)
    dt = torch.exp(torch.empty(H, dtype=F64).uniform_(math.log(1e-3), math.log(1e-1)))
    A_bar, B_bar = discretize(A, B, dt, method)
    u = torch.randn(2, T, H, dtype=F64)
    K = ssm_kernel(A_bar, B_bar, C, T, conj_pairs=True)
    assert K.shape == (H, T) and K.dtype == F64
    y_conv = fft_conv(u, K)
    close(y_conv, ssm_recurrence(u, A_bar, B_bar, C, conj_pairs=True))
    # an explicit loop over time, with the doubled real part of the half system
    x = torch.zeros(2, H, N // 2, dtype=torch.complex128)
    y_loop = []
    for t in range(T):
        x = A_bar * x + B_bar * u[:, t, :, None]
        y_loop.append(2 * (C * x).sum(-1).real)
    close(y_conv, torch.stack(y_loop, dim=1))
    # the conjugate-symmetric full system gives the same kernel without doubling
    full = lambda v: torch.cat([v, v.conj()], dim=-1)
    close(ssm_kernel(full(A_bar), full(B_bar), full(C), T), K)


def test_ssm_kernel_real_diagonal_and_zero_eigenvalue():
    A_bar = torch.tensor([[0.0, 0.5, -0.9]], dtype=F64)
    B_bar = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    C = torch.tensor([[0.5, -1.0, 1.0]], dtype=F64)
    K = ssm_kernel(A_bar, B_bar, C, 6)
    k = torch.arange(6, dtype=F64)
    expected = 0.5 * (k == 0) - 2.0 * 0.5**k + 3.0 * (-0.9) ** k
    close(K[0], expected)


def test_ssm_powers_from_the_exponent():
    H, N, L = 2, 6, 50
    dtA = torch.complex(-torch.rand(H, N, dtype=F64), 3 * torch.randn(H, N, dtype=F64))
    P = ssm_powers(dtA, L)
    assert P.shape == (H, N, L) and P.dtype == torch.complex128
    A_bar = torch.exp(dtA)
    for l in (0, 1, 7, 49):  # noqa: E741  the integer power, one multiplication at a time
        want = torch.ones_like(A_bar)
        for _ in range(l):
            want = want * A_bar
        close(P[..., l], want)
    real = -torch.rand(H, N, dtype=F64)
    close(ssm_powers(real, L), torch.exp(real)[..., None] ** torch.arange(L, dtype=F64))
    assert ssm_powers(real.float(), L).dtype == torch.float32
    # half precision counts l in float32: bfloat16 cannot represent 257
    x = torch.full((1,), -0.1, dtype=torch.bfloat16)
    late = ssm_powers(x, 300)[0, 257].item()
    assert abs(late / math.exp(257 * x.item()) - 1) < 1e-2  # l = 256 would be 10% off
    # the kernel from the powers equals the running product's
    B_bar, C = torch.randn(H, N, dtype=torch.complex128), torch.randn(H, N, dtype=torch.complex128)
    for pairs in (False, True):
        close(
            ssm_kernel(None, B_bar, C, L, conj_pairs=pairs, powers=P),
            ssm_kernel(A_bar, B_bar, C, L, conj_pairs=pairs),
        )


def test_s4d_init_values():
    lin = s4d_init(8, "lin", dtype=torch.complex128)
    close(
        lin,
        torch.complex(torch.full((4,), -0.5, dtype=F64), math.pi * torch.arange(4.0, dtype=F64)),
    )
    inv = s4d_init(8, "inv", dtype=torch.complex128)
    n = torch.arange(4, dtype=F64)
    close(inv.imag, 8 / math.pi * (8 / (2 * n + 1) - 1))
    full = s4d_init(8, "inv", full=True)
    assert full.shape == (8,) and full.dtype == torch.complex64
    close(full[4:], full[:4].conj())


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    x, g = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    u, delta, A, B, C = (t.float() for t in selective_inputs(1, 5, 4, 2))
    sx, sdt, sA, sB, sC = (t.float() for t in ssd_inputs(1, 5, 4, 2, 2, 3))
    Ad = torch.tensor([-0.5 + 1j, -0.5 - 1j])
    return [
        (lambda: linear_recurrence(a, b[:, :4]), ValueError, "b must have the shape"),
        (lambda: linear_recurrence(a.long(), b), TypeError, "a must be a floating"),
        (lambda: linear_recurrence(a, b.double()), TypeError, "b must have the dtype"),
        (lambda: linear_recurrence(a[0, 0], b[0, 0]), ValueError, "at least 2 dimensions"),
        (lambda: linear_recurrence(a, b, torch.zeros(2, 4)), ValueError, "h0 must have shape"),
        (lambda: linear_recurrence(a, b, method="foo"), ValueError, "method must be one of"),
        (lambda: scan_depth(0), ValueError, "T must be a positive int"),
        (lambda: hgrn(x, g[:, :3]), ValueError, "g must have the shape of x"),
        (lambda: hgrn(x.int(), g), TypeError, "x must be a floating"),
        (lambda: hgrn(x, g, mode="chunk"), ValueError, "mode must be one of"),
        (lambda: hgrn(x, g, initial_state=torch.zeros(2, 4)), ValueError, "initial_state must"),
        (lambda: selective_scan(u, delta[:, :3], A, B, C), ValueError, "delta must have the shape"),
        (lambda: selective_scan(u, delta, A[:3], B, C), ValueError, "A must have shape"),
        (lambda: selective_scan(u, delta, A, B[..., :1], C), ValueError, "B must have the state"),
        (
            lambda: selective_scan(u, delta, A, B, C.unsqueeze(2).expand(1, 5, 3, 2)),
            ValueError,
            r"groups of C \(3\) must divide",
        ),  # fmt: skip
        (lambda: selective_scan(u, delta, A, B[:, :4], C), ValueError, "B must have batch"),
        (lambda: selective_scan(u, delta, A, B, C, D=torch.ones(3)), ValueError, "D must have"),
        (lambda: selective_scan(u.long(), delta, A, B, C), TypeError, "u must be a floating"),
        (lambda: selective_scan(u, delta, A, B, C, mode="x"), ValueError, "mode must be one of"),
        (lambda: ssd(sx, sdt, sA, sB, sC, chunk_size=0), ValueError, "chunk_size must be a pos"),
        (lambda: ssd(sx, sdt, sA, sB, sC, chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (
            lambda: ssd(sx, sdt, sA, sB[:, :, :1].expand(1, 5, 3, 3), sC),
            ValueError,
            r"groups of B \(3\) must divide the number of heads",
        ),  # fmt: skip
        (lambda: ssd(sx, sdt[..., :3], sA, sB, sC), ValueError, "dt must have shape"),
        (lambda: ssd(sx, sdt, sA, sB, sC[..., :2]), ValueError, "C must have the state size"),
        (
            lambda: ssd(sx, sdt, sA, sB, sC, initial_states=torch.zeros(1, 4, 2, 2)),
            ValueError,
            "initial_states must have shape",
        ),  # fmt: skip
        (lambda: ssd(sx.int(), sdt, sA, sB, sC), TypeError, "x must be a floating"),
        (lambda: ssd(sx, sdt, sA, sB, sC, z=sx[:, :2]), ValueError, "z must have the shape"),
        (lambda: ssd_matrix(sdt, sA, sB, sC, head=4), ValueError, "head must be in"),
        (lambda: discretize(Ad, Ad, 0.1, "euler"), ValueError, "method must be one of"),
        (lambda: discretize(Ad, Ad, -0.1), ValueError, "dt must be a finite positive"),
        (lambda: discretize(Ad, Ad, torch.ones(3)), ValueError, "dt must be a scalar or"),
        (lambda: discretize(Ad, Ad[:1].repeat(3), 0.1), ValueError, "B must broadcast"),
        (
            lambda: discretize(torch.ones(2, 3), torch.ones(2), 0.1, diagonal=False),
            ValueError,
            "A must be a square matrix",
        ),  # fmt: skip
        (lambda: discretize(torch.arange(3), torch.ones(3), 0.1), TypeError, "A must be a float"),
        (lambda: ssm_kernel(Ad, Ad, Ad, 0), ValueError, "L must be a positive int"),
        (lambda: ssm_kernel(Ad, Ad, Ad[:1].repeat(3), 4), ValueError, "must broadcast"),
        (lambda: ssm_kernel(None, Ad, Ad, 4), ValueError, "give A_bar or its powers"),
        (
            lambda: ssm_kernel(Ad, Ad, Ad, 4, powers=torch.ones(3, 4)),
            ValueError,
            "not both or neither",
        ),  # fmt: skip
        (
            lambda: ssm_kernel(None, Ad, Ad[:2], 4, powers=torch.ones(3, 4)),
            ValueError,
            r"powers\[..., 0\], B_bar and C must broadcast",
        ),  # fmt: skip
        (
            lambda: ssm_kernel(None, Ad, Ad, 4, powers=torch.ones(4, 5)),
            ValueError,
            r"powers must have shape \[..., N, L=4\], got \(4, 5\)",
        ),  # fmt: skip
        (lambda: ssm_powers(Ad, 0), ValueError, "L must be a positive int"),
        (lambda: ssm_powers(torch.arange(3), 4), TypeError, "log_A_bar must be a floating"),
        (lambda: fft_conv(x, torch.ones(4, 5)), ValueError, "K must have shape"),
        (lambda: s4d_init(7), ValueError, "N must be even"),
        (lambda: s4d_init(8, "legs"), ValueError, "kind must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_clear_errors(case):
    fn, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("T", [1, 2, 5, 16, 37])
def test_hillis_steele_schedule_computes_prefix_sums(T):
    from effarch.scan import hillis_steele_schedule, scan_depth

    levels = hillis_steele_schedule(T)
    assert len(levels) == scan_depth(T, "hillis_steele")
    vals = list(range(1, T + 1))
    for level in levels:
        new = vals[:]
        for src, dst in level:
            new[dst] = vals[src] + vals[dst]  # all combines of a level read the old values
        vals = new
    assert vals == [sum(range(1, t + 2)) for t in range(T)]


def test_plot_scan_schedule_draws_one_arrow_per_combine():
    import matplotlib

    matplotlib.use("Agg")
    from effarch.scan import hillis_steele_schedule, plot_scan_schedule

    ax = plot_scan_schedule(10)
    combines = sum(len(level) for level in hillis_steele_schedule(10))
    assert len(ax.texts) == combines  # annotate() adds one arrow artist per combine
    assert "4 rounds" in ax.get_title()
