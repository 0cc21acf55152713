"""naive_attention and sdpa_attention against independent references."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from effarch.attention import attention_mask, kv_cache_bytes, naive_attention, sdpa_attention


def brute_force_attention(q, k, v, *, causal=False, window=None, scale=None, mask=None):
    """A loop over batch, head and query, in float64: shares no code with naive_attention.
    ``mask``: bool, broadcastable to [B, Hq, Tq, Tk], False drops the pair."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if mask is not None:
        mask = mask.expand(b, hq, tq, tk)
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi, h, i in itertools.product(range(b), range(hq), range(tq)):
        kv_h = h // (hq // hkv)
        pos = i + tk - tq  # bottom-right alignment
        keys = []
        for j in range(tk):
            if causal and j > pos:
                continue
            if mask is not None and not mask[bi, h, i, j]:
                continue
            if window is not None:
                left, right = window
                if (left >= 0 and j < pos - left) or (right >= 0 and j > pos + right):
                    continue
            keys.append(j)
        if not keys:
            continue  # a query that sees no key outputs zeros
        s = torch.stack([q[bi, i, h].double() @ k[bi, j, kv_h].double() * scale for j in keys])
        p = torch.softmax(s, 0)
        out[bi, i, h] = sum(p[n] * v[bi, j, kv_h].double() for n, j in enumerate(keys))
    return out


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


