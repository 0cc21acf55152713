"""Chapter 5.1: routers against transformers' MoE routers on the same logits, capacity
against a loop, the other routers against brute force, and which routers are causal."""

import itertools

import pytest
import torch

from effarch.moe import (
    apply_capacity,
    balanced_assignment,
    expert_capacity,
    expert_choice,
    hash_route,
    null_expert_route,
    route,
)
from effarch.sparse import future_leaks

transformers = pytest.importorskip("transformers")
E, N = 8, 40


def logits(n=N, e=E, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # small integers: many exact ties
        return torch.randint(0, 3, (n, e), generator=gen).float()
    return torch.randn(n, e, generator=gen)


def their_router(cls, config):
    router = cls(config).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(config.hidden_size))  # logits = the input itself
    return router


def assert_same_choice(ours, theirs):
    (w, e), (tw, te) = ours, theirs
    torch.testing.assert_close(e, te, rtol=0, atol=0)
    torch.testing.assert_close(w, tw.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral(k, ties):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=E, num_local_experts=E, num_experts_per_tok=k)
    x = logits(ties=ties)
    _, tw, te = their_router(MixtralTopKRouter, cfg)(x)
    assert_same_choice(route(x, k), (tw, te))


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_and_olmoe(norm):
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeConfig,
        Qwen2MoeTopKRouter,
    )

    x = logits(seed=1)
    for cfg_cls, cls in ((Qwen2MoeConfig, Qwen2MoeTopKRouter), (OlmoeConfig, OlmoeTopKRouter)):
        cfg = cfg_cls(hidden_size=E, num_experts=E, num_experts_per_tok=4, norm_topk_prob=norm)
        _, tw, te = their_router(cls, cfg)(x)
        assert_same_choice(route(x, 4, renormalize=norm), (tw, te))


@pytest.mark.parametrize(("n_group", "topk_group", "k"), [(4, 2, 3), (2, 1, 2), (1, 1, 4)])
def test_deepseek_v3_groups_bias_and_scaling(n_group, topk_group, k):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Config,
        DeepseekV3TopkRouter,
    )

    cfg = DeepseekV3Config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=k,
                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
                           norm_topk_prob=True)  # fmt: skip
    router = their_router(DeepseekV3TopkRouter, cfg)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.3
    router.e_score_correction_bias.copy_(bias)
    x = logits(seed=2)
    _, tw, te = router(x)
    w, e = route(x, k, score="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group,
                 scaling=2.5)  # fmt: skip
    # transformers asks topk for sorted=False: compare each token's set of (expert, weight)
    te_sorted, perm = te.sort(-1)
    e_sorted, our_perm = e.sort(-1)
    assert torch.equal(e_sorted, te_sorted)
    torch.testing.assert_close(w.gather(1, our_perm), tw.gather(1, perm), rtol=1e-6, atol=1e-6)


def test_the_bias_chooses_but_never_weighs():
    x = logits(seed=3)
    bias = torch.zeros(E)
    bias[5] = 10.0  # expert 5 is always chosen ...
    w, e = route(x, 2, score="sigmoid", bias=bias, renormalize=False)
    assert (e[:, 0] == 5).all()
    torch.testing.assert_close(w[:, 0], x[:, 5].sigmoid())  # ... with its unbiased score


