"""RoPE, MultiHeadAttention (MHA/GQA/MQA) with its KV cache, mha_to_gqa, and MLA."""

import math

import pytest
import torch

from effarch.attention import (
    KVCache,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    apply_rope,
    kv_cache_bytes,
    mha_to_gqa,
    naive_attention,
    project_qkv,
    sdpa_attention,
    tiled_attention,
)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def rope_complex(x, positions, base=10000.0):
    """RoPE as complex multiplication: pair (x_i, x_{i+D/2}) is rotated by p * theta_i."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    rot = torch.polar(torch.ones_like(theta), positions[:, None].double() * theta)
    z = z * rot[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation_and_is_relative():
    x = torch.randn(2, 9, 3, 16)
    pos = torch.arange(5, 14)
    torch.testing.assert_close(apply_rope(x, pos), rope_complex(x, pos))
    torch.testing.assert_close(apply_rope(x, torch.zeros(9, dtype=torch.long)), x)
    torch.testing.assert_close(apply_rope(x, pos).norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(p, s):
        return (apply_rope(q, torch.tensor([p])) * apply_rope(k, torch.tensor([s]))).sum()

    torch.testing.assert_close(dot(7, 3), dot(104, 100))  # depends on p - s only
    with pytest.raises(ValueError, match="one entry per token"):
        apply_rope(x, torch.arange(3))
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 2, 1, 5), torch.arange(2))


def reference_mha(layer, x):
    """The layer's computation written out head by head with naive_attention."""
    b, t, _ = x.shape
    h, g, dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    pos = torch.arange(t)
    q = apply_rope(layer.q_proj(x).view(b, t, h, dh), pos)
    k = apply_rope(layer.k_proj(x).view(b, t, g, dh), pos)
    v = layer.v_proj(x).view(b, t, g, dh)
    outs = []
    for head in range(h):
        kv = head // (h // g)
        outs.append(naive_attention(q[:, :, head : head + 1], k[:, :, kv : kv + 1],
                                    v[:, :, kv : kv + 1], causal=True))  # fmt: skip
    return layer.o_proj(torch.cat(outs, dim=2).reshape(b, t, h * dh))


@pytest.mark.parametrize("n_kv_heads", [8, 4, 2, 1])  # MHA, GQA 2, GQA 4, MQA
def test_mha_gqa_mqa_forward_and_cached_decoding(n_kv_heads):
    layer = MultiHeadAttention(64, 8, n_kv_heads)
    x = torch.randn(2, 13, 64)
    full = layer(x)
    torch.testing.assert_close(full, reference_mha(layer, x))
    cache = layer.new_cache(2, 16)
    prefill = layer(x[:, :5], cache)  # a prompt of 5, then one token at a time
    steps = [layer(x[:, i : i + 1], cache) for i in range(5, 13)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full)
    assert cache.length == 13
    assert cache.nbytes() == kv_cache_bytes(
        n_layers=1, seq_len=13, batch=2, n_kv_heads=n_kv_heads, head_dim=8, bytes_per_element=8
    )


def test_attention_backends_agree_inside_the_layer():
    x = torch.randn(1, 20, 32)
    layers = [MultiHeadAttention(32, 4, 2, attention=f) for f in (naive_attention, tiled_attention)]
    layers[1].load_state_dict(layers[0].state_dict())
    base = MultiHeadAttention(32, 4, 2)
    base.load_state_dict(layers[0].state_dict())
    for layer in layers:
        torch.testing.assert_close(layer(x), base(x))


def test_kv_cache_bounds_and_truncate():
    cache = KVCache(1, 4, 2, 8, dtype=torch.float64)  # the dtype of the keys and values
    cache.update(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="at most max_len=4"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"k must be \[1, T, 2, 8\]"):
        cache.update(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="at most the 1 tokens"):
        cache.truncate(2)


