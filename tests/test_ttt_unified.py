"""Test-time training (2.4) and the unified memory view (2.5) against independent loops."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effarch.linear import delta_rule
from effarch.linear.layers import TTTLinear
from effarch.linear.ttt import titans, ttt_linear, ttt_linear_resume, ttt_mlp
from effarch.unified import CLASSES, RULES, UpdateRule, memory_scan, registry_table

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def make(b=2, t=37, h=3, dk=8, dv=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen, dtype=dtype)
    eta = torch.rand(b, t, h, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=dtype)
    return q, k, v, eta, s0


def autograd_ttt_linear(q, k, v, eta, s0, m, scale):
    """Mini-batch gradient descent written with autograd, one (batch, head) at a time."""
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=F64)
    finals = torch.zeros_like(s0)
    for bi in range(b):
        for hi in range(h):
            s = s0[bi, hi].clone()
            for start in range(0, t, m):
                anchor = s.clone().requires_grad_(True)
                for i in range(start, min(start + m, t)):
                    loss = 0.5 * ((anchor.T @ k[bi, i, hi] - v[bi, i, hi]) ** 2).sum()
                    (grad,) = torch.autograd.grad(loss, anchor)
                    s = s - eta[bi, i, hi] * grad
                    out[bi, i, hi] = s.T @ (scale * q[bi, i, hi])
            finals[bi, hi] = s
    return out, finals


# --------------------------------------------------------------------------------------------
# TTT-Linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 17, 64, 100])
@pytest.mark.parametrize("with_s0", [False, True])
def test_ttt_linear_with_mini_batch_one_is_the_delta_rule(t, with_s0):
    q, k, v, eta, s0 = make(t=t)
    s0 = s0 if with_s0 else None
    o, s = ttt_linear(q, k, v, eta, mini_batch_size=1, initial_state=s0, output_final_state=True)
    for mode in ("recurrent", "chunk"):
        want_o, want_s = delta_rule(
            q, k, v, eta, initial_state=s0, output_final_state=True, mode=mode, chunk_size=16
        )
        torch.testing.assert_close(o, want_o, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s, want_s, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("t", [1, 17, 64])
def test_ttt_linear_dual_and_primal_match_autograd_descent(m, t):
    q, k, v, eta, s0 = make(b=1, t=t, h=2)
    want_o, want_s = autograd_ttt_linear(q, k, v, eta, s0, m, 8**-0.5)
    for mode in ("dual", "primal"):
        o, s = ttt_linear(
            q, k, v, eta, mini_batch_size=m, initial_state=s0, output_final_state=True, mode=mode
        )
        torch.testing.assert_close(o, want_o, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s, want_s, atol=1e-12, rtol=1e-10)


def test_ttt_linear_states_compose_across_mini_batch_boundaries():
    q, k, v, eta, s0 = make(t=48)
    o, s = ttt_linear(q, k, v, eta, mini_batch_size=8, initial_state=s0, output_final_state=True)
    o1, s1 = ttt_linear(
        *(x[:, :24] for x in (q, k, v, eta)), mini_batch_size=8, initial_state=s0,
        output_final_state=True,
    )  # fmt: skip
    o2, s2 = ttt_linear(
        *(x[:, 24:] for x in (q, k, v, eta)), mini_batch_size=8, initial_state=s1,
        output_final_state=True,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o)
    torch.testing.assert_close(s2, s)


@pytest.mark.parametrize("cuts", [(3, 5), (1, 1, 1, 1, 1, 1, 1, 1), (7, 1)])
def test_resuming_a_mini_batch_in_pieces_equals_the_whole_step(cuts):
    """A mini-batch of 8 read in pieces (decoding) equals the autograd definition."""
    q, k, v, eta, s0 = make(b=1, t=8, h=2)
    want_o, want_s = autograd_ttt_linear(q, k, v, eta, s0, 8, 8**-0.5)
    s, outs, lo = s0, [], 0
    for n in cuts:
        o, s = ttt_linear_resume(*(x[:, lo : lo + n] for x in (q, k, v, eta)), s, s0)
        outs.append(o)
        lo += n
    torch.testing.assert_close(torch.cat(outs, dim=1), want_o, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(s, want_s, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("m", [1, 4])
def test_ttt_layer_is_its_equations(m):
    """TTTLinear against its docstring, rebuilt here on the primal op."""
    torch.manual_seed(0)
    layer = TTTLinear(16, 2, mini_batch_size=m).double()
    with torch.no_grad():  # a non-zero learned W_0 and norm, so that every term matters
        layer.S_init.normal_()
        layer.ln_weight.uniform_(0.5, 1.5)
        layer.ln_bias.normal_()
    x = torch.randn(2, 11, 16, dtype=F64)
    y, _ = layer(x)
    q, k, v, _ = layer.qkv(x, {})
    h, d = 2, 8
    q, k = (F.normalize(z.reshape(2, 11, h, d), dim=-1) for z in (q, k))
    eta = layer.eta_base * torch.sigmoid(layer.eta_proj(x))
    s0 = layer.S_init.expand(2, h, d, d)
    o, _ = ttt_linear(q, k, v.reshape(2, 11, h, d), eta, mini_batch_size=m, initial_state=s0,
                      mode="primal")  # fmt: skip
    o = F.layer_norm(o, (d,)) * layer.ln_weight + layer.ln_bias
    o = o * F.gelu(layer.g_proj(x).reshape(2, 11, h, d), approximate="tanh")
    torch.testing.assert_close(y, layer.o_proj(o.reshape(2, 11, 16)), atol=1e-12, rtol=1e-10)


def test_larger_mini_batches_reconstruct_worse_on_a_stream():
    """Gradients at a stale state: bigger mini-batches fit the stream less well."""
    q, k, v, _, _ = make(b=1, t=128, h=1, dk=16, dv=16)
    eta = torch.full(k.shape[:3], 0.5, dtype=F64)
    errors = []
    for m in (1, 16, 64):
        _, s = ttt_linear(k, k, v, eta, mini_batch_size=m, output_final_state=True)
        pred = torch.einsum("btk,kv->btv", k[:, -16:, 0], s[0, 0])
        errors.append(((pred - v[:, -16:, 0]) ** 2).mean().item())
    assert errors[0] < errors[1] < errors[2], errors


def test_ttt_linear_half_precision_keeps_a_float32_state():
    q, k, v, eta, _ = make(dtype=torch.float32)
    o, s = ttt_linear(q.half(), k.half(), v.half(), eta.half(), output_final_state=True)
    assert o.dtype == torch.float16 and s.dtype == torch.float32
    want, _ = ttt_linear(q.double(), k.double(), v.double(), eta.double())
    assert (o.double() - want).abs().max() < 2e-2


# --------------------------------------------------------------------------------------------
# TTT-MLP and Titans
# --------------------------------------------------------------------------------------------


def autograd_ttt_mlp(q, k, v, eta, w1, w2, m, scale):
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=F64)
    for bi in range(b):
        for hi in range(h):
            a, c = w1[bi, hi].clone(), w2[bi, hi].clone()
            for start in range(0, t, m):
                a0, c0 = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
                for i in range(start, min(start + m, t)):
                    pred = F.gelu(k[bi, i, hi] @ a0, approximate="tanh") @ c0
                    loss = 0.5 * ((pred - v[bi, i, hi]) ** 2).sum()
                    ga, gc = torch.autograd.grad(loss, (a0, c0))
                    a, c = a - eta[bi, i, hi] * ga, c - eta[bi, i, hi] * gc
                    hidden = F.gelu((scale * q[bi, i, hi]) @ a, approximate="tanh")
                    out[bi, i, hi] = hidden @ c
    return out, (a, c)


@pytest.mark.parametrize("m", [1, 3])
def test_ttt_mlp_matches_autograd_descent(m):
    q, k, v, eta, _ = make(b=1, t=13, h=2)
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(1, 2, 8, 12, generator=gen, dtype=F64) * 0.4
    w2 = torch.randn(1, 2, 12, 6, generator=gen, dtype=F64) * 0.3
    o, (f1, f2) = ttt_mlp(q, k, v, eta, (w1, w2), mini_batch_size=m, output_final_state=True)
    want_o, (a, c) = autograd_ttt_mlp(q, k, v, eta, w1, w2, m, 8**-0.5)
    torch.testing.assert_close(o, want_o, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(f1[0, 1], a)
    torch.testing.assert_close(f2[0, 1], c)


def test_titans_matches_a_hand_written_loop():
    q, k, v, theta, s0 = make(b=1, t=29, h=2)
    gen = torch.Generator().manual_seed(2)
    eta, alpha = (torch.rand(1, 29, 2, generator=gen, dtype=F64) for _ in range(2))
    u0 = 0.1 * torch.randn(s0.shape, generator=gen, dtype=F64)
    o, (mem, mom) = titans(
        q, k, v, theta, eta, alpha, initial_state=(s0, u0), output_final_state=True
    )
    scale = 8**-0.5
    for hi in range(2):
        m, u = s0[0, hi].clone(), u0[0, hi].clone()
        for i in range(29):
            kt, vt = k[0, i, hi], v[0, i, hi]
            surprise = torch.outer(kt, m.T @ kt - vt)
            u = eta[0, i, hi] * u - theta[0, i, hi] * surprise
            m = (1 - alpha[0, i, hi]) * m + u
            torch.testing.assert_close(o[0, i, hi], m.T @ (scale * q[0, i, hi]))
        torch.testing.assert_close(mem[0, hi], m)
        torch.testing.assert_close(mom[0, hi], u)


def test_titans_without_momentum_or_forgetting_is_the_delta_rule():
    q, k, v, theta, s0 = make()
    zero = torch.zeros_like(theta)
    o, _ = titans(q, k, v, theta, zero, zero, initial_state=(s0, torch.zeros_like(s0)))
    want, _ = delta_rule(q, k, v, theta, initial_state=s0, mode="recurrent")
    torch.testing.assert_close(o, want)


# --------------------------------------------------------------------------------------------
# The unified registry
# --------------------------------------------------------------------------------------------


def _flat(state):
    if isinstance(state, torch.Tensor):
        return state.flatten()
    return torch.cat([_flat(s) for s in state])


# TTT-MLP always needs initial weights (all-zero weights never learn).
CASES = [(key, s) for key in RULES for s in (False, True) if s or key != "ttt_mlp"]


@pytest.mark.parametrize(("key", "with_state"), CASES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4), (2, 37, 3, 8, 6), (1, 70, 2, 5, 7)])
def test_every_rule_of_the_registry_matches_its_specialised_op(key, shape, with_state):
    rule = RULES[key]
    b, t, h, dk, dv = shape
    gen = torch.Generator().manual_seed(sum(shape) + len(key))
    q, k, v, inputs, s0 = rule.sample(b, t, h, dk, dv, gen, F64)
    s0 = s0 if with_state else None
    o, final = memory_scan(rule, q, k, v, initial_state=s0, output_final_state=True, **inputs)
    want_o, want_final = rule.specialised(q, k, v, None, s0, **inputs)
    assert o.dtype == F64 and o.shape == (b, t, h, dv)
    torch.testing.assert_close(o, want_o, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(_flat(final), _flat(want_final), atol=1e-10, rtol=1e-8)


def test_the_registry_covers_the_survey_table():
    want = {"linear_attention", "retnet", "gla", "mamba2", "hgrn2", "deltanet",
            "gated_deltanet", "rwkv7", "ttt_linear", "titans", "softmax_attention",
            "sliding_window"}  # fmt: skip
    assert want <= set(RULES)
    classes = {r.key: r.cls for r in RULES.values()}
    assert {classes[k] for k in ("linear_attention", "retnet", "gla", "mamba2", "hgrn2")} == {
        "linear"
    }
    assert {classes[k] for k in ("deltanet", "gated_deltanet", "rwkv7")} == {"bilinear"}
    assert classes["ttt_mlp"] == "nonlinear"
    assert classes["softmax_attention"] == "unbounded" and classes["sliding_window"] == "windowed"
    bib = (ROOT / "references.bib").read_text()
    for rule in RULES.values():
        assert isinstance(rule, UpdateRule) and rule.cls in CLASSES
        assert rule.update and rule.objective and rule.state and rule.train and rule.decode
        assert re.search(rf"@\w+\{{{rule.cite},", bib), f"{rule.cite} missing from references.bib"


def test_registry_table_renders_every_rule_with_its_state_size():
    table = registry_table(d_k=64, d_v=32, context=1000)
    lines = table.splitlines()
    assert len([x for x in lines if x.startswith("| ") and "---" not in x]) == len(RULES) + 1
    for rule in RULES.values():
        assert f"| {rule.name} |" in table
        assert f"= {rule.state_elements(64, 32, 1000):,} |" in table
    assert "= 96,000 |" in table  # softmax attention: 1000 tokens x (64 + 32)
    with pytest.raises(ValueError, match="context must be a positive int"):
        registry_table(context=0)


def test_sliding_window_forgets_what_left_the_window():
    rule = RULES["sliding_window"]
    gen = torch.Generator().manual_seed(0)
    q, k, v, _, _ = rule.sample(1, 100, 1, 4, 4, gen, F64)
    _, (keys, values) = memory_scan(rule, q, k, v, output_final_state=True)
    assert keys.shape[1] == 64 and torch.equal(keys, k[:, -64:])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors():
    q, k, v, eta, s0 = make()
    with pytest.raises(ValueError, match=r"eta must have shape \[B, T, H\]"):
        ttt_linear(q, k, v, eta[..., None])
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear(q, k, v, eta, mini_batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        ttt_linear(q, k, v, eta, mode="chunk")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\]"):
        ttt_linear(q, k, v, eta, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match=r"anchor must have shape \[B, H, K, V\]"):
        ttt_linear_resume(q, k, v, eta, s0, s0[..., :2])
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTLinear(16, 2, mini_batch_size=0)
    with pytest.raises(TypeError, match="initial_state must be the pair"):
        ttt_mlp(q, k, v, eta, s0)
    w1 = torch.zeros(2, 3, 8, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"W2\) must have shape \[B, H, F, V\]"):
        ttt_mlp(q, k, v, eta, (w1, torch.zeros(2, 3, 5, 6, dtype=F64)))
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        titans(q, k, v, eta, eta + 1, eta)
    with pytest.raises(ValueError, match="rule must be one of"):
        memory_scan("nope", q, k, v)
    with pytest.raises(ValueError, match=r"missing \['beta'\]"):
        memory_scan("deltanet", q, k, v)
    with pytest.raises(ValueError, match=r"unexpected \['beta'\]"):
        memory_scan("linear_attention", q, k, v, beta=eta)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, H, K\]"):
        memory_scan("gla", q, k, v, g=eta)
    with pytest.raises(TypeError, match="rule must be an UpdateRule"):
        memory_scan(3, q, k, v)
    with pytest.raises(ValueError, match="needs initial weights"):
        memory_scan("ttt_mlp", q, k, v, eta=eta)


def test_memory_scan_checks_the_initial_state_against_the_rules_layout():
    q, k, v, eta, s0 = make()  # B, H, K, V = 2, 3, 8, 6
    la = "linear_attention"
    # a [1, H, K, V] state broadcast over the batch, and a bare [K, V] was accepted
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = "
                                         r"\(2, 3, 8, 6\), got \(1, 3, 8, 6\)"):  # fmt: skip
        memory_scan(la, q, k, v, initial_state=s0[:1])
    with pytest.raises(ValueError, match="initial_state must have 4 dimensions, got 2"):
        memory_scan(la, q, k, v, initial_state=s0[0, 0])
    # a 1-tuple gave an AttributeError, a string a RecursionError
    with pytest.raises(TypeError, match=r"rule 'linear_attention' must be a torch.Tensor "
                                        r"\[B, H, K, V\] or None, got tuple"):  # fmt: skip
        memory_scan(la, q, k, v, initial_state=(s0,))
    with pytest.raises(TypeError, match="must be a torch.Tensor .* got str"):
        memory_scan(la, q, k, v, initial_state="s0")
    with pytest.raises(TypeError, match="initial_state must be a floating-point tensor"):
        memory_scan("deltanet", q, k, v, beta=eta, initial_state=s0.long())
    with pytest.raises(ValueError, match="initial_state must be on the device of q"):
        memory_scan("ttt_linear", q, k, v, eta=eta, initial_state=s0.to("meta"))
    zero = torch.zeros_like(eta)
    titan = {"theta": eta, "eta": zero, "alpha": zero}
    with pytest.raises(TypeError, match=r"rule 'titans' must be a tuple of 2 tensors "
                                        r"\(\[B, H, K, V\], \[B, H, K, V\]\) or None, "
                                        r"got tuple of 1"):  # fmt: skip
        memory_scan("titans", q, k, v, initial_state=(s0,), **titan)
    with pytest.raises(TypeError, match="got Tensor"):
        memory_scan("titans", q, k, v, initial_state=s0, **titan)
    with pytest.raises(TypeError, match=r"initial_state\[1\] must be a torch.Tensor"):
        memory_scan("titans", q, k, v, initial_state=(s0, None), **titan)
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape"):
        memory_scan("titans", q, k, v, initial_state=(s0, s0[:1]), **titan)
    # TTT-MLP's hidden width F and a softmax prefix's length P are free but shared
    w1 = torch.zeros(2, 3, 8, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape \[B, H, F, V\] "
                                         r"= \(2, 3, 4, 6\), got \(2, 3, 5, 6\)"):  # fmt: skip
        memory_scan("ttt_mlp", q, k, v, eta=eta, initial_state=(w1, torch.zeros(2, 3, 5, 6)))
    prefix = (torch.zeros(2, 5, 3, 8, dtype=F64), torch.zeros(2, 4, 3, 6, dtype=F64))
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape \[B, P, H, V\] "
                                         r"= \(2, 5, 3, 6\)"):  # fmt: skip
        memory_scan("softmax_attention", q, k, v, initial_state=prefix)
    # a list is a tuple, any floating dtype is accepted, as by the specialised ops
    o, _ = memory_scan("titans", q, k, v, initial_state=[s0.float(), s0], **titan)
    want, _ = titans(q, k, v, **titan, initial_state=[s0.float(), s0])
    torch.testing.assert_close(o, want)


def test_retention_curves_follow_the_decay_when_later_keys_are_orthogonal():
    from effarch.unified import retention_curve

    steps = torch.arange(51, dtype=F64)
    for rule in ("linear_attention", "deltanet"):
        torch.testing.assert_close(retention_curve(rule, steps=50), torch.ones(51, dtype=F64))
    gamma = 1 - 2**-5
    torch.testing.assert_close(retention_curve("retnet", steps=50), gamma**steps)
    for rule in ("gla", "gated_deltanet", "titans"):
        got = retention_curve(rule, steps=50, log_decay=-0.1)
        torch.testing.assert_close(got, torch.exp(-0.1 * steps))
    # right after the write the memory returns the write strength: 1, or beta for the rules
    # that write with it
    for rule in ("linear_attention", "retnet", "gla"):
        assert retention_curve(rule, steps=3, beta=0.5)[0].item() == pytest.approx(1.0)
    for rule in ("deltanet", "gated_deltanet", "titans"):
        assert retention_curve(rule, steps=3, beta=0.5)[0].item() == pytest.approx(0.5)
    # overlapping later keys overwrite k_0 under the delta rule, not under linear attention
    assert retention_curve("deltanet", overlap=0.5)[-1] < 0.2
    with pytest.raises(ValueError, match="overlap must be a cosine"):
        retention_curve("deltanet", overlap=2.0)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        retention_curve("gla", log_decay=0.1)
    with pytest.raises(ValueError, match="rule must be one of"):
        retention_curve("mamba2")


def test_memory_stream_is_what_it_says():
    from effarch.tasks import memory_stream

    st = memory_stream(300, n_keys=8, d_key=16, d_value=12, rebind_every=100, seed=3,
                       dtype=F64)  # fmt: skip
    torch.testing.assert_close(st.keys @ st.keys.T, torch.eye(8, dtype=F64))
    for t in range(300):  # each step carries the current binding of the key that arrives
        torch.testing.assert_close(st.v[0, t, 0], st.bindings[t, st.index[t]])
        torch.testing.assert_close(st.k[3, t, 0], st.keys[st.index[t]])
    changed = (st.bindings[1:] != st.bindings[:-1]).any(-1).any(-1).nonzero().flatten() + 1
    assert changed.tolist() == [100, 200]
    assert (st.bindings[100] != st.bindings[99]).any(-1).sum() == 4  # half of the keys
    assert torch.equal(st.q[5, 0, 0], st.keys[5])
    perfect = st.bindings.permute(1, 0, 2)[:, :, None]
    assert st.recall_error(perfect).abs().max() == 0
    torch.testing.assert_close(st.recall_error(torch.zeros_like(st.v)), torch.ones(300, dtype=F64))
    again = memory_stream(300, n_keys=8, d_key=16, d_value=12, rebind_every=100, seed=3,
                          dtype=F64)  # fmt: skip
    assert torch.equal(again.v, st.v)
    with pytest.raises(ValueError, match="orthogonal=True needs n_keys <= d_key"):
        memory_stream(10, n_keys=20, d_key=8)
    with pytest.raises(ValueError, match="rebind_fraction must lie in"):
        memory_stream(10, rebind_fraction=1.5)
    with pytest.raises(ValueError, match="o must have the shape of v"):
        st.recall_error(torch.zeros(3))
