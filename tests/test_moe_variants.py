"""Chapter 5.2: Soft MoE, Mixture-of-Depths and MoE++'s zero-computation experts against
loops over their definitions; which of them are causal."""

import pytest
import torch
import torch.nn.functional as F

from effarch.moe import MixtureOfDepths, MoEPlusPlus, SoftMoE
from effarch.sparse import future_leaks

D, F_ = 12, 8


def swiglu(x, gu, dn):
    g, u = (gu @ x).chunk(2)
    return dn @ (F.silu(g) * u)


def test_soft_moe_follows_its_definition_and_is_not_causal():
    torch.manual_seed(0)
    layer = SoftMoE(D, F_, n_experts=3, slots_per_expert=2).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    y = layer(x)
    gu, dn, phi = layer.experts.gate_up_proj, layer.experts.down_proj, layer.phi
    for b in range(2):
        logits = x[b] @ phi  # [T, 6]
        for t in range(7):
            want = torch.zeros(D, dtype=torch.float64)
            for s in range(6):
                d = torch.softmax(logits[:, s], 0)  # slot s mixes every token
                slot_in = sum(d[u] * x[b, u] for u in range(7))
                c = torch.softmax(logits[t], 0)[s]
                want = want + c * swiglu(slot_in, gu[s // 2], dn[s // 2])
            torch.testing.assert_close(y[b, t], want)
    assert future_leaks(layer, x, split=4).all()  # every slot reads every token


def test_mixture_of_depths_routes_the_top_tokens_and_decodes_by_its_predictor():
    torch.manual_seed(1)
    block = torch.nn.Linear(D, D).double()  # token-wise, so the reference is per token
    mod = MixtureOfDepths(block, D, capacity=0.25).double()
    x = torch.randn(3, 16, D, dtype=torch.float64)
    y = mod(x)
    r = mod.router(x)[..., 0]
    assert (mod.chosen.sum(1) == 4).all()
    for b in range(3):
        top = set(r[b].topk(4).indices.tolist())
        assert set(mod.chosen[b].nonzero()[:, 0].tolist()) == top
        for t in range(16):
            want = x[b, t] + r[b, t] * block(x[b, t]) if t in top else x[b, t]
            torch.testing.assert_close(y[b, t], want)
    # top-k over the sequence reads the future; the predictor's routing does not
    assert any(future_leaks(mod, x, split=8, seed=s).any() for s in range(3))
    assert not future_leaks(lambda z: mod(z, causal=True), x, split=8).any()
    loss = mod.predictor_loss()
    grads = torch.autograd.grad(loss, [*mod.predictor.parameters(), mod.router.weight],
                                allow_unused=True)  # fmt: skip
    assert grads[-1] is None and all(g is not None for g in grads[:-1])


def test_moe_plus_plus_equals_a_per_token_loop():
    torch.manual_seed(2)
    layer = MoEPlusPlus(D, F_, n_experts=3, k=2, n_zero=1, n_copy=1, n_constant=2).double()
    with torch.no_grad():
        layer.constant_gates.normal_()
        layer.gate.weight.mul_(3)  # spread the choices over every kind of expert
    x = torch.randn(40, D, dtype=torch.float64)
    y = layer(x)
    logits = layer.gate(x)
    p = logits.softmax(-1)
    kinds = set()
    for n in range(40):
        top = p[n].topk(2)
        w = top.values / top.values.sum()
        want = torch.zeros(D, dtype=torch.float64)
        for wi, e in zip(w, top.indices.tolist(), strict=True):
            if e < 3:
                want = want + wi * swiglu(x[n], layer.experts.gate_up_proj[e],
                                          layer.experts.down_proj[e])  # fmt: skip
                kinds.add("ffn")
            elif e == 3:
                kinds.add("zero")
            elif e == 4:
                want = want + wi * x[n]
                kinds.add("copy")
            else:
                j = e - 5
                a = torch.softmax(layer.constant_gates[j] @ x[n], 0)
                want = want + wi * (a[0] * x[n] + a[1] * layer.constant_vectors[j])
                kinds.add("constant")
        torch.testing.assert_close(y[n], want)
    assert kinds == {"ffn", "zero", "copy", "constant"}
    assert 0 < layer.ffn_per_token < 2  # some tokens skip FFN experts


def test_bad_variant_input_is_named():
    with pytest.raises(ValueError, match="capacity"):
        MixtureOfDepths(torch.nn.Identity(), D, capacity=0)
    with pytest.raises(ValueError, match="k must be at most"):
        MoEPlusPlus(D, F_, 2, 5, n_zero=1, n_copy=1, n_constant=0)
    with pytest.raises(ValueError, match="x must be"):
        SoftMoE(D, F_, 2)(torch.randn(4, D))
    with pytest.raises(RuntimeError, match="forward first"):
        MixtureOfDepths(torch.nn.Identity(), D).predictor_loss()


def test_mixture_of_depths_predictor_loss_is_against_the_top_k_after_a_causal_call_too():
    """Regression: after forward(x, causal=True), self.chosen is the predictor's own choice,
    and predictor_loss measured the predictor against itself."""
    torch.manual_seed(0)
    mod = MixtureOfDepths(torch.nn.Linear(D, D), D, capacity=0.25).double()
    x = torch.randn(3, 16, D, dtype=torch.float64)
    mod(x)
    top_k = mod.chosen.clone()
    training_loss = mod.predictor_loss()
    mod(x, causal=True)
    by_predictor = mod.predictor(x)[..., 0] > 0
    assert torch.equal(mod.chosen, by_predictor)  # the routing it used, as before
    assert not torch.equal(by_predictor, top_k)  # untrained: the two routings differ
    torch.testing.assert_close(mod.predictor_loss(), training_loss)  # the same target
    self_loss = F.binary_cross_entropy_with_logits(mod.predictor(x)[..., 0], by_predictor.double())
    assert mod.predictor_loss() > self_loss + 1e-3
