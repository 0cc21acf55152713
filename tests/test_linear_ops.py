"""effarch.linear.ops (linear attention, its gates and delta rules) and the feature maps.

Every mode is checked against the recurrent mode in float64; the recurrent mode itself is
checked against a brute-force loop written here, one time step and one (batch, head) at a
time with explicit outer products.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from effarch.linear.feature_maps import (
    HedgehogFeatureMap,
    PerformerFeatureMap,
    elu_plus_one,
    relu,
    taylor_feature_map,
)
from effarch.linear.hgrn import hgrn
from effarch.linear.ops import (
    delta_rule,
    dplr_delta_rule,
    gated_delta_rule,
    gla,
    linear_attention,
    retention,
    simple_gla,
)

F64 = torch.float64

# name -> (function, fixed keyword arguments, modes besides "recurrent")
OPS = {
    "linear_attention": (linear_attention, {}, ("parallel", "chunk")),
    "linear_attention_norm": (linear_attention, {"normalize": True}, ("parallel", "chunk")),
    "retention": (retention, {}, ("parallel", "chunk")),
    "simple_gla": (simple_gla, {}, ("parallel", "chunk")),
    "gla": (gla, {}, ("parallel", "chunk")),
    "delta_rule": (delta_rule, {}, ("chunk",)),
    "gated_delta_rule": (gated_delta_rule, {}, ("chunk",)),
    "dplr_delta_rule": (dplr_delta_rule, {}, ("chunk",)),
}
CHUNKED = [name for name, (_, _, modes) in OPS.items() if "chunk" in modes]


def make_inputs(name, b, t, h, dk, dv, dtype=F64, log_decay=None):
    """Random positional inputs for op ``name``; ``log_decay`` fixes the scale of the gates."""
    q, k, v = torch.randn(b, t, h, dk), torch.randn(b, t, h, dk), torch.randn(b, t, h, dv)
    if name == "linear_attention_norm":  # the normaliser needs positive features
        q, k = elu_plus_one(q), elu_plus_one(k)
    if name in ("delta_rule", "gated_delta_rule"):  # the delta rule is stable for unit keys
        k = F.normalize(k, dim=-1)

    def gate(*shape):
        if log_decay is None:
            return F.logsigmoid(torch.randn(*shape) + 2.0)  # mostly mild, a few strong
        return log_decay * (0.8 + 0.4 * torch.rand(*shape))

    extra = {
        "simple_gla": lambda: (gate(b, t, h),),
        "gla": lambda: (gate(b, t, h, dk),),
        "delta_rule": lambda: (torch.sigmoid(torch.randn(b, t, h)),),
        "gated_delta_rule": lambda: (gate(b, t, h), torch.sigmoid(torch.randn(b, t, h))),
        "dplr_delta_rule": lambda: rwkv7_like(b, t, h, dk),
    }.get(name, lambda: ())()
    return tuple(x.to(dtype) for x in (q, k, v, *extra))


def rwkv7_like(b, t, h, dk):
    """``a = -kappa``, ``b = kappa * rate`` with unit ``kappa``, and RWKV-7-like decays.

    The in-context learning rate is a vector, one per key channel, as in RWKV-7: ``b`` is
    then not parallel to ``a``, the case a scalar rate per head would never exercise."""
    kappa = F.normalize(torch.randn(b, t, h, dk), dim=-1)
    rate = torch.sigmoid(torch.randn(b, t, h, dk))
    gk = -math.exp(-0.5) * torch.sigmoid(torch.randn(b, t, h, dk))
    return -kappa, kappa * rate, gk


def make_state(name, b, h, dk, dv, dtype=F64):
    s = torch.randn(b, h, dk, dv, dtype=dtype)
    if name == "linear_attention_norm":
        return s, torch.rand(b, h, dk, dtype=dtype) + 0.5
    return s


def call(name, args, *, mode, chunk_size=64, **kw):
    fn, fixed, _ = OPS[name]
    return fn(*args, mode=mode, chunk_size=chunk_size, **fixed, **kw)


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def assert_state_close(a, b, **tol):
    for x, y in zip(flat(a), flat(b), strict=True):
        torch.testing.assert_close(x, y, **tol)


# --------------------------------------------------------------------------------------------
# All modes agree with the recurrent mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("t", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("name", [n for n in OPS if OPS[n][2]])
def test_modes_agree_with_recurrent(name, t, with_state):
    b, h, dk, dv = 2, 2, 8, 6
    args = make_inputs(name, b, t, h, dk, dv)
    s0 = make_state(name, b, h, dk, dv) if with_state else None
    ref_o, ref_s = call(name, args, mode="recurrent", initial_state=s0, output_final_state=True)
    assert ref_o.shape == (b, t, h, dv) and ref_o.dtype == F64
    for mode in OPS[name][2]:
        for chunk in (16, 32, 64) if mode == "chunk" else (64,):
            o, s = call(
                name, args, mode=mode, chunk_size=chunk, initial_state=s0, output_final_state=True
            )
            torch.testing.assert_close(o, ref_o, rtol=1e-9, atol=1e-10)
            assert_state_close(s, ref_s, rtol=1e-9, atol=1e-10)
            o_only, none = call(name, args, mode=mode, chunk_size=chunk, initial_state=s0)
            assert none is None and torch.equal(o_only, o)


# --------------------------------------------------------------------------------------------
# The recurrent mode against a brute-force loop over single steps
# --------------------------------------------------------------------------------------------


def brute_force(name, args, s0, scale):
    """One (batch, head, step) at a time, the recurrences written out with outer products."""
    q, k, v = args[:3]
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    o = torch.zeros(b, t, h, dv, dtype=F64)
    finals_s = torch.zeros(b, h, dk, dv, dtype=F64)
    finals_z = torch.zeros(b, h, dk, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            if s0 is None:
                s, z = torch.zeros(dk, dv, dtype=F64), torch.zeros(dk, dtype=F64)
            elif isinstance(s0, tuple):
                s, z = s0[0][bi, hi].clone(), s0[1][bi, hi].clone()
            else:
                s, z = s0[bi, hi].clone(), torch.zeros(dk, dtype=F64)
            for ti in range(t):
                qt, kt, vt = scale * q[bi, ti, hi], k[bi, ti, hi], v[bi, ti, hi]
                write = torch.einsum("k,v->kv", kt, vt)
                if name in ("linear_attention", "linear_attention_norm"):
                    s = s + write
                    z = z + kt
                elif name == "retention":
                    s = (1.0 - 2.0 ** (-5 - hi)) * s + write
                elif name == "simple_gla":
                    s = torch.exp(args[3][bi, ti, hi]) * s + write
                elif name == "gla":
                    s = torch.einsum("k,kv->kv", torch.exp(args[3][bi, ti, hi]), s) + write
                elif name in ("delta_rule", "gated_delta_rule"):
                    beta = args[-1][bi, ti, hi]
                    if name == "gated_delta_rule":
                        s = torch.exp(args[3][bi, ti, hi]) * s
                    err = vt - torch.einsum("k,kv->v", kt, s)
                    s = s + beta * torch.einsum("k,v->kv", kt, err)
                else:  # dplr
                    a, bb, gk = (x[bi, ti, hi] for x in args[3:])
                    read = torch.einsum("k,kv->v", a, s)
                    s = (
                        torch.einsum("k,kv->kv", torch.exp(gk), s)
                        + torch.einsum("k,v->kv", bb, read)
                        + write
                    )
                out = torch.einsum("k,kv->v", qt, s)
                if name == "linear_attention_norm":
                    out = out / torch.dot(qt, z)
                o[bi, ti, hi] = out
            finals_s[bi, hi], finals_z[bi, hi] = s, z
    if name == "linear_attention_norm":
        return o, (finals_s, finals_z)
    return o, finals_s


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", list(OPS))
def test_recurrent_matches_brute_force(name, with_state):
    b, t, h, dk, dv = 2, 9, 3, 5, 4
    args = make_inputs(name, b, t, h, dk, dv)
    s0 = make_state(name, b, h, dk, dv) if with_state else None
    scale = 0.7
    o, s = call(
        name, args, mode="recurrent", initial_state=s0, output_final_state=True, scale=scale
    )
    ref_o, ref_s = brute_force(name, args, s0, scale)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    assert_state_close(s, ref_s, rtol=1e-12, atol=1e-12)
    # the default scale is K ** -0.5
    o_default, _ = call(name, args, mode="recurrent", initial_state=s0)
    o_explicit, _ = call(name, args, mode="recurrent", initial_state=s0, scale=dk**-0.5)
    torch.testing.assert_close(o_default, o_explicit, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# States compose; gradients agree
# --------------------------------------------------------------------------------------------


COMPOSE = [(n, m) for n, (_, _, modes) in OPS.items() for m in ("recurrent", *modes)]


@pytest.mark.parametrize(("name", "mode"), COMPOSE)
def test_two_halves_equal_one_run(name, mode):
    b, t, h, dk, dv, cut = 2, 50, 2, 8, 6, 23
    args = make_inputs(name, b, t, h, dk, dv)
    s0 = make_state(name, b, h, dk, dv)
    kw = dict(mode=mode, chunk_size=16, output_final_state=True)
    o, s = call(name, args, initial_state=s0, **kw)
    o1, s1 = call(name, tuple(x[:, :cut] for x in args), initial_state=s0, **kw)
    o2, s2 = call(name, tuple(x[:, cut:] for x in args), initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, rtol=1e-10, atol=1e-11)
    assert_state_close(s2, s, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", CHUNKED)
def test_gradients_match_the_recurrent_form(name):
    b, t, h, dk, dv = 1, 40, 2, 8, 6
    args = make_inputs(name, b, t, h, dk, dv)
    s0 = make_state(name, b, h, dk, dv)
    w_o = torch.randn(b, t, h, dv, dtype=F64)
    w_s = [torch.randn_like(x) for x in flat(s0)]

    def grads(mode):
        leaves = [x.clone().requires_grad_() for x in (*args, *flat(s0))]
        n = len(args)
        state = tuple(leaves[n:]) if isinstance(s0, tuple) else leaves[n]
        o, s = call(
            name, leaves[:n], mode=mode, chunk_size=16, initial_state=state,
            output_final_state=True,
        )  # fmt: skip
        loss = (o * w_o).sum() + sum((x * w).sum() for x, w in zip(flat(s), w_s, strict=True))
        return torch.autograd.grad(loss, leaves)

    ref = grads("recurrent")
    for mode in OPS[name][2]:
        for g, r in zip(grads(mode), ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-9)


# --------------------------------------------------------------------------------------------
# What the rules mean
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_delta_rule_with_zero_beta_leaves_the_memory_unchanged(mode):
    b, t, h, dk, dv = 2, 37, 2, 8, 6
    q, k, v, _ = make_inputs("delta_rule", b, t, h, dk, dv)
    s0 = make_state("delta_rule", b, h, dk, dv)
    beta = torch.zeros(b, t, h, dtype=F64)
    o, s = delta_rule(
        q, k, v, beta, initial_state=s0, output_final_state=True, mode=mode, chunk_size=16
    )
    torch.testing.assert_close(s, s0, rtol=0, atol=1e-14)
    read_out = torch.einsum("bthk,bhkv->bthv", q * dk**-0.5, s0)
    torch.testing.assert_close(o, read_out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_delta_rule_recalls_what_was_written_under_orthonormal_keys(mode):
    d, dv = 8, 5
    keys = torch.linalg.qr(torch.randn(d, d, dtype=F64))[0].T  # rows orthonormal
    values = torch.randn(d, dv, dtype=F64)
    # Write each pair (the value for key 2 twice: the second write must win), then query.
    order = [0, 1, 2, 3, 4, 5, 6, 7, 2]
    new_v2 = torch.randn(dv, dtype=F64)
    k_seq = torch.cat([keys[order], torch.zeros(d, d, dtype=F64)])
    v_seq = torch.cat([values[order[:-1]], new_v2[None], torch.zeros(d, dv, dtype=F64)])
    q_seq = torch.cat([torch.zeros(len(order), d, dtype=F64), keys])
    beta = torch.ones(1, len(order) + d, 1, dtype=F64)
    o, s = delta_rule(
        q_seq[None, :, None], k_seq[None, :, None], v_seq[None, :, None], beta,
        scale=1.0, mode=mode, chunk_size=4, output_final_state=True,
    )  # fmt: skip
    expected = values.clone()
    expected[2] = new_v2
    torch.testing.assert_close(o[0, len(order) :, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[0, 0], keys.T @ expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "parallel", "chunk"])
def test_retention_is_simple_gla_with_fixed_decays(mode):
    b, t, h, dk, dv = 2, 70, 4, 8, 6
    q, k, v = make_inputs("retention", b, t, h, dk, dv)
    s0 = make_state("retention", b, h, dk, dv)
    gamma = 1.0 - 2.0 ** (-5.0 - torch.arange(h, dtype=F64))
    g = torch.log(gamma).expand(b, t, h)
    kw = dict(initial_state=s0, output_final_state=True, mode=mode, chunk_size=32)
    o, s = retention(q, k, v, **kw)
    ref_o, ref_s = simple_gla(q, k, v, g, **kw)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, ref_s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_dplr_reduces_to_the_delta_rules(gated):
    b, t, h, dk, dv = 2, 30, 2, 8, 6
    q, k, v, g, beta = make_inputs("gated_delta_rule", b, t, h, dk, dv)
    s0 = make_state("delta_rule", b, h, dk, dv)
    kw = dict(initial_state=s0, output_final_state=True, mode="recurrent")
    if gated:
        ref = gated_delta_rule(q, k, v, g, beta, **kw)
        gk = g[..., None].expand_as(k)
    else:
        ref = delta_rule(q, k, v, beta, **kw)
        gk = torch.zeros_like(k)
    bk = beta[..., None] * k
    got = dplr_delta_rule(q, bk, v, -torch.exp(gk) * k, bk, gk, **kw)
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_rwkv7_transition_is_the_decay_minus_a_kappa_kappa_transposed():
    """RWKV7's docstring: S_1 = (diag(exp(w)) - (a * kappa) kappa^T) S_0 + k v^T, the op
    called with a = -kappa, b = kappa * a (one step, one batch element and head)."""
    gen = torch.Generator().manual_seed(0)
    r, k = (torch.randn(1, 1, 1, 5, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(1, 1, 1, 3, generator=gen, dtype=F64)
    kappa = F.normalize(torch.randn(1, 1, 1, 5, generator=gen, dtype=F64), dim=-1)
    a, w = torch.rand(1, 1, 1, 5, generator=gen, dtype=F64), -torch.rand(1, 1, 1, 5, dtype=F64)
    s0 = torch.randn(1, 1, 5, 3, generator=gen, dtype=F64)
    _, s1 = dplr_delta_rule(r, k, v, -kappa, kappa * a, w, scale=1.0, initial_state=s0,
                            output_final_state=True)  # fmt: skip
    kp, aa = kappa.flatten(), a.flatten()
    transition = torch.diag(w.flatten().exp()) - torch.outer(aa * kp, kp)
    want = transition @ s0[0, 0] + torch.outer(k.flatten(), v.flatten())
    torch.testing.assert_close(s1[0, 0], want, rtol=1e-12, atol=1e-12)
    transposed = torch.diag(w.flatten().exp()) - torch.outer(kp, aa * kp)
    assert not torch.allclose(transposed @ s0[0, 0], transition @ s0[0, 0])


def test_normalized_linear_attention_with_taylor_features_is_a_normalised_kernel():
    t, d, dv = 33, 4, 3
    q, k = torch.randn(1, t, 1, d, dtype=F64), torch.randn(1, t, 1, d, dtype=F64)
    v = torch.randn(1, t, 1, dv, dtype=F64)
    o, _ = linear_attention(
        taylor_feature_map(q), taylor_feature_map(k), v, scale=1.0, normalize=True, chunk_size=8
    )
    s = q[0, :, 0] @ k[0, :, 0].T
    w = torch.tril(1 + s + s * s / 2)
    torch.testing.assert_close(o[0, :, 0], (w @ v[0, :, 0]) / w.sum(-1, keepdim=True))


def test_normalized_linear_attention_takes_a_state_with_a_missing_half():
    """A missing half of ``(S, z)`` is a zero part, checked against the float64 formula
    ``o_t = q_t (S0 + sum k v^T) / (q_t (z0 + sum k))`` with the other half given."""
    t, d, dv = 7, 4, 3
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.rand(1, t, 1, d, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(1, t, 1, dv, generator=gen, dtype=F64)
    s0 = torch.rand(1, 1, d, dv, generator=gen, dtype=F64)
    z0 = torch.rand(1, 1, d, generator=gen, dtype=F64) + 1

    def formula(s_init, z_init):
        s = s_init[0, 0] + torch.cumsum(k[0, :, 0, :, None] * v[0, :, 0, None, :], 0)
        z = z_init[0, 0] + torch.cumsum(k[0, :, 0], 0)
        num = torch.einsum("tk,tkv->tv", q[0, :, 0], s)
        return num / (q[0, :, 0] * z).sum(-1, keepdim=True)

    for pair, want in (
        ((None, z0), formula(torch.zeros_like(s0), z0)),
        ((s0, None), formula(s0, torch.zeros_like(z0))),
    ):
        o, (s1, z1) = linear_attention(q, k, v, scale=1.0, normalize=True, initial_state=pair,
                                       output_final_state=True)  # fmt: skip
        torch.testing.assert_close(o[0, :, 0], want)
        assert s1.shape == (1, 1, d, dv) and z1.shape == (1, 1, d)


# --------------------------------------------------------------------------------------------
# Precision and stability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHUNKED)
def test_dtypes(name):
    b, t, h, dk, dv = 1, 40, 2, 8, 8
    args = make_inputs(name, b, t, h, dk, dv, dtype=torch.float32)
    s0 = make_state(name, b, h, dk, dv, dtype=torch.float32)
    o32, s32 = call(name, args, mode="chunk", chunk_size=16, initial_state=s0,
                    output_final_state=True)  # fmt: skip
    assert o32.dtype == torch.float32 and all(x.dtype == torch.float32 for x in flat(s32))
    half = tuple(x.to(torch.bfloat16) for x in args)
    o16, s16 = call(name, half, mode="chunk", chunk_size=16, initial_state=s0,
                    output_final_state=True)  # fmt: skip
    assert o16.dtype == torch.bfloat16 and all(x.dtype == torch.float32 for x in flat(s16))
    # bf16 inputs carry ~3 significant digits; the float32 accumulation keeps it at that
    ref, _ = call(name, tuple(x.float() for x in half), mode="recurrent", initial_state=s0)
    torch.testing.assert_close(o16.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule"])
def test_strong_decay_in_float32_matches_float64(name):
    b, t, h, dk, dv = 1, 300, 2, 16, 16
    args = make_inputs(name, b, t, h, dk, dv, dtype=torch.float32, log_decay=-5.0)
    o, s = call(name, args, mode="chunk", output_final_state=True)
    ref_o, ref_s = call(name, tuple(x.double() for x in args), mode="recurrent",
                        output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-5)


def test_gla_with_gates_from_zero_to_very_strong_in_float32():
    b, t, h, dk, dv = 1, 200, 2, 16, 8
    q, k, v, _ = make_inputs("gla", b, t, h, dk, dv, dtype=torch.float32)
    # some key rows never forget (g = 0), others forget at once (g = -30), the rest in between
    g = torch.empty(b, t, h, dk).uniform_(-30.0, 0.0)
    g[..., :4], g[..., 4:8] = 0.0, -30.0
    o, s = gla(q, k, v, g, output_final_state=True, chunk_size=64)
    ref_o, ref_s = gla(*(x.double() for x in (q, k, v, g)), output_final_state=True,
                       mode="recurrent")  # fmt: skip
    torch.testing.assert_close(o.double(), ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule"])
def test_long_sequence_with_strong_decay_stays_finite(name):
    b, t, h, dk, dv = 1, 16384, 2, 16, 16
    args = make_inputs(name, b, t, h, dk, dv, dtype=torch.float32, log_decay=-5.0)
    o, s = call(name, args, mode="chunk", output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # with e^-5 per step the state holds little more than the last write
    assert s.abs().max() < 10 * args[2].abs().max() * args[1].abs().max()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("decay", ["mild", "strong", "mixed"])
def test_decayed_intra_chunk_scores_equal_the_pairwise_formula(decay, strict):
    """``intra_chunk_scores`` takes a one-product path for blocks with a small decay range
    and an exact pairwise path otherwise ("mixed" has both in one call); both equal the
    formula."""
    from effarch.linear.common import intra_chunk_scores

    c, dk = 64, 8
    q, k = torch.randn(2, c, dk, dtype=F64), torch.randn(2, c, dk, dtype=F64)
    g = -torch.rand(2, c, dk, dtype=F64) * {"mild": 0.1, "strong": 20.0, "mixed": 0.1}[decay]
    if decay == "mixed":
        g[:, 40:50] = -20.0  # one strong stretch: its block alone needs the pairwise path
    gk = g.cumsum(-2)
    gq = gk - g if strict else gk
    got = intra_chunk_scores(q, k, gq, gk, sub=16, strict=strict)
    keep = torch.ones(c, c, dtype=torch.bool).tril(-1 if strict else 0)
    exponent = (gq[:, :, None, :] - gk[:, None, :, :]).masked_fill(~keep[..., None], -math.inf)
    want = torch.einsum("bik,bjk,bijk->bij", q, k, torch.exp(exponent))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dplr_chunk_with_strong_and_vanishing_decays_stays_finite():
    """Per-key decays from e^0 to e^-30 per step over 16k steps: every exponent of the chunk
    form is a difference <= 0, so nothing overflows, and it still equals the step loop."""
    b, t, h, dk, dv = 1, 16384, 2, 16, 16
    q, k, v = torch.randn(b, t, h, dk), torch.randn(b, t, h, dk), torch.randn(b, t, h, dv)
    a, bb, _ = rwkv7_like(b, t, h, dk)
    gk = torch.empty(b, t, h, dk).uniform_(-30.0, 0.0)
    gk[..., :4] = 0.0
    o, s = dplr_delta_rule(q, k, v, a, bb, gk, mode="chunk", output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    tail = [x[:, -300:] for x in (q, k, v, a, bb, gk)]  # the step loop in float64 on a tail
    ref_o, _ = dplr_delta_rule(*(x.double() for x in tail), mode="recurrent")
    chunk_o, _ = dplr_delta_rule(*tail, mode="chunk")
    torch.testing.assert_close(chunk_o.double(), ref_o, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

_q, _k, _v = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 6)
_g, _gk = -torch.rand(2, 5, 3), -torch.rand(2, 5, 3, 4)
_beta = torch.rand(2, 5, 3)

BAD = [
    (lambda: linear_attention([1.0], _k, _v), TypeError, r"q must be a torch.Tensor"),
    (lambda: linear_attention(_q[0], _k, _v), ValueError, r"q must have 4 dimensions"),
    (lambda: linear_attention(_q.long(), _k.long(), _v.long()), TypeError, r"q must be a float"),
    (lambda: linear_attention(_q, _k.double(), _v), TypeError, r"k must have the dtype of q"),
    (lambda: linear_attention(_q, _k[:, :4], _v), ValueError, r"k must have the shape of q"),
    (lambda: linear_attention(_q, _k, _v[:1]), ValueError, r"v must be \[B, T, H, V\]"),
    (lambda: linear_attention(_q[:, :0], _k[:, :0], _v[:, :0]), ValueError, r"one time step"),
    (lambda: simple_gla(_q, _k, _v, _gk), ValueError, r"g must have shape \[B, T, H\]"),
    (lambda: gla(_q, _k, _v, _g), ValueError, r"g must have shape \[B, T, H, K\]"),
    (lambda: simple_gla(_q, _k, _v, _g.abs()), ValueError, r"g holds log decays.*<= 0"),
    (lambda: gla(_q, _k, _v, -_gk), ValueError, r"g holds log decays.*<= 0"),
    (lambda: gated_delta_rule(_q, _k, _v, -_g, _beta), ValueError, r"log decays.*<= 0"),
    (lambda: simple_gla(_q, _k, _v, _g.long()), TypeError, r"g must be a floating"),
    (lambda: delta_rule(_q, _k, _v, _beta[..., None]), ValueError, r"beta must have shape"),
    (lambda: gated_delta_rule(_q, _k, _v, _gk, _beta), ValueError, r"g must have shape"),
    (lambda: linear_attention(_q, _k, _v, mode="fast"), ValueError, r"mode must be one of"),
    (lambda: delta_rule(_q, _k, _v, _beta, mode="parallel"), ValueError, r"mode must be one of"),
    (lambda: dplr_delta_rule(_q, _k, _v, _k, _k, _gk, mode="parallel"), ValueError,
     r"mode must be one of \['recurrent', 'chunk'\]"),
    (lambda: retention(_q, _k, _v, chunk_size=0), ValueError, r"chunk_size must be a positive"),
    (lambda: gla(_q, _k, _v, _gk, chunk_size=8.0), TypeError, r"chunk_size must be an int"),
    (lambda: linear_attention(_q, _k, _v, scale=-1.0), ValueError, r"scale must be a finite"),
    (lambda: simple_gla(_q, _k, _v, _g, initial_state=torch.zeros(2, 3, 6, 4)), ValueError,
     r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 6\)"),
    (lambda: linear_attention(_q, _k, _v, normalize=True, initial_state=torch.zeros(2, 3, 4, 6)),
     TypeError, r"initial_state must be a pair"),
    (lambda: linear_attention(_q, _k, _v, output_final_state=1), TypeError,
     r"output_final_state must be a bool"),
    (lambda: hgrn(_v[:, :, 0], -_v[:, :, 0].abs(), output_final_state="yes"), TypeError,
     r"output_final_state must be a bool, got str"),
    (lambda: dplr_delta_rule(_q, _k, _v, _k, _k, -_gk), ValueError, r"gk holds log decays"),
    (lambda: dplr_delta_rule(_q, _k, _v, _k[..., :2], _k, _gk), ValueError,
     r"a must have shape \[B, T, H, K\]"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "exc", "match"), BAD)
def test_bad_input_is_refused_with_a_clear_message(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def test_simple_feature_maps_are_positive():
    x = torch.cat([torch.randn(2, 7, 3, 8), torch.full((2, 1, 3, 8), -30.0)], dim=1)
    assert (elu_plus_one(x) > 0).all()
    torch.testing.assert_close(elu_plus_one(x.double()), F.elu(x.double()) + 1)
    big = torch.tensor([200.0, -200.0, 0.0], requires_grad=True)
    elu_plus_one(big).sum().backward()
    assert torch.isfinite(big.grad).all()
    assert (relu(x) >= 0).all() and torch.equal(relu(x), x.clamp_min(0))
    assert elu_plus_one(x).shape == x.shape


def test_taylor_feature_map_inner_product_is_exact():
    x, y = torch.randn(50, 6, dtype=F64), torch.randn(50, 6, dtype=F64)
    fx, fy = taylor_feature_map(x), taylor_feature_map(y)
    assert fx.shape == (50, 1 + 6 + 36)
    s = (x * y).sum(-1)
    torch.testing.assert_close((fx * fy).sum(-1), 1 + s + s * s / 2, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_performer_features_estimate_the_exponential_kernel(orthogonal):
    d, m = 8, 16384
    fmap = PerformerFeatureMap(d, m, orthogonal=orthogonal, seed=3)
    q, k = 0.25 * torch.randn(32, d, dtype=F64), 0.25 * torch.randn(32, d, dtype=F64)
    pq, pk = fmap(q), fmap(k)
    assert pq.shape == (32, m) and (pq > 0).all() and (pk > 0).all()
    estimate, exact = (pq * pk).sum(-1), torch.exp((q * k).sum(-1))
    # relative standard deviation ~ sqrt(exp(|q + k|^2) - 1) / sqrt(m), about 1% here
    rel = (estimate - exact).abs() / exact
    assert rel.max() < 0.05 and rel.mean() < 0.02
    # the projection is fixed by the seed
    assert torch.equal(PerformerFeatureMap(d, m, orthogonal=orthogonal, seed=3)(q), pq)
    assert not torch.equal(PerformerFeatureMap(d, m, orthogonal=orthogonal, seed=4)(q), pq)


def test_hedgehog_feature_map_is_positive_and_learnable():
    h, d = 3, 8
    fmap = HedgehogFeatureMap(h, d)
    x = torch.randn(2, 5, h, d)
    phi = fmap(x)
    assert phi.shape == (2, 5, h, 2 * d) and (phi > 0).all()
    torch.testing.assert_close(phi[..., :d].sum(-1), torch.ones(2, 5, h))
    torch.testing.assert_close(phi[..., d:].sum(-1), torch.ones(2, 5, h))
    # starts at the identity: softmax of x and of -x
    torch.testing.assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1))
    phi.pow(2).sum().backward()
    assert fmap.weight.grad is not None and fmap.weight.grad.abs().sum() > 0
    wide = HedgehogFeatureMap(h, d, feature_dim=12)
    assert wide(x).shape == (2, 5, h, 24)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H, D\]"):
        fmap(torch.randn(2, 5, h + 1, d))