CASES = [
    # (Tq, Tk, Hq, Hkv, D, causal, window)
    (1, 1, 2, 2, 8, False, None),
    (17, 17, 4, 4, 16, True, None),
    (17, 17, 4, 2, 16, False, None),
    (5, 23, 4, 1, 8, True, None),  # decoding against a cache: bottom-right causal
    (23, 5, 2, 2, 8, True, None),  # more queries than keys: early rows see nothing
    (30, 30, 4, 2, 12, False, (3, 2)),
    (30, 30, 2, 1, 8, True, (4, -1)),
    (10, 14, 2, 2, 8, False, (-1, 0)),
    (1, 23, 8, 2, 16, True, None),  # a decoding step with GQA: query heads packed as rows
    (1, 9, 6, 3, 8, False, None),
]


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal", "window"), CASES)
def test_naive_matches_brute_force(tq, tk, hq, hkv, d, causal, window):
    q, k, v = rand(2, tq, hq, d), rand(2, tk, hkv, d), rand(2, tk, hkv, d + 3)
    ours = naive_attention(q, k, v, causal=causal, window=window)
    ref = brute_force_attention(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [1, 17, 64, 100, 257])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_naive_matches_torch_sdpa(t, causal, groups):
    hkv = 2
    q, k, v = rand(1, t, hkv * groups, 24), rand(1, t, hkv, 24), rand(1, t, hkv, 24)
    ours = naive_attention(q, k, v, causal=causal, scale=0.3)
    kk = k.repeat_interleave(groups, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(groups, dim=2).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=causal, scale=0.3)
    torch.testing.assert_close(ours, ref.transpose(1, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal", "window"), CASES)
@pytest.mark.parametrize("dv_extra", [0, 3, -4])
def test_sdpa_wrapper_matches_the_loop(tq, tk, hq, hkv, d, causal, window, dv_extra):
    """Windows (flash-attn's window_size) and values narrower or wider than the keys (MLA:
    padded to one head dim for the fused kernel) against the float64 loop."""
    dv = d + dv_extra
    q, k, v = rand(2, tq, hq, d), rand(2, tk, hkv, d), rand(2, tk, hkv, dv)
    got = sdpa_attention(q, k, v, causal=causal, window=window)
    assert got.shape == (2, tq, hq, dv)
    want = brute_force_attention(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, naive_attention(q, k, v, causal=causal, window=window))


@pytest.mark.parametrize(("tq", "causal"), [(1, True), (1, False), (6, False)])
def test_gqa_query_heads_sharing_keys_are_packed_as_rows(monkeypatch, tq, causal):
    """Where every query sees every key, the query heads of a group are rows of one SDPA
    call over their shared key/value head (no enable_gqa, no copies of the keys); outputs
    and gradients equal the float64 loop's and naive_attention's."""
    b, tk, hq, hkv, d = 2, 11, 8, 2, 16
    q, k, v = (rand(b, t, h, d).requires_grad_() for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):
        calls.append((tuple(qq.shape), tuple(kk.shape), kw.get("enable_gqa", False)))
        return sdpa(qq, kk, vv, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = sdpa_attention(q, k, v, causal=causal)
    assert calls == [((b, hkv, (hq // hkv) * tq, d), (b, hkv, tk, d), False)]
    torch.testing.assert_close(got, brute_force_attention(q, k, v, causal=causal),
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    monkeypatch.undo()
    want = torch.autograd.grad(naive_attention(q, k, v, causal=causal).sum(), (q, k, v))
    for g_got, g_want in zip(grads, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("tq", "tk", "hq", "hkv", "mask_shape"),
    [(9, 9, 2, 2, (9, 9)), (7, 12, 4, 2, (2, 1, 7, 12)), (12, 7, 4, 1, (1, 4, 12, 7))],
)
def test_sdpa_with_a_boolean_mask_matches_the_loop(tq, tk, hq, hkv, mask_shape, causal):
    torch.manual_seed(tq + tk)
    q, k, v = rand(2, tq, hq, 8), rand(2, tk, hkv, 8), rand(2, tk, hkv, 8)
    mask = torch.rand(mask_shape) < 0.6
    mask[..., 1, :] = False  # a row that sees no key: 0, not NaN
    got = sdpa_attention(q, k, v, mask=mask, causal=causal)
    want = brute_force_attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got[:, 1] == 0).all()
    broadcast = mask.expand(2, hq, tq, tk)  # stride 0 where it was 1: the same attention
    torch.testing.assert_close(sdpa_attention(q, k, v, mask=broadcast, causal=causal), got)
    # gradients stay finite through the empty row and match masked autograd in float64
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    g = torch.randn_like(got)
    grads = torch.autograd.grad(sdpa_attention(*qkv, mask=mask, causal=causal), qkv, g)
    assert all(torch.isfinite(x).all() for x in grads)
    qkv2 = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(naive_masked(*qkv2, mask=mask, causal=causal), qkv2, g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def naive_masked(q, k, v, *, mask, causal):
    """Dense float64 attention with -inf where dropped, empty rows 0 (differentiable)."""
    tq, tk, hq, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk, vv = (x.repeat_interleave(hq // hkv, dim=2) for x in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5
    keep = mask & (attention_mask(tq, tk, causal=True) if causal else True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


def test_sdpa_mask_bad_input_is_named():
    q = rand(1, 4, 2, 8)
    with pytest.raises(TypeError, match="mask must be a bool tensor, got dtype torch.float64"):
        sdpa_attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.float64))
    for shape in ((4, 5), (4,), (), (1, 1, 1, 4, 4)):
        words = rf"broadcast to \[B, Hq, Tq, Tk\] = \[1, 2, 4, 4\], got {tuple(shape)}"
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            sdpa_attention(q, q, q, mask=torch.ones(shape, dtype=torch.bool))


def test_sdpa_one_query_after_a_cache_with_causal_and_a_mask():
    q, k, v = rand(2, 1, 4, 8), rand(2, 9, 2, 8), rand(2, 9, 2, 8)
    mask = torch.tensor([[True, False, True, True, False, True, False, True, True]])
    got = sdpa_attention(q, k, v, mask=mask, causal=True)  # the one query sees every key
    want = brute_force_attention(q, k, v, mask=mask, causal=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, sdpa_attention(q, k[:, mask[0]], v[:, mask[0]]))


def test_half_precision_is_computed_in_float32():
    q, k, v = (rand(1, 33, 2, 16, dtype=torch.float32) for _ in range(3))
    low = naive_attention(q.half(), k.half(), v.half(), causal=True)
    assert low.dtype == torch.float16
    ref = naive_attention(q, k, v, causal=True)
    assert (low.float() - ref).abs().max() < 5e-3


def test_attention_mask_alignment():
    m = attention_mask(2, 4, causal=True)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    m = attention_mask(4, 2, causal=True)
    assert m.tolist() == [[False, False], [False, False], [True, False], [True, True]]


@pytest.mark.parametrize(
    ("args", "err", "words"),
    [
        ((rand(2, 4, 2), rand(2, 4, 2, 8), rand(2, 4, 2, 8)), ValueError, "q must have 4 dim"),
        (([1.0], rand(2, 4, 2, 8), rand(2, 4, 2, 8)), TypeError, "q must be a torch.Tensor"),
        ((rand(2, 4, 2, 8), rand(3, 4, 2, 8), rand(3, 4, 2, 8)), ValueError, "batch size"),
        ((rand(2, 4, 2, 8), rand(2, 4, 2, 4), rand(2, 4, 2, 8)), ValueError, "head_dim of q"),
        ((rand(2, 4, 3, 8), rand(2, 4, 2, 8), rand(2, 4, 2, 8)), ValueError, "multiple"),
        ((rand(2, 4, 2, 8), rand(2, 5, 2, 8), rand(2, 4, 2, 8)), ValueError, "v must match k"),
        (
            (rand(2, 4, 2, 8), rand(2, 4, 2, 8, dtype=torch.float32), rand(2, 4, 2, 8)),
            TypeError,
            "k must have the dtype of q",
        ),
        (
            (torch.ones(2, 4, 2, 8, dtype=torch.long),) * 3,
            TypeError,
            "q must be a floating-point tensor",
        ),
    ],
)
def test_bad_input_is_named(args, err, words):
    with pytest.raises(err, match=words):
        naive_attention(*args)
    with pytest.raises(err, match=words):
        sdpa_attention(*args)


def test_bad_window_is_named():
    q = rand(1, 4, 1, 8)
    for attend in (naive_attention, sdpa_attention):
        with pytest.raises(ValueError, match="window must be a pair"):
            attend(q, q, q, window=(2,))
        with pytest.raises(ValueError, match="window must be a pair"):
            attend(q, q, q, window=(-2, 0))


def test_kv_cache_bytes_known_configs():
    # LLaMA-2-7B: 32 layers x 32 heads x 128 dims x (K and V) x 2 bytes = 0.5 MiB per token
    per_token = kv_cache_bytes(n_layers=32, seq_len=1, n_kv_heads=32, head_dim=128)
    assert per_token == 2**19
    assert kv_cache_bytes(n_layers=32, seq_len=131072, n_kv_heads=32, head_dim=128) == 64 * 2**30
    # GQA with 8 heads is 4x smaller, MQA 32x; batch and precision scale linearly
    assert kv_cache_bytes(n_layers=32, seq_len=1, n_kv_heads=8, head_dim=128) == per_token // 4
    assert kv_cache_bytes(n_layers=32, seq_len=1, n_kv_heads=1, head_dim=128) == per_token // 32
    assert (
        kv_cache_bytes(
            n_layers=32, seq_len=1, batch=3, n_kv_heads=32, head_dim=128, bytes_per_element=4
        )
        == 6 * per_token
    )
    # DeepSeek-V2 MLA: 512 latent + 64 RoPE dims per token per layer, 60 layers
    assert kv_cache_bytes(n_layers=60, seq_len=1, kv_lora_rank=512, rope_head_dim=64) == (
        60 * 576 * 2
    )


def test_kv_cache_bytes_rejects_bad_input():
    with pytest.raises(ValueError, match="n_kv_heads and head_dim are required"):
        kv_cache_bytes(n_layers=1, seq_len=1)
    with pytest.raises(ValueError, match="not both"):
        kv_cache_bytes(n_layers=1, seq_len=1, kv_lora_rank=4, n_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="n_layers"):
        kv_cache_bytes(n_layers=0, seq_len=1, n_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="bytes_per_element"):
        kv_cache_bytes(n_layers=1, seq_len=1, n_kv_heads=1, head_dim=4, bytes_per_element=0)


def test_mixed_devices_are_named():
    q = rand(1, 4, 2, 8)
    k = torch.empty(1, 4, 2, 8, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="k must be on the device of q"):
        naive_attention(q, k, q)
    with pytest.raises(ValueError, match="v must be on the device of q"):
        sdpa_attention(q, q, k)


def test_attention_mask_rejects_the_windows_naive_attention_rejects():
    """Regression: attention_mask(window=(-5, 0)) was read as (-1, 0), an unbounded left side,
    while naive_attention rejected it; both now check the window alike."""
    for window in [(-5, 0), (0, -2), (2,), (1.5, 0), 3]:
        with pytest.raises(ValueError, match="window must be a pair"):
            attention_mask(4, 4, window=window)
    assert (
        attention_mask(3, 3, window=(-1, 0)).tolist() == attention_mask(3, 3, causal=True).tolist()
    )


def test_kv_cache_bytes_rejects_rope_head_dim_without_mla():
    """Regression: rope_head_dim was silently ignored with n_kv_heads and head_dim."""
    with pytest.raises(ValueError, match="rope_head_dim is for MLA.*got 64"):
        kv_cache_bytes(n_layers=1, seq_len=1, n_kv_heads=2, head_dim=8, rope_head_dim=64)
    assert kv_cache_bytes(n_layers=1, seq_len=1, n_kv_heads=2, head_dim=8, rope_head_dim=0) == 64
