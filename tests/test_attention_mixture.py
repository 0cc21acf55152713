"""Mixture of attention: MoBA against full attention and a brute-force loop, MoH against
multi-head attention and its gate equations. Everything in float64."""

import math

import pytest
import torch

from effarch.attention import naive_attention
from effarch.attention.mixture import (
    MixtureOfHeadsAttention,
    moba_attention,
    moba_mask,
    moba_select_blocks,
    moh_active_fraction,
)

F64 = torch.float64


def qkv(b, tq, tk, hq, hkv, d=8):
    return (
        torch.randn(b, tq, hq, d, dtype=F64),
        torch.randn(b, tk, hkv, d, dtype=F64),
        torch.randn(b, tk, hkv, d, dtype=F64),
    )


# --- MoBA: degenerate settings --------------------------------------------------------------

GQA = [(4, 4), (4, 2), (4, 1)]  # ratios 1, 2 and all (MQA)


@pytest.mark.parametrize("t", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize(("hq", "hkv"), GQA)
@pytest.mark.parametrize("impl", ["blocks", "gather", "dense"])
def test_moba_with_every_block_is_causal_attention(t, block_size, hq, hkv, impl):
    q, k, v = qkv(2 if t < 200 else 1, t, t, hq, hkv)
    n_blocks = math.ceil(t / block_size)
    top_k = n_blocks if block_size == 16 else n_blocks + 5  # exactly N, and more than N
    out = moba_attention(q, k, v, block_size=block_size, top_k=top_k, impl=impl)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("tq", "tk"), [(1, 100), (17, 64), (100, 17), (40, 40)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["blocks", "gather", "dense"])
def test_moba_with_every_block_is_full_attention_for_unequal_lengths(tq, tk, causal, impl):
    q, k, v = qkv(1, tq, tk, 4, 2)
    out = moba_attention(q, k, v, block_size=7, top_k=100, causal=causal, impl=impl)
    ref = naive_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# --- MoBA: selection against a brute-force loop ---------------------------------------------


def brute_force_selection(q, k, block_size, top_k, causal):
    """Per (b, h, i): the set of selected blocks, by explicit loops."""
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    n_blocks = math.ceil(tk / block_size)
    chosen = {}
    for bb in range(b):
        for h in range(hq):
            means = [
                k[bb, n * block_size : min((n + 1) * block_size, tk), h // g].mean(dim=0)
                for n in range(n_blocks)
            ]
            for i in range(tq):
                score = [float(q[bb, i, h] @ means[n]) for n in range(n_blocks)]
                if not causal:
                    ranked = sorted(range(n_blocks), key=lambda n: -score[n])
                    chosen[bb, h, i] = set(ranked[:top_k])
                    continue
                p = i + tk - tq
                if p < 0:
                    chosen[bb, h, i] = set()
                    continue
                current = p // block_size
                past = sorted(range(current), key=lambda n: -score[n])
                chosen[bb, h, i] = {current, *past[: top_k - 1]}
    return chosen


def brute_force_mask(chosen, shape, tq, tk, block_size, causal):
    b, hq = shape
    mask = torch.zeros(b, hq, tq, tk, dtype=torch.bool)
    for (bb, h, i), blocks in chosen.items():
        p = i + tk - tq
        for j in range(tk):
            if j // block_size in blocks and (not causal or j <= p):
                mask[bb, h, i, j] = True
    return mask


def masked_attention(q, k, v, mask):
    """Softmax attention restricted to ``mask [B, H, Tq, Tk]``, written out plainly."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


SELECTION_CASES = [
    # (tq, tk, hq, hkv, block_size, top_k, causal)
    (1, 1, 2, 2, 8, 1, True),
    (17, 17, 4, 2, 4, 2, True),
    (64, 64, 4, 1, 8, 3, True),
    (100, 100, 2, 2, 16, 3, True),
    (70, 70, 4, 4, 8, 1, True),  # only the current block
    (5, 60, 4, 2, 8, 3, True),  # a few queries after a long prefix
    (30, 12, 2, 1, 4, 2, True),  # more queries than keys: the first rows see nothing
    (40, 40, 4, 2, 8, 2, False),
    (23, 50, 2, 2, 16, 2, False),
]


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "bs", "top_k", "causal"), SELECTION_CASES)
def test_moba_selection_matches_brute_force(tq, tk, hq, hkv, bs, top_k, causal):
    q, k, v = qkv(2, tq, tk, hq, hkv)
    sel = moba_select_blocks(q, k, block_size=bs, top_k=top_k, causal=causal)
    n_blocks = math.ceil(tk / bs)
    assert sel.shape == (2, hq, tq, min(top_k, n_blocks)) and sel.dtype == torch.long
    chosen = brute_force_selection(q, k, bs, top_k, causal)
    for (bb, h, i), blocks in chosen.items():
        row = sel[bb, h, i].tolist()
        got = [n for n in row if n >= 0]
        assert got == sorted(got) and all(n == -1 for n in row[len(got) :])
        assert set(got) == blocks, (bb, h, i)

    want_mask = brute_force_mask(chosen, (2, hq), tq, tk, bs, causal)
    mask = moba_mask(q, k, block_size=bs, top_k=top_k, causal=causal)
    assert torch.equal(mask, want_mask)

    want = masked_attention(q, k, v, want_mask)
    for impl in ("blocks", "gather", "dense"):
        out, sel2 = moba_attention(
            q, k, v, block_size=bs, top_k=top_k, causal=causal, impl=impl, return_selection=True
        )
        assert torch.equal(sel2, sel)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "bs", "top_k", "causal"), SELECTION_CASES[:7])
def test_moba_mask_is_causal_and_keeps_the_own_block(tq, tk, hq, hkv, bs, top_k, causal):
    q, k, _ = qkv(2, tq, tk, hq, hkv)
    mask = moba_mask(q, k, block_size=bs, top_k=top_k, causal=causal)
    i = torch.arange(tq)[:, None] + tk - tq
    j = torch.arange(tk)[None, :]
    assert not (mask & (j > i)).any()  # never a future key
    own = (j // bs == i // bs) & (j <= i)  # the own block, up to the query
    assert torch.equal(mask & own, own.expand_as(mask))
    keys_per_query = mask.sum(dim=-1)
    assert (keys_per_query <= top_k * bs).all()
    assert (keys_per_query[..., i[:, 0] >= 0] >= 1).all()  # every query that can see a key


def test_moba_is_sparse_when_top_k_is_small():
    q, k, v = qkv(1, 256, 256, 2, 2)
    mask = moba_mask(q, k, block_size=16, top_k=3)
    assert mask[..., 200, :].sum(dim=-1).max() <= 48  # 3 of 13 visible blocks
    out = moba_attention(q, k, v, block_size=16, top_k=3)
    assert not torch.allclose(out, naive_attention(q, k, v, causal=True))


def test_moba_first_block_needs_no_routing():
    q, k, v = qkv(1, 20, 20, 2, 1)
    out = moba_attention(q, k, v, block_size=8, top_k=1)
    ref = naive_attention(q[:, :8], k[:, :8], v[:, :8], causal=True)
    torch.testing.assert_close(out[:, :8], ref, rtol=1e-12, atol=1e-12)


def test_moba_blocks_gather_and_dense_gradients_agree():
    q, k, v = (t.requires_grad_() for t in qkv(1, 50, 45, 4, 2))  # 5 rows see no key
    do = torch.randn(1, 50, 4, 8, dtype=F64)
    grads = [
        torch.autograd.grad(
            moba_attention(q, k, v, block_size=8, top_k=2, impl=impl), (q, k, v), do
        )
        for impl in ("blocks", "gather", "dense")
    ]
    for want in grads[2]:
        assert torch.isfinite(want).all()
    for got in grads[:2]:
        for a, b in zip(got, grads[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_moba_keeps_float32():
    q, k, v = (t.float() for t in qkv(1, 33, 33, 2, 2))
    out = moba_attention(q, k, v, block_size=8, top_k=2)
    assert out.dtype == torch.float32 and out.shape == (1, 33, 2, 8)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=-4), ValueError, "block_size"),
        (dict(block_size=8.0), TypeError, "block_size"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(impl="sparse"), ValueError, "impl"),
        (dict(scale=-1.0), ValueError, "scale"),
    ],
)
def test_moba_rejects_bad_arguments(kwargs, exc, match):
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(exc, match=match):
        moba_attention(q, k, v, **kwargs)


def test_moba_rejects_bad_tensors():
    q, k, v = qkv(1, 8, 8, 3, 2)
    with pytest.raises(ValueError, match="multiple"):
        moba_attention(q, k, v)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        moba_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        moba_mask(q, k[0])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        moba_select_blocks(q.tolist(), k)


# --- MoH ------------------------------------------------------------------------------------


def moh(d_model=32, n_heads=8, n_shared=2, top_k=3, causal=True):
    return MixtureOfHeadsAttention(
        d_model, n_heads, n_shared=n_shared, top_k=top_k, causal=causal
    ).double()


def reference_mha(m, x, head_scale=None):
    """Multi-head attention from explicit projections; optionally scale head h's output."""
    b, t, d = x.shape
    h = m.n_heads
    q, k, v = (x @ w.weight.T for w in (m.q_proj, m.k_proj, m.v_proj))
    q, k, v = (z.reshape(b, t, h, d // h) for z in (q, k, v))
    o = naive_attention(q, k, v, causal=m.causal)  # [B, T, H, e]
    if head_scale is not None:
        o = o * head_scale[..., None]
    return o.reshape(b, t, d) @ m.o_proj.weight.T


@pytest.mark.parametrize(("n_heads", "n_shared"), [(4, 0), (4, 1), (8, 3), (8, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_moh_with_all_heads_and_a_zero_router_is_multi_head_attention(n_heads, n_shared, causal):
    m = moh(n_heads=n_heads, n_shared=n_shared, top_k=n_heads - n_shared, causal=causal)
    m.zero_router_()
    x = torch.randn(2, 19, 32, dtype=F64)
    out, routing = m(x, return_routing=True)
    ref = reference_mha(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(routing.gates, torch.ones_like(routing.gates))
    torch.testing.assert_close(m.head_outputs(x).sum(dim=2), ref, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def expected_gates(m, x):
    """MoH's gates written out token by token from the router weights."""
    b, t, _ = x.shape
    gates = torch.zeros(b, t, m.n_heads, dtype=x.dtype)
    for bb in range(b):
        for tt in range(t):
            xt = x[bb, tt]
            lr = (m.router_routed.weight @ xt).tolist()
            picked = sorted(range(m.n_routed), key=lambda r: -lr[r])[: m.top_k]
            z = sum(math.exp(lr[r]) for r in picked)
            scale_r = m.top_k  # no shared heads: g = top_k * softmax over the picked heads
            if m.n_shared:
                mix = torch.softmax(m.router_mix.weight @ xt, dim=0)
                shared = torch.softmax(m.router_shared.weight @ xt, dim=0)
                for s in range(m.n_shared):
                    gates[bb, tt, s] = 2 * mix[0] * m.n_shared * shared[s]
                scale_r = 2 * float(mix[1]) * m.top_k
            for r in picked:
                gates[bb, tt, m.n_shared + r] = scale_r * math.exp(lr[r]) / z
    return gates


@pytest.mark.parametrize(("n_heads", "n_shared", "top_k"), [(8, 2, 3), (6, 0, 2), (4, 1, 1)])
def test_moh_gates_follow_the_two_stage_equations(n_heads, n_shared, top_k):
    m = moh(d_model=24, n_heads=n_heads, n_shared=n_shared, top_k=top_k)
    x = torch.randn(2, 11, 24, dtype=F64)
    out, routing = m(x, return_routing=True)
    b, t = 2, 11
    assert out.shape == (b, t, 24)
    assert routing.heads.shape == (b, t, top_k) and routing.routed_weights.shape == (b, t, top_k)
    assert routing.gates.shape == (b, t, n_heads) and routing.alpha.shape == (b, t, 2)
    torch.testing.assert_close(routing.gates, expected_gates(m, x), rtol=1e-12, atol=1e-12)

    g = routing.gates
    assert (g >= 0).all()
    assert (g[..., :n_shared] > 0).all()  # shared heads always on
    active = g[..., n_shared:] > 0
    assert (active.sum(dim=-1) == top_k).all()  # exactly top_k routed heads per token
    heads = routing.heads
    assert ((heads >= n_shared) & (heads < n_heads)).all()
    assert (heads.diff(dim=-1) > 0).all()  # distinct, in increasing order
    picked = torch.zeros_like(active).scatter(-1, heads - n_shared, True)
    assert torch.equal(picked, active)
    one = torch.ones(b, t, dtype=F64)
    torch.testing.assert_close(routing.routed_weights.sum(-1), one)
    torch.testing.assert_close(routing.alpha.sum(-1), one)
    if n_shared == 0:
        assert torch.equal(routing.alpha, torch.tensor([0.0, 1.0], dtype=F64).expand(b, t, 2))
        torch.testing.assert_close(g.sum(-1), top_k * one)
    else:
        torch.testing.assert_close(g[..., n_shared:].sum(-1), 2 * routing.alpha[..., 1] * top_k)
        torch.testing.assert_close(g[..., :n_shared].sum(-1), 2 * routing.alpha[..., 0] * n_shared)
    # the output is the gated sum of the per-head outputs, and MHA with those head weights
    gated = (routing.gates[..., None] * m.head_outputs(x)).sum(dim=2)
    torch.testing.assert_close(out, gated, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, reference_mha(m, x, routing.gates), rtol=1e-10, atol=1e-10)


def test_moh_is_causal():
    x = torch.randn(1, 20, 32, dtype=F64)
    x2 = x.clone()
    x2[:, 12:] += torch.randn(1, 8, 32, dtype=F64)
    m = moh()
    torch.testing.assert_close(m(x2)[:, :12], m(x)[:, :12], rtol=1e-12, atol=1e-12)
    m.causal = False  # the check can fail: without the mask the past sees the change
    assert not torch.allclose(m(x2)[:, :12], m(x)[:, :12])


def test_moh_active_fraction():
    assert moh_active_fraction(8, 2, 3) == 5 / 8
    assert moh().active_fraction == 5 / 8
    assert moh_active_fraction(4, 0, 4) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(d_model=30, n_heads=8), ValueError, "n_heads"),
        (dict(n_heads=0), ValueError, "n_heads"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=7), ValueError, "top_k must be at most"),
        (dict(n_shared=-1), ValueError, "n_shared"),
        (dict(n_shared=8, top_k=1), ValueError, "n_shared must be smaller"),
        (dict(n_shared=1.5), TypeError, "n_shared"),
    ],
)
def test_moh_rejects_bad_sizes(kwargs, exc, match):
    args = dict(d_model=32, n_heads=8, n_shared=2, top_k=2) | kwargs
    d_model, n_heads = args.pop("d_model"), args.pop("n_heads")
    with pytest.raises(exc, match=match):
        MixtureOfHeadsAttention(d_model, n_heads, **args)
    if "n_heads" not in match:
        with pytest.raises(exc, match=match):
            moh_active_fraction(n_heads, args["n_shared"], args["top_k"])


def test_moh_rejects_bad_input():
    m = moh()
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        m(torch.randn(4, 32, dtype=F64))
    with pytest.raises(ValueError, match="d_model=32"):
        m(torch.randn(1, 4, 16, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        m.route(torch.ones(1, 4, 32, dtype=torch.long))