def test_mha_to_gqa_mean_pools_key_value_heads():
    mha = MultiHeadAttention(48, 6)
    gqa = mha_to_gqa(mha, 2)
    assert (gqa.n_heads, gqa.n_kv_heads) == (6, 2)
    wk = mha.k_proj.weight.view(6, 8, 48)
    torch.testing.assert_close(gqa.k_proj.weight.view(2, 8, 48)[1], wk[3:6].mean(0))
    torch.testing.assert_close(gqa.q_proj.weight, mha.q_proj.weight)
    # when the heads of a group are already identical, pooling changes nothing
    with torch.no_grad():
        for proj in (mha.k_proj, mha.v_proj):
            w = proj.weight.view(6, 8, 48)
            w[1] = w[2] = w[0]
            w[4] = w[5] = w[3]
    x = torch.randn(2, 9, 48)
    torch.testing.assert_close(mha_to_gqa(mha, 2)(x), mha(x))
    torch.testing.assert_close(mha_to_gqa(mha, 6)(x), mha(x))
    with pytest.raises(ValueError, match="must divide"):
        mha_to_gqa(mha, 4)
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        mha_to_gqa(torch.nn.Linear(2, 2), 1)


def test_multi_head_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(64, 8, 3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(60, 8)
    with pytest.raises(ValueError, match="d_model=64"):
        MultiHeadAttention(64, 8)(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="x must have 3 dim"):
        MultiHeadAttention(64, 8)(torch.randn(3, 64))


MLA_CONFIGS = [
    dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    dict(kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=6, qk_rope_head_dim=8, v_head_dim=10),
]


def reference_mla(m, x):
    """MLA head by head from the equations: expand keys and values per head, then attend."""
    b, t, _ = x.shape
    pos = torch.arange(t)
    q = m.q_proj(x).view(b, t, m.n_heads, m.d_n + m.d_r)
    c, kr = m.kv_down(x).split([m.d_c, m.d_r], dim=-1)
    c = m.kv_norm(c)
    kr = apply_rope(kr[:, :, None], pos)
    w = m.kv_up.weight.view(m.n_heads, m.d_n + m.d_v, m.d_c)
    outs = []
    for h in range(m.n_heads):
        k_h = torch.cat([c @ w[h, : m.d_n].T, kr[:, :, 0]], dim=-1)[:, :, None]
        v_h = (c @ w[h, m.d_n :].T)[:, :, None]
        q_rope = apply_rope(q[:, :, h : h + 1, m.d_n :], pos)[:, :, 0]
        q_h = torch.cat([q[:, :, h, : m.d_n], q_rope], dim=-1)[:, :, None]
        outs.append(naive_attention(q_h, k_h, v_h, causal=True, scale=(m.d_n + m.d_r) ** -0.5))
    return m.o_proj(torch.cat(outs, dim=2).reshape(b, t, -1))


@pytest.mark.parametrize("cfg", MLA_CONFIGS)
def test_mla_naive_absorbed_and_cached_paths_agree(cfg):
    m = MultiHeadLatentAttention(64, 4, **cfg)
    x = torch.randn(2, 11, 64)
    full = m(x)
    torch.testing.assert_close(full, reference_mla(m, x))
    torch.testing.assert_close(m(x, absorb=True), full)  # the absorption identity
    for absorb in (False, True):
        cache = m.new_cache(2, 12)
        outs = [m(x[:, :4], cache, absorb=absorb)]
        outs += [m(x[:, i : i + 1], cache, absorb=absorb) for i in range(4, 11)]
        torch.testing.assert_close(torch.cat(outs, dim=1), full)
        per_token = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        assert cache.nbytes() == 2 * 11 * per_token * 8
        assert cache.nbytes() == kv_cache_bytes(
            n_layers=1, seq_len=11, batch=2, kv_lora_rank=cfg["kv_lora_rank"],
            rope_head_dim=cfg["qk_rope_head_dim"], bytes_per_element=8,
        )  # fmt: skip


def test_mla_decode_impl_picks_the_path_of_cached_calls():
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[1])
        return sdpa_attention(*args, **kwargs)

    torch.manual_seed(0)
    m = MultiHeadLatentAttention(64, 4, kv_lora_rank=16, qk_nope_head_dim=16,
                                 qk_rope_head_dim=8, v_head_dim=16, attention=counted,
                                 decode_impl="absorb").double()  # fmt: skip
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    full = m(x)  # no cache: the naive path, one call of `attention`
    assert calls == [9]
    cache = m.new_cache(2, 9)
    steps = torch.cat([m(x[:, :3], cache)] + [m(x[:, i : i + 1], cache) for i in range(3, 9)], 1)
    assert calls == [9]  # every cached call went through the latents
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)
    m(x[:, :2], m.new_cache(2, 2), absorb=False)  # an explicit argument wins
    assert calls == [9, 2]
    with pytest.raises(ValueError, match=r"decode_impl must be one of \['naive', 'absorb'\]"):
        MultiHeadLatentAttention(64, 4, decode_impl="fast")


