"""Masked and block diffusion (chapter 7): the forward process, the loss and its ELBO, the
sampler against LLaDA's reference loop and against hand-computed schedules, block diffusion's
mask against a loop and its cached sampler against the uncached one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effarch.diffusion import (
    DiffusionLM,
    DiffusionLMConfig,
    add_gumbel_noise,
    block_causal_mask,
    block_diffusion_loss,
    block_diffusion_mask,
    block_generate,
    confidence,
    elbo_samples,
    forward_process,
    generate,
    loss_weight,
    mask_prob,
    masked_diffusion_loss,
    num_transfer_tokens,
)
from effarch.sparse import dense_mask
from effarch.tasks import perm_copy, perm_copy_oracle, perm_copy_valid

V, M = 11, 10  # vocabulary with the mask token last


def tiny(causal=False, seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = DiffusionLMConfig(vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, causal=causal)
    return DiffusionLM(cfg).double().eval()


# -- LLaDA's reference code, transcribed as its repository writes it (generate.py) ----------
def llada_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def llada_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """Greedy (temperature 0), low-confidence remasking, no guidance."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, lo : lo + block_length] == mask_id
        num_transfer_tokens_ = llada_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, lo + block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(conf.shape[0]):
                _, select_index = torch.topk(conf[j], k=int(num_transfer_tokens_[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# -- the forward process and the loss ---------------------------------------------------------
def test_num_transfer_tokens_equals_llada_and_sums_to_the_masked_count():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 13, generator=g) < 0.7
    for steps in (1, 3, 4, 13, 20):
        got = num_transfer_tokens(mask, steps)
        assert got.dtype == torch.int64 and got.shape == (6, steps)
        torch.testing.assert_close(got, llada_num_transfer_tokens(mask, steps))
        torch.testing.assert_close(got.sum(1), mask.sum(1))
    # 7 masked over 3 steps: 3, 2, 2 (the remainder goes first)
    assert num_transfer_tokens(torch.ones(1, 7, dtype=torch.bool), 3).tolist() == [[3, 2, 2]]


def test_forward_process_masks_each_token_with_probability_one_minus_alpha():
    x0 = torch.randint(0, M, (64, 500), generator=torch.Generator().manual_seed(0))
    for schedule in ("linear", "cosine"):
        t = torch.full((64,), 0.3)
        xt, masked, _ = forward_process(x0, M, t=t, schedule=schedule,
                                        generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert torch.equal(xt[masked], torch.full_like(xt[masked], M))
        assert torch.equal(xt[~masked], x0[~masked])
        want = 0.3 if schedule == "linear" else 1 - math.cos(math.pi * 0.3 / 2)
        assert abs(masked.float().mean().item() - want) < 4 * math.sqrt(want / 32000)
    _, _, t = forward_process(x0, M, generator=torch.Generator().manual_seed(2))
    assert t.shape == (64,) and bool((t >= 1e-3).all()) and bool((t <= 1).all())


def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha():
    t = torch.linspace(0.05, 1, 20, dtype=torch.float64)
    for schedule in ("linear", "cosine"):
        h = 1e-6

        def alpha(s, schedule=schedule):
            return 1 - mask_prob(s, schedule)

        deriv = (alpha(t + h / 2 * (t < 1)) - alpha(t - h / 2)) / (h / 2 * (t < 1) + h / 2)
        torch.testing.assert_close(loss_weight(t, schedule), -deriv / (1 - alpha(t)),
                                   rtol=1e-5, atol=0)  # fmt: skip


def test_masked_diffusion_loss_is_llada_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, M, (3, 7), generator=g)
    masked = torch.rand(3, 7, generator=g) < 0.5
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    # LLaDA's pretraining loss: token_loss / p_mask on the masked, summed, over B * L
    p_mask = t[:, None].expand(3, 7)
    ce = F.cross_entropy(logits[masked], x0[masked], reduction="none") / p_mask[masked]
    want = ce.sum() / (3 * 7)
    torch.testing.assert_close(masked_diffusion_loss(logits, x0, masked, t).double(), want)
    plain = F.cross_entropy(logits[masked], x0[masked])
    got = masked_diffusion_loss(logits, x0, masked, t, reduction="masked_mean")
    torch.testing.assert_close(got.double(), plain)


def test_masked_diffusion_loss_checks_t():
    """t must be [B] floating: a [1] or [B, L] t would broadcast to a wrong loss."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, V, generator=g)
    x0 = torch.randint(0, M, (3, 7), generator=g)
    masked = torch.rand(3, 7, generator=g) < 0.5
    for reduction in ("elbo", "masked_mean"):
        with pytest.raises(ValueError, match=r"t must hold one time per row of x0 \(3\), got 1"):
            masked_diffusion_loss(logits, x0, masked, torch.tensor([0.5]), reduction=reduction)
        with pytest.raises(ValueError, match="t must have 1 dimensions, got 2"):
            masked_diffusion_loss(logits, x0, masked, torch.full((3, 7), 0.5),
                                  reduction=reduction)  # fmt: skip
        with pytest.raises(TypeError, match="t must be a floating-point tensor"):
            masked_diffusion_loss(logits, x0, masked, torch.ones(3, dtype=torch.long),
                                  reduction=reduction)  # fmt: skip
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        masked_diffusion_loss(logits, x0, masked, 0.5)
    # what forward_process returns is accepted
    xt, masked, t = forward_process(x0, M, generator=g)
    assert masked_diffusion_loss(logits, x0, masked, t).isfinite()


def test_perm_copy_oracle_checks_n_and_mask_id():
    x = perm_copy(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"mask_id must not be one of the symbols .*got 3"):
        perm_copy_oracle(x, 4, 3)  # 3 is a symbol: clean 3s would look masked
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        perm_copy_oracle(x[:, :0], 0, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        perm_copy_oracle(x, 4.0, 4)
    with pytest.raises(ValueError, match="mask_id must be a non-negative int"):
        perm_copy_oracle(x, 4, -1)
    assert perm_copy_oracle(x, 4, 4).shape == (2, 8, 5)


def test_the_exact_denoiser_of_the_permutation_task_gives_the_exact_likelihood():
    """With the true conditionals the ELBO is tight: both estimators average to log n!."""
    n = 5
    x = perm_copy(40, n, generator=torch.Generator().manual_seed(0))
    oracle = lambda z: perm_copy_oracle(z, n, n)  # noqa: E731
    for estimator in ("count", "time"):
        e = elbo_samples(oracle, x, n, 250, estimator=estimator,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert e.shape == (250, 40) and e.dtype == torch.float64
        err = e.std().item() / math.sqrt(e.numel())
        assert abs(e.mean().item() - math.log(math.factorial(n))) < 4 * err


def test_the_two_elbo_estimators_and_both_schedules_agree_on_a_model():
    model = tiny()
    x = torch.randint(0, M, (4, 8), generator=torch.Generator().manual_seed(0))
    means = {}
    for est, sch in (("count", "linear"), ("time", "linear"), ("time", "cosine")):
        e = elbo_samples(model, x, M, 600, estimator=est, schedule=sch,
                         generator=torch.Generator().manual_seed(2))  # fmt: skip
        means[est, sch] = (e.mean(0), e.std(0) / math.sqrt(600))
    ref, ref_err = means["count", "linear"]
    for key, (m, err) in means.items():
        assert bool(((m - ref).abs() < 4 * (err + ref_err)).all()), key
    # the count estimator has the smaller spread (LLaDA's reason for it)
    assert bool((means["count", "linear"][1] < means["time", "linear"][1]).all())


def test_oracle_matches_enumeration_of_every_consistent_permutation():
    import itertools

    n = 4
    g = torch.Generator().manual_seed(3)
    x0 = perm_copy(30, n, generator=g)
    xt, _, _ = forward_process(x0, n, t=torch.full((30,), 0.6), generator=g)
    got = perm_copy_oracle(xt, n, n).exp()
    perms = torch.tensor(list(itertools.permutations(range(n))))
    full = torch.cat([perms, perms], dim=1)  # [24, 2n]
    for r in range(30):
        ok = ((xt[r] == n) | (full == xt[r])).all(dim=1)
        cond = full[ok]
        want = torch.stack([torch.bincount(cond[:, i], minlength=n + 1) for i in range(2 * n)])
        torch.testing.assert_close(got[r], want.double() / len(cond))


def test_perm_copy_validity():
    n = 6
    x = perm_copy(50, n, generator=torch.Generator().manual_seed(0))
    assert bool(perm_copy_valid(x, n).all())
    bad = x.clone()
    bad[:, 0] = bad[:, 1]  # a repeated symbol
    assert not bool(perm_copy_valid(bad, n).any())
    bad = x.clone()
    bad[:, n], bad[:, n + 1] = x[:, n + 1], x[:, n]  # the copy differs
    assert not bool(perm_copy_valid(bad, n).any())


# -- Gumbel noise and confidence --------------------------------------------------------------
def test_gumbel_noise_argmax_is_llada_s_and_samples_the_tempered_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        got = add_gumbel_noise(logits, 0.7, dtype=dtype, generator=torch.Generator().manual_seed(4))
        u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
        llada = logits.to(dtype).exp() / (-torch.log(u)) ** 0.7
        assert torch.equal(got.argmax(-1), llada.argmax(-1)) and got.dtype == dtype
    assert add_gumbel_noise(logits, 0) is logits
    # frequencies of argmax over many draws follow softmax(logits / T)
    one = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    draws = add_gumbel_noise(one.expand(40000, 4), 2.0, generator=torch.Generator().manual_seed(5))
    freq = torch.bincount(draws.argmax(-1), minlength=4).double() / 40000
    want = (one / 2).softmax(-1)
    assert bool(((freq - want).abs() < 4 * (want * (1 - want) / 40000).sqrt()).all())


def test_confidence_rules_by_hand():
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]], dtype=torch.float64))
    x0 = torch.tensor([[0, 1]])
    torch.testing.assert_close(confidence(logits, x0, "low_confidence"),
                               torch.tensor([[0.6, 0.35]], dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(confidence(logits, x0, "margin"),
                               torch.tensor([[0.3, 0.05]], dtype=torch.float64))  # fmt: skip
    h = lambda p: sum(q * math.log(q) for q in p)  # noqa: E731
    torch.testing.assert_close(
        confidence(logits, x0, "entropy"),
        torch.tensor([[h([0.6, 0.3, 0.1]), h([0.4, 0.35, 0.25])]], dtype=torch.float64),
    )


# -- the sampler ------------------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """Position i proposes token i mod 5 with probability p_i (the rest spread evenly),
    whatever the input: the commit order of every rule can be computed by hand."""

    def __init__(self, probs):
        super().__init__()
        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        t = x.shape[1]
        p = torch.full((t, V), 0.0, dtype=torch.float64)
        rest = (1 - self.probs[:t]) / (V - 1)
        p[:] = rest[:, None]
        p[torch.arange(t), torch.arange(t) % 5] = self.probs[:t]
        return p.log().expand(x.shape[0], t, V).clone()


def test_the_mask_token_is_never_proposed():
    class LovesMask(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], x.shape[1], V, dtype=torch.float64)
            out[..., M], out[..., 3] = 5.0, 1.0
            return out

    for kw in ({"steps": 4}, {"steps": None, "threshold": 0.5}):
        got = generate(LovesMask(), torch.zeros(2, 0, dtype=torch.long), mask_id=M,
                       gen_length=4, **kw)  # fmt: skip
        assert got.tokens.tolist() == [[3] * 4] * 2


def test_low_confidence_commits_the_most_confident_first_by_hand():
    probs = [0.5, 0.9, 0.3, 0.8, 0.6, 0.7]
    model = FixedLogits(probs)
    out = generate(model, torch.zeros(1, 0, dtype=torch.long), mask_id=M, gen_length=6, steps=3)
    # 2 per step, highest probability first: {1, 3}, then {5, 4}, then {0, 2}
    assert out.step_of.tolist() == [[2, 0, 2, 0, 1, 1]]
    assert out.tokens.tolist() == [[0, 1, 2, 3, 4, 0]] and out.nfe == 3 == model.calls
    assert out.per_step == [2, 2, 2]
    # two blocks of 3, two steps each: 2 then 1 per block, the second block after the first
    out = generate(model, torch.zeros(1, 0, dtype=torch.long), mask_id=M, gen_length=6,
                   steps=4, block_length=3)  # fmt: skip
    assert out.step_of.tolist() == [[0, 0, 1, 2, 3, 2]]
    # a prompt is kept and never committed
    prompt = torch.tensor([[7, 8]])
    out = generate(FixedLogits([0.5, 0.5, *probs]), prompt, mask_id=M, gen_length=6, steps=6)
    assert out.tokens[0, :2].tolist() == [7, 8] and out.step_of[0, :2].tolist() == [-1, -1]


def test_threshold_commits_every_proposal_above_it_and_at_least_one():
    model = FixedLogits([0.5, 0.95, 0.3, 0.92, 0.6, 0.7])
    out = generate(model, torch.zeros(1, 0, dtype=torch.long), mask_id=M, gen_length=6,
                   steps=None, threshold=0.9)  # fmt: skip
    # step 0: both above 0.9; then one at a time by confidence: 5, 4, 0, 2
    assert out.step_of.tolist() == [[3, 0, 4, 0, 2, 1]] and out.per_step == [2, 1, 1, 1, 1]


def test_margin_and_entropy_rank_like_low_confidence_on_two_level_proposals():
    model = FixedLogits([0.5, 0.9, 0.3, 0.8, 0.6, 0.7])
    for rule in ("margin", "entropy"):
        out = generate(model, torch.zeros(1, 0, dtype=torch.long), mask_id=M, gen_length=6,
                       steps=3, remasking=rule)  # fmt: skip
        assert out.step_of.tolist() == [[2, 0, 2, 0, 1, 1]], rule
    out = generate(model, torch.zeros(3, 0, dtype=torch.long), mask_id=M, gen_length=6, steps=4,
                   remasking="random", generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.per_step == [6, 6, 3, 3]  # 2, 2, 1, 1 per row
    assert sorted(out.step_of[0].tolist()) == [0, 0, 1, 1, 2, 3]


def test_generate_equals_llada_reference_loop_on_a_random_model():
    net = tiny(seed=1)

    def model(x):  # a trained model never proposes the mask token; a random one might
        out = net(x)
        out[..., M] = -torch.inf
        return out

    prompt = torch.randint(0, M, (3, 4), generator=torch.Generator().manual_seed(0))
    for steps, block in ((8, 8), (8, 4), (4, 2), (16, 8)):
        got = generate(model, prompt, mask_id=M, gen_length=8, steps=steps, block_length=block)
        want = llada_generate(model, prompt, steps, 8, block, M)
        assert torch.equal(got.tokens, want), (steps, block)


def test_classifier_free_guidance_extrapolates_from_the_unconditional_logits():
    class TwoWays(torch.nn.Module):
        """Token 1 is likelier with the prompt visible, token 2 without it."""

        def forward(self, x):
            sees = (x[:, :1] != M).double()  # [B, 1]
            base = torch.zeros(x.shape[0], x.shape[1], V, dtype=torch.float64)
            base[..., 1] = 1.0 * sees + 0.0
            base[..., 2] = 1.5 - 1.0 * sees
            return base

    prompt = torch.tensor([[3]])
    plain = generate(TwoWays(), prompt, mask_id=M, gen_length=2, steps=2)
    guided = generate(TwoWays(), prompt, mask_id=M, gen_length=2, steps=2, cfg_scale=1.0)
    # conditional logits: token 1 -> 1.0, token 2 -> 0.5; unconditional 0 and 1.5
    # guided: u + 2 (c - u) = 2.0 and -0.5, so token 1 wins where plain also picks 1;
    assert plain.tokens[0, 1:].tolist() == [1, 1] and guided.tokens[0, 1:].tolist() == [1, 1]

    # with the prompt's pull weakened, guidance flips the choice back to the prompt
    class Weak(TwoWays):
        def forward(self, x):
            out = super().forward(x)
            out[..., 1] *= 0.4  # conditional: token 1 -> 0.4 < token 2 -> 0.5
            return out

    weak = generate(Weak(), prompt, mask_id=M, gen_length=2, steps=2)
    assert weak.tokens[0, 1:].tolist() == [2, 2]
    got = generate(Weak(), prompt, mask_id=M, gen_length=2, steps=2, cfg_scale=1.0)
    assert got.tokens[0, 1:].tolist() == [1, 1]  # u + 2 (c - u): 0.8 against -0.5
    assert got.nfe == 2


def test_one_token_per_step_with_the_exact_denoiser_is_always_valid_and_all_at_once_rarely():
    n = 5
    oracle = lambda z: perm_copy_oracle(z, n, n)  # noqa: E731
    empty = torch.zeros(300, 0, dtype=torch.long)
    kw = dict(mask_id=n, gen_length=2 * n, temperature=1.0)
    one = generate(oracle, empty, steps=2 * n, generator=torch.Generator().manual_seed(0), **kw)
    assert bool(perm_copy_valid(one.tokens, n).all())
    allat = generate(oracle, empty, steps=1, generator=torch.Generator().manual_seed(0), **kw)
    # every token drawn from its marginal at once: valid with probability n! / n^(2n)
    assert perm_copy_valid(allat.tokens, n).float().mean().item() < 0.01
    thr = generate(oracle, empty, steps=None, threshold=0.9,
                   generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    assert bool(perm_copy_valid(thr.tokens, n).all()) and thr.nfe < 2 * n


# -- the model --------------------------------------------------------------------------------
def test_bidirectional_model_reads_both_sides_and_causal_reads_the_past_only():
    x = torch.randint(0, M, (2, 9), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % M
    bi, ar = tiny(), tiny(causal=True)
    assert not torch.allclose(bi(x)[:, 0], bi(y)[:, 0])
    torch.testing.assert_close(ar(x)[:, :-1], ar(y)[:, :-1], rtol=0, atol=0)
    # the causal model decodes with a cache like the full forward
    caches = ar.new_caches(2, 9)
    steps = torch.cat([ar(x[:, :4], caches=caches)] +
                      [ar(x[:, t : t + 1], caches=caches) for t in range(4, 9)], dim=1)  # fmt: skip
    torch.testing.assert_close(steps, ar(x), rtol=1e-10, atol=1e-10)


def test_model_rejects_bad_input():
    m = tiny()
    with pytest.raises(ValueError, match="input_ids must lie"):
        m(torch.tensor([[0, V]]))
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="caches must hold"):
        m(torch.zeros(1, 3, dtype=torch.long), caches=[])
    with pytest.raises(ValueError, match="n_heads must divide"):
        DiffusionLMConfig(V, d_model=30, n_heads=4)


# -- block diffusion --------------------------------------------------------------------------
def test_block_diffusion_mask_equals_the_loop():
    for n, bs in ((8, 2), (6, 3), (4, 4), (5, 1)):
        got = dense_mask(block_diffusion_mask(n, bs), 2 * n, 2 * n)[0, 0]
        want = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
        for q in range(2 * n):
            for k in range(2 * n):
                bq, bk = (q % n) // bs, (k % n) // bs
                q_clean, k_clean = q >= n, k >= n
                if not q_clean and not k_clean:
                    want[q, k] = bq == bk  # a noisy block reads only itself
                elif not q_clean and k_clean:
                    want[q, k] = bk < bq  # and the clean blocks before it
                elif q_clean and k_clean:
                    want[q, k] = bk <= bq  # the clean copy is block-causal
        assert torch.equal(got, want), (n, bs)
    with pytest.raises(ValueError, match="must divide"):
        block_diffusion_mask(6, 4)


def test_training_pass_sees_what_the_sampler_sees():
    """The noisy block b's logits in the 2n training pass equal the sampler's uncached pass
    over [clean blocks < b, noisy block b] and its cached pass."""
    model = tiny(seed=2)
    n, bs = 8, 2
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, M, (2, n), generator=g)
    xt, _, _ = forward_process(x0, M, t=torch.full((2,), 0.5), generator=g)
    pos = torch.arange(n).repeat(2)
    train = model(torch.cat([xt, x0], 1), positions=pos, mask_mod=block_diffusion_mask(n, bs))
    caches = model.new_caches(2, n)
    for b in range(n // bs):
        lo, hi = b * bs, (b + 1) * bs
        seq = torch.cat([x0[:, :lo], xt[:, lo:hi]], 1)
        plain = model(seq, mask_mod=block_causal_mask(bs))[:, lo:hi]
        torch.testing.assert_close(train[:, lo:hi], plain, rtol=1e-10, atol=1e-10)
        cached = model(xt[:, lo:hi], caches=caches)
        model.truncate(caches, lo)
        torch.testing.assert_close(cached, plain, rtol=1e-10, atol=1e-10)
        model(x0[:, lo:hi], caches=caches)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_block_sampling_equals_recomputing(temperature):
    model = tiny(seed=3)
    prompt = torch.randint(0, M, (2, 4), generator=torch.Generator().manual_seed(0))
    outs = [
        block_generate(model, prompt, mask_id=M, gen_length=8, block_size=2, steps_per_block=2,
                       use_cache=c, temperature=temperature,
                       generator=torch.Generator().manual_seed(1))
        for c in (True, False)
    ]  # fmt: skip
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].step_of, outs[1].step_of)
    assert bool((outs[0].tokens[:, 4:] != M).all())
    # cached: 4 blocks x 2 steps, 2 prompt blocks and 3 cache fills; uncached: 8 steps
    assert outs[0].nfe == 8 + 2 + 3 and outs[1].nfe == 8


def test_block_diffusion_loss_at_full_block_is_the_masked_diffusion_elbo():
    """With block_size = n no clean block is visible: the loss is the MDLM loss of the same
    masks, so its mean over many draws matches masked_diffusion_loss's."""
    model = tiny(seed=4)
    x0 = torch.randint(0, M, (16, 6), generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    with torch.no_grad():
        blocks = torch.stack([block_diffusion_loss(model, x0, 6, M, generator=g1)
                              for _ in range(300)])  # fmt: skip
        plain = []
        for _ in range(300):
            xt, masked, t = forward_process(x0, M, generator=g2)
            plain.append(masked_diffusion_loss(model(xt), x0, masked, t))
        plain = torch.stack(plain)
    err = (blocks.var() / 300 + plain.var() / 300).sqrt()
    assert abs(blocks.mean() - plain.mean()) < 4 * err


def test_block_diffusion_loss_at_block_one_estimates_the_autoregressive_cross_entropy():
    """block_size = 1: E[1[masked] / t] = 1, so the loss averages to the cross-entropy of
    each token predicted from the clean tokens before it (read off the uncached pass)."""
    model = tiny(seed=5)
    n = 6
    x0 = torch.randint(0, M, (8, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ce = 0.0
        for i in range(n):
            seq = torch.cat([x0[:, :i], torch.full((8, 1), M)], 1)
            logits = model(seq, mask_mod=block_causal_mask(1))[:, -1]
            ce += F.cross_entropy(logits, x0[:, i], reduction="sum").item()
        ar = ce / x0.numel()
        g = torch.Generator().manual_seed(1)
        draws = torch.stack([block_diffusion_loss(model, x0, 1, M, generator=g)
                             for _ in range(400)])  # fmt: skip
    assert abs(draws.mean().item() - ar) < 4 * draws.std().item() / 20


def test_block_generate_rejects_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="multiple of block_size"):
        block_generate(model, torch.zeros(1, 3, dtype=torch.long), mask_id=M, gen_length=4,
                       block_size=2, steps_per_block=1)  # fmt: skip
    with pytest.raises(ValueError, match="remasking"):
        block_generate(model, torch.zeros(1, 2, dtype=torch.long), mask_id=M, gen_length=4,
                       block_size=2, steps_per_block=1, remasking="best")  # fmt: skip


def test_generate_rejects_bad_input():
    model = tiny()
    p = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of block_length"):
        generate(model, p, mask_id=M, gen_length=6, block_length=4)
    with pytest.raises(ValueError, match="steps \\(3\\) must be a multiple"):
        generate(model, p, mask_id=M, gen_length=8, steps=3, block_length=4)
    with pytest.raises(ValueError, match="threshold"):
        generate(model, p, mask_id=M, gen_length=4, steps=None, threshold=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, p, mask_id=M, gen_length=4, steps=4, temperature=-1)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, p, mask_id=M, gen_length=4, steps=4, remasking="best")
    with pytest.raises(ValueError, match="t must lie"):
        forward_process(torch.zeros(1, 3, dtype=torch.long), M, t=torch.tensor([1.5]))


def test_train_takes_a_diffusion_loss():
    from effarch.train import train

    n = 4
    model = tiny(vocab=n + 1).float().train()
    data = perm_copy(64, n, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)

    def loss_fn(m, inputs, targets):
        xt, masked, t = forward_process(targets, n, generator=g)
        return masked_diffusion_loss(m(xt), targets, masked, t)

    res = train(model, lambda s: (data, data), steps=40, lr=1e-2, loss_fn=loss_fn,
                progress=False)  # fmt: skip
    assert len(res.losses) == 40 and res.tokens == 40 * data.numel()
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])


def test_block_elbo_at_block_one_is_the_autoregressive_nll_exactly():
    from effarch.diffusion import block_elbo_samples

    model = tiny(seed=6)
    n = 6
    x0 = torch.randint(0, M, (3, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.zeros(3, dtype=torch.float64)
        for i in range(n):  # token i from the clean tokens before it, itself masked
            seq = torch.cat([x0[:, :i], torch.full((3, 1), M)], 1)
            logits = model(seq, mask_mod=block_causal_mask(1))[:, -1]
            want += F.cross_entropy(logits, x0[:, i], reduction="none")
    got = block_elbo_samples(model, x0, 1, M, 3, generator=torch.Generator().manual_seed(1))
    for row in got:  # every draw masks the one token of every block: no noise at all
        torch.testing.assert_close(row, want, rtol=1e-9, atol=1e-9)


def test_block_elbo_at_full_block_matches_the_count_estimator():
    from effarch.diffusion import block_elbo_samples

    model = tiny(seed=7)
    x0 = torch.randint(0, M, (4, 6), generator=torch.Generator().manual_seed(0))
    a = block_elbo_samples(model, x0, 6, M, 400, generator=torch.Generator().manual_seed(1))
    b = elbo_samples(model, x0, M, 400, generator=torch.Generator().manual_seed(2))
    err = (a.var(0) / 400 + b.var(0) / 400).sqrt()
    assert bool(((a.mean(0) - b.mean(0)).abs() < 4 * err).all())


def test_an_adapted_model_starts_as_its_autoregressive_model_and_anneals_to_full():
    from effarch.diffusion import annealed_mask, from_autoregressive

    ar = tiny(causal=True, seed=8)
    bos = M  # any id the AR model reads first
    adapted = from_autoregressive(ar, bos)
    x = torch.randint(0, M, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ar(torch.cat([torch.full((2, 1), bos), x[:, :-1]], 1))  # predicts x
        torch.testing.assert_close(adapted(x), want, rtol=1e-10, atol=1e-10)
    assert adapted.model.cfg.causal is False and ar.cfg.causal is True
    # the mask opens monotonically, from causal to full
    masks = [dense_mask(annealed_mask(p), 40, 40)[0, 0] for p in (0.0, 0.3, 0.7, 1.0)]
    assert torch.equal(masks[0], torch.ones(40, 40, dtype=torch.bool).tril())
    assert bool(masks[-1].all())
    for lo, hi in zip(masks, masks[1:], strict=False):
        assert bool((lo <= hi).all()) and hi.sum() > lo.sum()
    future = masks[1].float().triu(1).sum() / (40 * 39 / 2)
    assert abs(future.item() - 0.3) < 0.05
    with pytest.raises(TypeError, match="causal DiffusionLM"):
        from_autoregressive(tiny(), bos)
    with pytest.raises(ValueError, match="progress"):
        annealed_mask(1.5)


def test_stored_diffusion_models_load_and_reject_bad_kinds():
    from effarch.experiments import diffusion_lm

    assert diffusion_lm.task_kinds("perm") == ("diffusion", "ar")
    with pytest.raises(ValueError, match="kind must be one of"):
        diffusion_lm.load_diffusion_model("perm", "block4")
    with pytest.raises(ValueError, match="task must be one of"):
        diffusion_lm.load_diffusion_model("music", "ar")


def test_judge_bits_is_the_byte_model_s_cross_entropy_and_byte_entropy_the_histogram_s():
    from effarch.experiments import diffusion_lm
    from effarch.models import load_bytelm

    x = diffusion_lm.heldout("text")[:3, :24]
    judge, _ = load_bytelm()
    with torch.no_grad():  # a loop over positions, from BOS (256)
        total = 0.0
        for r in range(len(x)):
            seq = torch.cat([torch.tensor([256]), x[r, :-1]])
            logp = judge(seq[None]).double().log_softmax(-1)[0]
            total -= sum(logp[i, x[r, i]].item() for i in range(x.shape[1]))
    expected = total / x.numel() / math.log(2)
    assert diffusion_lm.judge_bits(x) == pytest.approx(expected, rel=1e-4)
    per_row = diffusion_lm.judge_bits_per_sample(x)  # one pass: each row as judge_bits scores it
    assert per_row.shape == (3,) and per_row.dtype == torch.float64
    for r in range(3):
        assert per_row[r].item() == pytest.approx(diffusion_lm.judge_bits(x[r : r + 1]), rel=1e-5)
    assert per_row.mean().item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match=r"bytes in \[0, 255\]"):
        diffusion_lm.judge_bits_per_sample(torch.tensor([[1, 256]]))
    assert diffusion_lm.byte_entropy(torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])) == 2.0
    assert diffusion_lm.byte_entropy(torch.tensor([7, 7, 7])) == 0.0
    with pytest.raises(ValueError, match=r"bytes in \[0, 255\]"):
        diffusion_lm.judge_bits(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="tokens"):
        diffusion_lm.judge_bits(torch.tensor([1, 2]))
