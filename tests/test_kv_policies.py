"""Chapter 3.3: KV-cache policies on a decoding loop, against full forwards and brute force."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from effarch.models.bytelm import ByteLM, ByteLMConfig
from effarch.sparse import (
    H2O,
    TOVA,
    FullCache,
    Quest,
    SlidingWindow,
    StreamingLLM,
    and_masks,
    causal,
    decode_nll,
    llama_view,
    masked_attention,
    or_masks,
    sliding_window,
    snapkv_select,
)
from effarch.sparse.kv_policies import LayerCache

TINY = ByteLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ByteLM(TINY).double().eval()


def full_nll(model, ids):
    with torch.no_grad():
        return F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")


def nll_under_mask(model, ids, mod):
    """The full forward pass with every layer's attention restricted to ``mod``."""
    for layer in model.layers:
        layer.self_attn.attention = lambda q, k, v, causal, scale: masked_attention(
            q, k, v, mod, scale=scale
        )
    return full_nll(model, ids)


IDS = torch.randint(0, 257, (50,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "policy",
    [FullCache(), SlidingWindow(60), StreamingLLM(60, 4), H2O(60), TOVA(60), Quest(60, 8)],
    ids=repr,
)
def test_a_budget_larger_than_the_text_changes_nothing(model, policy):
    nll, sizes = decode_nll(model, IDS, policy)
    torch.testing.assert_close(nll, full_nll(model, IDS), rtol=1e-10, atol=1e-10)
    assert sizes == list(range(1, 50))


def test_equals_transformers_llama_decoded_by_the_same_loop():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = ByteLM(TINY).double()
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.llama_config()))
    theirs.load_state_dict(ours.llama_state_dict())
    theirs = theirs.double().eval()
    view = llama_view(theirs)
    assert (view.n_heads, view.n_kv_heads, view.head_dim) == (4, 2, 8)
    with torch.no_grad():
        want = F.cross_entropy(
            theirs(input_ids=IDS[None, :-1]).logits[0], IDS[1:], reduction="none"
        )
    for policy in (FullCache(), H2O(24)):
        got, _ = decode_nll(theirs, IDS, policy)
        same, _ = decode_nll(ours, IDS, policy)
        # the same loop over their modules; their RMSNorm computes in float32, hence 1e-6
        torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(decode_nll(theirs, IDS, FullCache())[0], want, rtol=1e-6, atol=1e-6)


def test_sliding_window_eviction_equals_a_window_mask(model):
    nll, sizes = decode_nll(model, IDS, SlidingWindow(12))
    assert max(sizes) == 12
    torch.testing.assert_close(nll, nll_under_mask(model, IDS, sliding_window(12)), rtol=1e-10,
                               atol=1e-10)  # fmt: skip


def test_sinks_without_repositioning_equal_a_sink_and_window_mask(model):
    policy = StreamingLLM(12, n_sink=3, reposition=False)
    nll, _ = decode_nll(model, IDS, policy)
    sinks = lambda b, h, q, kv: kv < 3  # noqa: E731
    mask = and_masks(causal(), or_masks(sliding_window(9), sinks))
    torch.testing.assert_close(nll, nll_under_mask(model, IDS, mask), rtol=1e-10, atol=1e-10)
    # with repositioning the kept keys sit at slots 0 .. 11: a different, bounded geometry
    moved, sizes = decode_nll(model, IDS, StreamingLLM(12, n_sink=3))
    assert max(sizes) == 12 and not torch.allclose(moved, nll)


def synthetic_cache(n=10):
    gen = torch.Generator().manual_seed(3)
    return LayerCache(
        k=torch.randn(n, 2, 8, generator=gen, dtype=torch.float64),
        v=torch.randn(n, 2, 8, generator=gen, dtype=torch.float64),
        pos=torch.arange(100, 100 + n),
        score=torch.tensor([5.0, 1.0, 3.0, 3.0, 0.5, 9.0, 2.0, 2.0, 0.1, 0.0]).double(),
        last=torch.tensor([0.3, 0.1, 0.1, 0.05, 0.2, 0.05, 0.05, 0.1, 0.03, 0.02]).double(),
    )