def test_mla_cache_is_smaller_than_mha_by_the_expected_factor():
    # DeepSeek-V2 shapes: 128 heads of 128 (+64 RoPE) dims against a 512 + 64 latent
    mha = kv_cache_bytes(n_layers=60, seq_len=1, n_kv_heads=128, head_dim=128)
    mla = kv_cache_bytes(n_layers=60, seq_len=1, kv_lora_rank=512, rope_head_dim=64)
    assert mha / mla == pytest.approx(2 * 128 * 128 / 576)
    assert math.isclose(mha / mla, 56.9, rel_tol=1e-2)


def test_mla_rejects_bad_input():
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MultiHeadLatentAttention(32, 2, qk_rope_head_dim=3)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MultiHeadLatentAttention(32, 2, kv_lora_rank=0)
    m = MultiHeadLatentAttention(32, 2, **MLA_CONFIGS[0])
    with pytest.raises(ValueError, match="d_model=32"):
        m(torch.randn(1, 2, 16))


def test_project_qkv_places_tokens_at_their_positions():
    """A suffix projected from ``start`` equals the same rows of the whole sequence, and
    RoPE only rotates: per-head norms are those of the plain projections."""
    layer = MultiHeadAttention(32, 4, 2).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q, k, v = project_qkv(layer, x)
    assert q.shape == (2, 11, 4, 8) and k.shape == v.shape == (2, 11, 2, 8)
    for whole, part in zip((q, k, v), project_qkv(layer, x[:, 5:], start=5), strict=True):
        torch.testing.assert_close(part, whole[:, 5:])
    plain = layer.q_proj(x).reshape(2, 11, 4, 8)
    torch.testing.assert_close(q.norm(dim=-1), plain.norm(dim=-1))
    torch.testing.assert_close(v, layer.v_proj(x).reshape(2, 11, 2, 8))
    assert not torch.allclose(q[:, 1:], plain[:, 1:])  # rotated from position 1 on


def test_project_qkv_rejects_bad_input():
    layer = MultiHeadAttention(32, 4)
    with pytest.raises(TypeError, match="lacks"):
        project_qkv(torch.nn.Linear(32, 32), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="d_model=32"):
        project_qkv(layer, torch.randn(1, 3, 31))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        project_qkv(layer, torch.randn(3, 32))
    with pytest.raises(ValueError, match="start"):
        project_qkv(layer, torch.randn(1, 3, 32), start=-1)


@pytest.mark.parametrize("window", [None, 3])
def test_cache_updates_reject_broadcast_values_other_dtypes_and_devices(window):
    """Regression: ``update`` checked only k, so a v of 1 token (or 1 head) broadcast into
    every slot and a float64 k was cast into a float32 cache without a word."""
    from effarch.attention import WindowKVCache

    def new():
        if window is None:
            return KVCache(1, 8, 2, 4, dtype=torch.float32)
        return WindowKVCache(1, window, 2, 4, dtype=torch.float32)

    k = torch.randn(1, 3, 2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"v must be \[B, T, G, Dv\] = \[1, 3, 2, 4\]"):
        new().update(k, torch.randn(1, 1, 2, 4, dtype=torch.float32))  # one token for three
    with pytest.raises(ValueError, match=r"v must be .* got \(1, 3, 1, 4\)"):
        new().update(k, torch.randn(1, 3, 1, 4, dtype=torch.float32))  # one head for two
    with pytest.raises(TypeError, match=r"k must have the dtype of the cache \(torch.float32\)"):
        new().update(k.double(), k.double())
    with pytest.raises(TypeError, match=r"v must have the dtype of the cache"):
        new().update(k, k.double())
    with pytest.raises(ValueError, match="k must be on the device of the cache"):
        new().update(k.to("meta"), k.to("meta"))
    cache = new()
    keys, values = cache.update(k, 2 * k)
    torch.testing.assert_close(values, 2 * keys)
    assert cache.length == 3


