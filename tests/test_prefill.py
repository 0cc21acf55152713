"""Chapter 3.3: sparse prefill (MInference's vertical-slash, XAttention's antidiagonal
scoring) against loops over their definitions, SDPA and the full model."""

import math

import pytest
import torch
import torch.nn.functional as F

from effarch.models.bytelm import ByteLM, ByteLMConfig
from effarch.sparse import (
    Static,
    VerticalSlash,
    XAttention,
    antidiagonal_scores,
    masked_attention,
    prefill_nll,
    sliding_window,
    sparse_prefill,
    vertical_slash_tables,
    xattention_tiles,
)


def qkv(t=32, h=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, t, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, t, g, d, generator=gen, dtype=torch.float64)
    return q, k, v


def causal_sdpa(q, k, v):
    r = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(r, 2).transpose(1, 2) for x in (k, v))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
    return o.transpose(1, 2)


def test_vertical_slash_tables_follow_their_definition_in_loops():
    t, m, nv, ns, n_init, n_local = 40, 8, 7, 6, 2, 3
    q, k, _ = qkv(t)
    vertical, slash = vertical_slash_tables(q, k, n_vertical=nv, n_slash=ns, last_q=m,
                                            n_init=n_init, n_local=n_local)  # fmt: skip
    for h in range(4):
        kh = k[0, :, h // 2]
        vs, ss = [0.0] * t, [0.0] * t
        for i in range(t - m, t):
            s = [float(q[0, i, h] @ kh[j]) / math.sqrt(8) for j in range(i + 1)]
            top = max(s)
            z = sum(math.exp(x - top) for x in s)
            for j in range(i + 1):
                p = math.exp(s[j] - top) / z
                vs[j] += p
                ss[i - j] += p
        want_v = set(range(n_init)) | set(
            sorted(range(n_init, t), key=lambda j: -vs[j])[: nv - n_init]
        )
        want_s = set(range(n_local)) | set(
            sorted(range(n_local, t), key=lambda o: -ss[o])[: ns - n_local]
        )
        assert set(vertical[0, h].nonzero().flatten().tolist()) == want_v
        assert set(slash[0, h].nonzero().flatten().tolist()) == want_s


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    t, d = 64, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, t, 1, d, generator=gen, dtype=torch.float64) * 0.1
    k = torch.randn(1, t, 1, d, generator=gen, dtype=torch.float64) * 0.1
    q[..., 0] += 4.0
    k[0, 21, 0, 0] = 6.0  # every query likes key 21: a vertical line
    q[0, :, 0, 1:9] += 3 * torch.eye(8, dtype=torch.float64).repeat(8, 1)  # period 8 ...
    k[0, :, 0, 1:9] += 3 * torch.eye(8, dtype=torch.float64).repeat(8, 1)  # ... offsets 8, 16
    vertical, slash = vertical_slash_tables(q, k, n_vertical=1, n_slash=2, last_q=16,
                                            n_init=0, n_local=0)  # fmt: skip
    assert vertical[0, 0].nonzero().flatten().tolist() == [21]
    assert set(slash[0, 0].nonzero().flatten().tolist()) <= {0, 8, 16, 24, 32, 40}