def brute_top(values, k):
    """The k largest by value, ties to the newer (later) entry: a sort on (value, index)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)
    return sorted(order[:k])


def test_h2o_keeps_the_recent_window_and_the_heaviest_of_the_rest():
    cache = synthetic_cache()
    keep = sorted(H2O(6, recent=3).evict(cache).tolist())
    older = cache.score[:7].tolist()
    assert keep == brute_top(older, 3) + [7, 8, 9]
    assert brute_top(older, 3) == [0, 3, 5]  # 9.0, 5.0, then the tie 3.0/3.0 goes to index 3


def test_tova_drops_what_the_current_query_ignores():
    cache = synthetic_cache()
    keep = sorted(TOVA(7).evict(cache).tolist())
    assert keep == brute_top(cache.last.tolist(), 7)
    assert 9 not in keep and 8 not in keep and 0 in keep


def test_quest_bound_and_pages():
    cache = synthetic_cache(37)
    cache.score, cache.last = torch.zeros(37), torch.zeros(37)
    q = torch.randn(4, 8, dtype=torch.float64)  # 4 query heads over 2 key/value heads
    policy = Quest(16, page_size=8)
    read = policy.read_mask(q, cache)
    assert read.shape == (4, 37)
    keys = cache.k.repeat_interleave(2, dim=1)  # [n, H, D]
    exact = torch.einsum("hd,nhd->hn", q, keys)
    for h in range(4):
        pages = read[h].view(-1)[:32].view(4, 8).all(1).tolist() + [bool(read[h, 32:].all())]
        assert sum(pages) == 2 and pages[-1]  # budget / page_size pages, the last always
        for m in range(5):  # the bound of every page is above each of its keys' scores
            lo, hi = m * 8, min(37, m * 8 + 8)
            kmin, kmax = keys[lo:hi, h].amin(0), keys[lo:hi, h].amax(0)
            bound = torch.maximum(q[h] * kmin, q[h] * kmax).sum()
            assert (exact[h, lo:hi] <= bound + 1e-12).all()
    assert policy.read_mask(q, synthetic_cache(16)) is None  # within budget: read all


@pytest.mark.parametrize("kernel", [1, 3, 4, 5])
def test_snapkv_vote_against_a_loop(kernel):
    gen = torch.Generator().manual_seed(5)
    t, window, budget = 40, 6, 16
    s = torch.randn(2, 3, t, t, generator=gen, dtype=torch.float64)
    att = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    keep = snapkv_select(att, budget, window=window, kernel=kernel)
    for g in range(2):
        votes = [sum(att[g, r, i, j].item() for r in range(3) for i in range(t - window, t))
                 for j in range(t - window)]  # fmt: skip
        lo, hi = kernel // 2, (kernel - 1) // 2  # pooled over j - lo .. j + hi
        pooled = [max(votes[max(0, j - lo) : j + hi + 1]) for j in range(t - window)]
        best = sorted(range(t - window), key=lambda j: (-pooled[j], j))[: budget - window]
        assert keep[g].tolist() == sorted(best) + list(range(t - window, t))


def test_snapkv_keeps_budget_distinct_tokens_with_an_even_kernel_on_the_input_device():
    # every query attends to token 9, the last before the window: with kernel 4 the pooled
    # votes had one entry too many (index 10, inside the window), so 10 was kept twice
    t = 12
    s = torch.zeros(1, 2, t, t, dtype=torch.float64)
    s[..., 9] += 10
    att = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    for kernel in (2, 4, 6):
        keep = snapkv_select(att, 5, window=2, kernel=kernel)[0].tolist()
        assert len(set(keep)) == 5 and keep == sorted(keep), (kernel, keep)
        assert keep[-2:] == [10, 11] and 9 in keep
    assert snapkv_select(att, 5, window=2, kernel=4).tolist() == [[0, 8, 9, 10, 11]]
    # the indices live on the device of the attention (meta: no data, only the device)
    meta = att.to("meta")
    assert snapkv_select(meta, 5, window=2, kernel=4).device.type == "meta"
    assert snapkv_select(meta, 20, window=2).device.type == "meta"  # budget >= T: everything
    with pytest.raises(ValueError, match="attention must have 4 dimensions"):
        snapkv_select(att[0], 5, window=2)


class _TransformersLike(torch.nn.Module):
    """A ByteLM's modules behind a transformers-style ``model.model`` / ``config`` /
    ``lm_head``, the config as transformers 4.x writes it (``rope_theta``, ``rope_scaling``)."""

    def __init__(self, inner, **config):
        super().__init__()
        self.model = inner
        self.lm_head = torch.nn.Linear(TINY.d_model, inner.embed_tokens.num_embeddings,
                                       bias=False, dtype=torch.float64)  # fmt: skip
        self.lm_head.weight = inner.embed_tokens.weight  # tied, as ByteLM
        self.config = SimpleNamespace(
            num_attention_heads=TINY.n_heads, num_key_value_heads=TINY.n_kv_heads,
            hidden_size=TINY.d_model, rope_theta=inner.cfg.rope_base, **config,
        )  # fmt: skip


def test_llama_view_rejects_a_scaled_rope_under_either_transformers_version(model):
    plain = _TransformersLike(model, rope_scaling=None)
    got, _ = decode_nll(plain, IDS[:20], FullCache())
    torch.testing.assert_close(got, full_nll(model, IDS[:20]), rtol=1e-10, atol=1e-10)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    with pytest.raises(ValueError, match="config.rope_scaling must have rope_type 'default', "
                                         "got 'llama3'"):  # fmt: skip
        llama_view(_TransformersLike(model, rope_scaling=llama3))  # transformers 4.x
    with pytest.raises(ValueError, match="config.rope_scaling .* got 'linear'"):
        llama_view(_TransformersLike(model, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="config.rope_parameters .* got 'yarn'"):  # v5
        llama_view(_TransformersLike(model, rope_parameters={"rope_type": "yarn"}))
    llama_view(_TransformersLike(model, rope_scaling={"rope_type": "default"}))


def test_llama_view_rejects_attention_weights_the_policies_do_not_apply(model):
    model.layers[1].self_attn.q_norm = torch.nn.RMSNorm(8)
    want = r"model.layers\[1\].self_attn must hold weights only in q_proj, k_proj, v_proj, "
    with pytest.raises(TypeError, match=want + r"o_proj .*got q_norm"):
        llama_view(model)
    with pytest.raises(TypeError, match="got q_norm"):
        llama_view(_TransformersLike(model))
    del model.layers[1].self_attn.q_norm
    model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # gpt-oss-like
    with pytest.raises(TypeError, match=r"model.layers\[0\].* got sinks"):
        llama_view(model)
    del model.layers[0].self_attn.sinks
    model.layers[0].self_attn.rotary = torch.nn.Module()  # no weights: accepted
    llama_view(model)


def test_llama_view_rejects_a_transformers_qwen3():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"self_attn must hold .* got q_norm, k_norm"):
        llama_view(transformers.Qwen3ForCausalLM(config))


def test_bad_input(model):
    with pytest.raises(ValueError, match="n_sink must be less than budget=4"):
        StreamingLLM(4, n_sink=4)
    with pytest.raises(ValueError, match="budget must be"):
        SlidingWindow(0)
    with pytest.raises(ValueError, match="recent must be at most budget=4"):
        H2O(4, recent=5)
    with pytest.raises(TypeError, match="policy must be a KVPolicy"):
        decode_nll(model, IDS, "window")
    with pytest.raises(TypeError, match="ByteLM or a transformers"):
        llama_view(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="window must be less than budget=4"):
        snapkv_select(torch.ones(1, 1, 8, 8), 4, window=4)


def test_recall_is_the_full_attention_mass_on_what_the_policy_reads(model):
    """Layer 0 sees the embeddings only, so its full-cache attention under any policy is
    the full forward's: the window's kept mass is a sum of the forward's probabilities over
    the last B positions, the oracle its top-B sum."""
    from effarch.sparse import decode

    b = 12
    got = decode(model, IDS, SlidingWindow(b), recall=True)
    with torch.no_grad():
        probs = model.attention_probs(IDS[None, :-1])[0, 0]  # layer 0: [H, T, T]
    for t in (3, 20, 48):
        row = probs[:, t, : t + 1]
        want_kept = row[:, max(0, t - b + 1) :].sum(-1).mean()
        want_oracle = row.topk(min(b, t + 1), dim=-1).values.sum(-1).mean()
        torch.testing.assert_close(got.kept_mass[t, 0].item(), want_kept.item())
        torch.testing.assert_close(got.oracle_mass[t, 0].item(), want_oracle.item())
    assert (got.kept_mass <= got.oracle_mass + 1e-12).all()
    assert got.read[:, 0].tolist() == [min(t + 1, b) for t in range(49)]
    full = decode(model, IDS, FullCache(), recall=True)
    torch.testing.assert_close(full.kept_mass, torch.ones_like(full.kept_mass))
    torch.testing.assert_close(full.oracle_mass, torch.ones_like(full.oracle_mass))
    assert torch.isnan(decode(model, IDS[:5], FullCache()).kept_mass).all()


def test_quest_reads_its_budget_and_holds_everything(model):
    from effarch.sparse import decode

    got = decode(model, IDS, Quest(16, page_size=8), recall=True)
    assert got.held.tolist() == list(range(1, 50))
    # two pages of 8: the current (partly filled) one and the best other one
    assert got.read.max() <= 16 and (got.read[16:] > 8).all() and got.read[47].min() == 16
    assert (got.kept_mass <= got.oracle_mass + 1e-12).all()
    view = llama_view(model)
    per_token = 2 * TINY.n_layers * TINY.n_kv_heads * (TINY.d_model // TINY.n_heads) * 2
    assert got.cache_bytes(view).tolist() == [per_token * n for n in range(1, 50)]