def test_kv_cache_update_takes_a_value_width_of_its_own():
    cache = KVCache(2, 5, 1, 6, head_dim_v=3, dtype=torch.float64)  # MLA's latent cache
    k, v = torch.randn(2, 2, 1, 6), torch.randn(2, 2, 1, 3)
    keys, values = cache.update(k, v)
    torch.testing.assert_close(values, v)
    with pytest.raises(ValueError, match=r"v must be \[B, T, G, Dv\] = \[2, 2, 1, 3\]"):
        cache.update(k, torch.randn(2, 2, 1, 6))


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_mla_equals_transformers_deepseek_with_the_rope_rows_permuted(version):
    """The module docstring's recipe: DeepSeek's weights, mapped by name, with the RoPE rows
    of the query projection and of kv_a_proj_with_mqa permuted from interleaved pairs to
    half-split, give our outputs; copied without the permutation they do not."""
    pytest.importorskip("transformers")
    if version == "v2":
        from transformers import DeepseekV2Config as Config
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod

        attention, rotary, q_lora = mod.DeepseekV2Attention, mod.DeepseekV2RotaryEmbedding, None
    else:
        from transformers import DeepseekV3Config as Config
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod

        attention, rotary, q_lora = mod.DeepseekV3Attention, mod.DeepseekV3RotaryEmbedding, 12
    d, h, dc, dn, dr, dv = 32, 4, 16, 8, 8, 8
    cfg = Config(hidden_size=d, num_attention_heads=h, num_key_value_heads=h, kv_lora_rank=dc,
                 q_lora_rank=q_lora, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
                 attention_bias=False)  # fmt: skip
    cfg._attn_implementation = "eager"
    if version == "v3":
        assert cfg.rope_interleave  # the default: interleaved pairs
    torch.manual_seed(0)
    theirs = attention(cfg, 0).double()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, d)
    emb = rotary(cfg)(x, torch.arange(7)[None].expand(2, -1))
    if version == "v2":
        want = theirs(x, None, position_embeddings=emb)[0]
    else:
        want = theirs(x, emb, None)[0]

    ours = MultiHeadLatentAttention(d, h, kv_lora_rank=dc, q_lora_rank=q_lora, qk_nope_head_dim=dn,
                                    qk_rope_head_dim=dr, v_head_dim=dv, causal=False)  # fmt: skip
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])  # interleaved -> half
    sd = theirs.state_dict()
    q_w = sd["q_proj.weight" if q_lora is None else "q_b_proj.weight"]
    q_w = q_w.view(h, dn + dr, -1)
    q_perm = torch.cat([q_w[:, :dn], q_w[:, dn:][:, perm]], dim=1).reshape(h * (dn + dr), -1)
    kv_a = sd["kv_a_proj_with_mqa.weight"]
    kv_perm = torch.cat([kv_a[:dc], kv_a[dc:][perm]])
    with torch.no_grad():
        if q_lora is None:
            ours.q_proj.weight.copy_(q_perm)
        else:
            ours.q_proj[0].weight.copy_(sd["q_a_proj.weight"])
            ours.q_proj[1].weight.copy_(sd["q_a_layernorm.weight"])
            ours.q_proj[2].weight.copy_(q_perm)
        ours.kv_down.weight.copy_(kv_perm)
        ours.kv_norm.weight.copy_(sd["kv_a_layernorm.weight"])
        ours.kv_up.weight.copy_(sd["kv_b_proj.weight"])
        ours.o_proj.weight.copy_(sd["o_proj.weight"])
    # their RoPE angles are float32, their RMSNorm eps 1e-6: equal up to that rounding
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the same weights without the permutation: another function
        (ours.q_proj if q_lora is None else ours.q_proj[2]).weight.copy_(
            q_w.reshape(-1, q_w.shape[-1])
        )
        ours.kv_down.weight.copy_(kv_a)
    assert (ours(x) - want).abs().max() > 1e-2