def test_antidiagonal_scores_follow_their_definition_in_loops():
    t, block, stride = 32, 8, 4
    q, k, _ = qkv(t)
    got = antidiagonal_scores(q, k, block=block, stride=stride)
    n, r = t // stride, block // stride
    for h in range(4):
        kh = k[0, :, h // 2]
        e = torch.full((n, n), float("-inf"), dtype=torch.float64)
        for a in range(n):
            for c in range(a + 1):
                e[a, c] = sum(
                    q[0, stride * a + stride - 1 - s, h] @ kh[stride * c + s] for s in range(stride)
                ) / (stride * math.sqrt(8))
        shares = e.softmax(-1)
        tiles = torch.zeros(t // block, t // block, dtype=torch.float64)
        for a in range(n):
            for c in range(n):
                tiles[a // r, c // r] += shares[a, c]
        tiles /= tiles.sum(-1, keepdim=True)
        torch.testing.assert_close(got[0, h], tiles)


def test_xattention_keeps_the_fewest_tiles_that_reach_the_threshold():
    q, k, _ = qkv(64)
    est = antidiagonal_scores(q, k, block=8, stride=4)
    for threshold in (0.3, 0.6, 0.9):
        keep = xattention_tiles(q, k, threshold=threshold, block=8, stride=4)
        assert not keep.triu(1).any() and keep.diagonal(dim1=-2, dim2=-1).all()
        for h in range(4):
            for i in range(8):
                row = est[0, h, i].tolist()
                order = sorted(range(i + 1), key=lambda j, row=row: -row[j])
                total, want = 0.0, {i}
                for j in order:  # largest first, until the threshold is reached
                    if total >= threshold:
                        break
                    want.add(j)
                    total += row[j]
                assert set(keep[0, h, i].nonzero().flatten().tolist()) == want
                assert sum(row[j] for j in want) >= threshold - 1e-12
    assert xattention_tiles(q, k, threshold=1.0, block=8, stride=4).sum() == 4 * 36


@pytest.mark.parametrize(
    "pattern",
    [XAttention(1.0, block=8, stride=4), VerticalSlash(48, 48, last_q=8)],
    ids=repr,
)
def test_a_pattern_that_keeps_everything_is_causal_attention(pattern):
    q, k, v = qkv(48)
    o, density = sparse_prefill(q, k, v, pattern, block=16)
    torch.testing.assert_close(o, causal_sdpa(q, k, v))
    torch.testing.assert_close(density, torch.ones(1, 4))


@pytest.mark.parametrize(
    "pattern",
    [XAttention(0.5, block=8, stride=4), VerticalSlash(6, 5, last_q=8, n_init=2, n_local=2)],
    ids=repr,
)
def test_sparse_prefill_equals_masked_attention_with_the_estimated_mask(pattern):
    q, k, v = qkv(48, seed=1)
    o, density = sparse_prefill(q, k, v, pattern, block=16)
    torch.testing.assert_close(o, masked_attention(q, k, v, pattern(q, k)))
    assert (density < 0.9).all() and (density > 0).all()


TINY = ByteLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
IDS = torch.randint(0, 257, (64,), generator=torch.Generator().manual_seed(1))


def test_prefill_nll_with_dense_and_windowed_patterns_equals_the_model():
    torch.manual_seed(0)
    model = ByteLM(TINY).double().eval()
    with torch.no_grad():
        full = F.cross_entropy(model(IDS[None, :-1])[0], IDS[1:], reduction="none")
    nll, density = prefill_nll(model, IDS, XAttention(1.0, block=16, stride=4), block=16)
    torch.testing.assert_close(nll[:-1], full[:-1])  # (the last byte has no prediction here)
    torch.testing.assert_close(density, torch.ones(2))
    nll_w, density_w = prefill_nll(model, IDS, Static(sliding_window(8)), block=16)
    for layer in model.layers:  # the reference: the model's own forward with the window mask
        layer.self_attn.attention = lambda q, k, v, causal, scale: masked_attention(
            q, k, v, sliding_window(8), scale=scale
        )
    with torch.no_grad():
        windowed = F.cross_entropy(model(IDS[None, :-1])[0], IDS[1:], reduction="none")
    torch.testing.assert_close(nll_w[:-1], windowed[:-1])
    want = (64 * 8 - 28) / (64 * 65 / 2)
    torch.testing.assert_close(density_w, torch.full((2,), want))


def test_bad_prefill_input_is_named():
    q, k, v = qkv(32)
    with pytest.raises(ValueError, match="same length"):
        vertical_slash_tables(q, k[:, :16], n_vertical=4, n_slash=4)
    with pytest.raises(ValueError, match="threshold"):
        xattention_tiles(q, k, threshold=1.5, block=8, stride=4)
    with pytest.raises(ValueError, match="multiple of stride"):
        antidiagonal_scores(q, k, block=8, stride=3)
    with pytest.raises(ValueError, match="n_init"):
        vertical_slash_tables(q, k, n_vertical=2, n_slash=4, n_init=3)
    with pytest.raises(TypeError, match="PrefillPattern"):
        sparse_prefill(q, k, v, "window")


def test_token_ids_are_checked_by_name():
    torch.manual_seed(0)
    model = ByteLM(TINY).double().eval()
    for bad in (IDS[:1], IDS.float(), IDS.view(2, 32)):
        with pytest.raises(ValueError, match="ids must be"):
            prefill_nll(model, bad, Static(sliding_window(4)))
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        prefill_nll(model, [1, 2, 3], Static(sliding_window(4)))