@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_switch_top1_with_capacity(capacity):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersTop1Router,
    )

    cfg = SwitchTransformersConfig(num_experts=E, hidden_size=E, expert_capacity=capacity,
                                   router_bias=False, router_jitter_noise=0.0)  # fmt: skip
    router = SwitchTransformersTop1Router(cfg).eval()
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(E))
    x = logits(seed=4).view(2, N // 2, E)  # two groups (sequences) of 20 tokens
    their_index, their_probs, _ = router(x)
    w, e = route(x.view(-1, E), 1, renormalize=False)
    e, keep = apply_capacity(e.view(2, N // 2, 1), E, capacity)
    ours = torch.nn.functional.one_hot(e[..., 0], E + 1)[..., :E]
    assert torch.equal(ours, their_index)
    torch.testing.assert_close(w.view(2, N // 2, 1), their_probs)


def test_capacity_gives_first_choices_priority_then_position():
    experts = torch.randint(0, 4, (3, 15, 2), generator=torch.Generator().manual_seed(6))
    cap = 4
    dropped, keep = apply_capacity(experts, 4, cap)
    for g in range(3):
        used = [0] * 4
        for slot in range(2):  # brute force: slot-major, then token order
            for t in range(15):
                x = int(experts[g, t, slot])
                ok = used[x] < cap
                used[x] += ok
                assert bool(keep[g, t, slot]) == ok
                assert int(dropped[g, t, slot]) == (x if ok else 4)
    assert expert_capacity(15, 4, 2, 1.0) == 8 and expert_capacity(15, 4, 2, 1.25) == 10


def test_expert_choice_fills_every_expert_and_leaks_the_future():
    x = logits(seed=7)
    w, tokens = expert_choice(x, 5)
    probs = x.softmax(-1)
    for e in range(E):
        want = probs[:, e].topk(5).indices
        assert set(tokens[e].tolist()) == set(want.tolist())
        torch.testing.assert_close(w[e], probs[tokens[e], e])

    def dense(seq):  # [1, T, E] logits -> [1, T, E] weights each token receives
        w, tokens = expert_choice(seq[0], 4)
        out = torch.zeros_like(seq[0])
        out[tokens, torch.arange(E)[:, None].expand_as(tokens)] = w.to(out.dtype)
        return out[None]

    def token_choice(seq):
        w, e = route(seq[0], 2)
        return torch.zeros_like(seq[0]).scatter(1, e, w.to(seq.dtype))[None]

    seq = logits(n=32, seed=8)[None].double()
    assert future_leaks(dense, seq, split=16).any()  # an expert ranks later tokens too
    assert not future_leaks(token_choice, seq, split=16).any()


def test_balanced_assignment_is_balanced_and_optimal_on_small_cases():
    for seed in range(5):
        x = logits(n=6, e=3, seed=seed)
        got = balanced_assignment(x)
        assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]
        best = max(
            (sum(float(x[t, a]) for t, a in enumerate(p)), p)
            for p in set(itertools.permutations([0, 0, 1, 1, 2, 2]))
        )
        assert sum(float(x[t, a]) for t, a in enumerate(got.tolist())) == pytest.approx(best[0])
    x = logits(n=64, e=8, seed=9) + torch.linspace(0, 3, 8)  # skewed: expert 7 preferred
    assert torch.bincount(balanced_assignment(x), minlength=8).tolist() == [8] * 8

    def as_onehot(seq):
        return torch.nn.functional.one_hot(balanced_assignment(seq[0]), 4)[None].double()

    seq = (logits(n=16, e=4, seed=10) + torch.linspace(0, 2, 4))[None].double()
    assert any(future_leaks(as_onehot, seq, split=8, seed=s).any() for s in range(3))


def test_hash_routing_is_fixed_balanced_and_causal():
    ids = torch.arange(50_000)
    e = hash_route(ids, 16)
    assert e.min() >= 0 and e.max() < 16
    counts = torch.bincount(e, minlength=16).float()
    assert (counts.std() / counts.mean()) < 0.05  # close to uniform over many ids
    assert torch.equal(hash_route(ids[:10], 16), e[:10])  # a token's expert is its own
    assert not torch.equal(hash_route(ids, 16, seed=1), e)


def test_null_experts_cost_nothing_and_adapt_k():
    x = logits(seed=11, e=E + 4)
    w, e = null_expert_route(x, 3, 4)
    null = e == E
    assert (w[null] == 0).all() and (e[~null] < E).all()
    x[:, E:] = 50.0  # every null expert wins: no real expert is used
    w, e = null_expert_route(x, 3, 4)
    assert (e == E).all() and (w == 0).all()


def test_bad_routing_input_is_named():
    x = logits()
    with pytest.raises(ValueError, match="k must be at most"):
        route(x, E + 1)
    with pytest.raises(ValueError, match="n_group and topk_group"):
        route(x, 2, n_group=2)
    with pytest.raises(ValueError, match="bias must have"):
        route(x, 2, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="score"):
        route(x, 2, score="relu")
    with pytest.raises(TypeError, match="logits"):
        route(x.long(), 2)
    with pytest.raises(ValueError, match="multiple"):
        balanced_assignment(logits(n=7, e=3))


def test_balanced_assignment_needs_a_positive_temperature():
    """Regression: temperature 0 gave NaN plans, a negative one minimised the affinity."""
    for bad in (0, 0.0, -0.05, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            balanced_assignment(logits(n=8, e=4), temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        balanced_assignment(logits(n=8, e=4), temperature="0.1")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32),
     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)  # fmt: skip
def test_route_weights_are_float32_or_float64_for_float64_logits(dtype, expected):
    weights, experts = route(logits().to(dtype), 2)
    assert weights.dtype == expected and experts.dtype == torch.int64
