"""Chapter 3.1 and 3.4: patterns, masked attention, block layouts, block-sparse attention."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from effarch.attention import attention_mask
from effarch.sparse import (
    EMPTY,
    FULL,
    PARTIAL,
    and_masks,
    axial,
    bigbird,
    block_layout,
    block_local,
    block_sparse_attention,
    causal,
    dense_mask,
    dilated,
    fixed,
    global_tokens,
    mask_band,
    masked_attention,
    or_masks,
    random_blocks,
    receptive_field,
    sliding_window,
    strided,
)

# Each pattern beside its rule written as a plain Python predicate on integers (the loop
# reference): dense_mask must equal the predicate at every (i, j).
RULES = {
    "causal": (causal(), lambda i, j: j <= i),
    "causal offset 3": (causal(3), lambda i, j: j <= i + 3),
    "window 5": (sliding_window(5), lambda i, j: i - 5 < j <= i),
    "window 1": (sliding_window(1), lambda i, j: i == j),
    "window 4 offset 2": (sliding_window(4, 2), lambda i, j: i + 2 - 4 < j <= i + 2),
    "dilated 3x2": (dilated(3, 2), lambda i, j: j in (i, i - 2, i - 4)),
    "strided 4": (strided(4), lambda i, j: j <= i and (i - j) % 4 == 0),
    "fixed 4 c1": (fixed(4, 1), lambda i, j: j <= i and (i // 4 == j // 4 or j % 4 == 3)),
    "block local 6": (block_local(6), lambda i, j: i // 6 == j // 6),
    "global 2": (global_tokens(2), lambda i, j: i < 2 or j < 2),
    "axial 5": (axial(5), lambda i, j: j <= i and (i // 5 == j // 5 or i % 5 == j % 5)),
}


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize(("tq", "tk"), [(23, 23), (9, 30), (30, 9)])
def test_patterns_equal_their_rules(name, tq, tk):
    mod, rule = RULES[name]
    want = torch.tensor([[rule(i, j) for j in range(tk)] for i in range(tq)])
    got = dense_mask(mod, tq, tk, batch=2, heads=3)
    assert got.shape == (2, 3, tq, tk) and got.dtype == torch.bool
    assert torch.equal(got, want.expand(2, 3, tq, tk))


def test_sliding_window_is_chapter_4s_window():
    for w, t in [(1, 12), (4, 12), (12, 12), (20, 12)]:
        ours = dense_mask(sliding_window(w), t, t)[0, 0]
        assert torch.equal(ours, attention_mask(t, t, causal=True, window=(w - 1, 0)))


def test_and_or_are_elementwise():
    a, b, c = sliding_window(4), strided(3), global_tokens(1)
    da, db, dc = (dense_mask(m, 17, 17) for m in (a, b, c))
    assert torch.equal(dense_mask(and_masks(a, b), 17, 17), da & db)
    assert torch.equal(dense_mask(or_masks(a, b, c), 17, 17), da | db | dc)


def test_random_blocks_are_causal_seeded_and_at_most_r_per_query_block():
    t, block, r = 160, 16, 2
    m = dense_mask(random_blocks(block, r, seed=1), t, t)[0, 0]
    assert not m.triu(1).any()
    tiles = m.view(t // block, block, t // block, block).any(3).any(1)  # [q block, k block]
    assert (tiles.sum(1) >= 1).all() and (tiles.sum(1) <= r).all()
    for i in range(t // block):  # a chosen block is visible from the whole query block
        for j in tiles[i].nonzero().flatten().tolist():
            want = torch.tensor([[qi >= kj for kj in range(j * block, (j + 1) * block)]
                                 for qi in range(i * block, (i + 1) * block)])  # fmt: skip
            assert torch.equal(m[i * block : (i + 1) * block, j * block : (j + 1) * block], want)
    assert torch.equal(m, dense_mask(random_blocks(block, r, seed=1), t, t)[0, 0])
    assert not torch.equal(m, dense_mask(random_blocks(block, r, seed=2), t, t)[0, 0])


def test_bigbird_is_the_union_of_its_parts_within_causal():
    t = 96
    parts = or_masks(sliding_window(8), global_tokens(2), random_blocks(16, 1, seed=0))
    want = dense_mask(parts, t, t) & dense_mask(causal(), t, t)
    assert torch.equal(dense_mask(bigbird(8, 2, 1, 16), t, t), want)


def test_receptive_field_of_a_window_and_of_a_strided_pair_by_flooding():
    t, w = 60, 5
    counts = receptive_field(sliding_window(w), t, 4)
    for layer in range(1, 5):
        want = torch.tensor([min(i + 1, layer * (w - 1) + 1) for i in range(t)])
        assert torch.equal(counts[layer - 1], want)
    # window of 8 or stride 8 (the Sparse Transformer's pair of heads): everything in 2 layers
    counts = receptive_field(or_masks(sliding_window(8), strided(8)), t, 2)
    assert torch.equal(counts[1], torch.arange(1, t + 1))
    assert (counts[0] < torch.arange(1, t + 1)).any()
    # an independent flood fill from each source for a random-looking pattern
    mod = bigbird(4, 1, 1, 8, seed=3)
    m = dense_mask(mod, 40, 40)[0, 0] | torch.eye(40, dtype=torch.bool)
    heard = [{i} for i in range(40)]
    for layer in range(3):
        heard = [set().union(*(heard[j] for j in range(40) if m[i, j])) for i in range(40)]
        assert receptive_field(mod, 40, 3)[layer].tolist() == [len(h) for h in heard]


def test_mask_bad_input():
    with pytest.raises(ValueError, match="w must be"):
        sliding_window(0)
    with pytest.raises(TypeError, match="offset must be an int"):
        causal(1.5)
    with pytest.raises(ValueError, match="c must be at most stride=4"):
        fixed(4, 5)
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        dense_mask("causal", 4, 4)
    with pytest.raises(TypeError, match="mask_mod must return a bool tensor"):
        dense_mask(lambda b, h, q, kv: q - kv, 4, 4)
    with pytest.raises(ValueError, match="at least one mask_mod"):
        and_masks()
    with pytest.raises(TypeError, match="mask_mod 1 must be callable"):
        or_masks(causal(), 3)


# ------------------------------------------------------------------------------------------
# masked attention against SDPA
# ------------------------------------------------------------------------------------------


def qkv(b, tq, tk, hq, hkv, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, tk, hkv, d, generator=gen, dtype=dtype)
    v = torch.randn(b, tk, hkv, d + 3, generator=gen, dtype=dtype)
    return q, k, v


def sdpa_reference(q, k, v, mask):
    """SDPA (float64) with the boolean mask, GQA by repeating heads; rows without keys -> 0."""
    r = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(r, 2),
                                             v.repeat_interleave(r, 2)))  # fmt: skip
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return torch.where(mask.any(-1, keepdim=True), o, 0.0).transpose(1, 2)


PATTERNS = [
    causal(),
    sliding_window(7),
    dilated(4, 3),
    strided(5),
    fixed(8, 2),
    and_masks(causal(), or_masks(sliding_window(6), global_tokens(3))),
    bigbird(9, 2, 2, 16, seed=4),
    axial(7),
    block_local(10),
    lambda b, h, q, kv: (q >= kv) & ((q - kv) < 4 + 6 * h) & ((b + q) % 5 != 0),  # per b and h
]


@pytest.mark.parametrize("i", range(len(PATTERNS)))
@pytest.mark.parametrize(
    ("tq", "tk", "hq", "hkv"), [(45, 45, 4, 2), (20, 50, 2, 1), (50, 20, 2, 2)]
)
def test_masked_attention_equals_sdpa_with_the_dense_mask(i, tq, tk, hq, hkv):
    q, k, v = qkv(2, tq, tk, hq, hkv, 8)
    mask = dense_mask(PATTERNS[i], tq, tk, batch=2, heads=hq)
    o = masked_attention(q, k, v, PATTERNS[i])
    torch.testing.assert_close(o, sdpa_reference(q, k, v, mask), rtol=1e-12, atol=1e-12)


def test_a_row_without_keys_is_zero_and_half_precision_is_computed_in_float32():
    q, k, v = qkv(1, 10, 10, 2, 2, 8)
    none_for_row_3 = lambda b, h, q_, kv: (q_ >= kv) & (q_ != 3)  # noqa: E731
    o = masked_attention(q, k, v, none_for_row_3)
    assert (o[:, 3] == 0).all() and (o[:, 4] != 0).all()
    half = masked_attention(q.half(), k.half(), v.half(), causal())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), masked_attention(q, k, v, causal()), atol=3e-3,
                               rtol=3e-3)  # fmt: skip


# ------------------------------------------------------------------------------------------
# block layouts against FlexAttention's create_block_mask
# ------------------------------------------------------------------------------------------


def test_layout_kinds_by_brute_force():
    mod, tq, tk, bq, bk = sliding_window(20), 100, 90, 32, 16
    layout = block_layout(mod, tq, tk, block_q=bq, block_k=bk)
    m = dense_mask(mod, tq, tk)[0, 0]
    for i, j in itertools.product(range(4), range(6)):
        tile = torch.zeros(bq, bk, dtype=torch.bool)  # padding past the ends: masked
        sub = m[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        tile[: sub.shape[0], : sub.shape[1]] = sub
        want = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
        assert layout.kind[0, 0, i, j] == want, (i, j)
    area = m.sum().item()  # density counts whole non-empty tiles, so it is at least the mask's
    assert layout.density >= area / (tq * tk)


BANDS = {  # each declared band beside its (lo, hi) written out by hand
    "causal": (causal(), (0, None)),
    "causal offset 5": (causal(5), (-5, None)),
    "causal offset -7": (causal(-7), (7, None)),
    "window 1": (sliding_window(1), (0, 1)),
    "window 20": (sliding_window(20), (0, 20)),
    "window 33 offset 40": (sliding_window(33, 40), (-40, -7)),
    "window 9 offset -12": (sliding_window(9, -12), (12, 21)),
    "causal and window 16": (and_masks(causal(), sliding_window(16)), (0, 16)),
    "two windows, disjoint": (and_masks(sliding_window(4), sliding_window(4, 10)), (0, -6)),
}


@pytest.mark.parametrize("name", list(BANDS))
def test_patterns_declare_their_band_and_the_band_is_the_mask(name):
    mod, want = BANDS[name]
    assert mask_band(mod) == want
    lo, hi = want
    i, j = torch.arange(50)[:, None], torch.arange(60)[None, :]
    rule = (i - j >= lo) & ((i - j < hi) if hi is not None else True)
    assert torch.equal(dense_mask(mod, 50, 60)[0, 0], rule)


def test_only_intersections_of_bands_are_bands():
    others = [
        or_masks(causal(), sliding_window(3)),
        and_masks(causal(), global_tokens(2)),
        dilated(4, 2),
        strided(3),
        bigbird(8, 1, 1, 4),
        lambda b, h, q, kv: q >= kv,
    ]
    for mod in others:
        assert mask_band(mod) is None

    class Window:  # a callable whose own attribute "band" means something else
        band = (20, 24)

        def __call__(self, b, h, q, kv):
            return (q >= kv) & (q - kv < 4)

    assert mask_band(Window()) is None
    q, k, v = qkv(1, 64, 64, 2, 2, 8)
    got = block_sparse_attention(q, k, v, Window(), block_q=16, block_k=16)
    torch.testing.assert_close(got, masked_attention(q, k, v, sliding_window(4)))
    for wrong in ((0, 1.5), (True, None), 5):
        bad = causal()
        bad._effarch_band = wrong
        with pytest.raises(TypeError, match=r"mask_mod._effarch_band must be a tuple .* got"):
            block_layout(bad, 64, 64)


@pytest.mark.parametrize("name", list(BANDS))
@pytest.mark.parametrize(
    ("tq", "tk", "bq", "bk"),
    [(256, 256, 32, 32), (100, 90, 32, 16), (37, 130, 16, 64), (130, 40, 64, 8)],
)
def test_band_layout_from_corners_equals_the_element_wise_layout(name, tq, tk, bq, bk):
    mod = BANDS[name][0]
    plain = lambda b, h, q, kv: mod(b, h, q, kv)  # noqa: E731  same mask, no band declared
    corners = block_layout(mod, tq, tk, block_q=bq, block_k=bk, batch=2, heads=3)
    everywhere = block_layout(plain, tq, tk, block_q=bq, block_k=bk, batch=2, heads=3)
    assert corners.kind.shape == everywhere.kind.shape == (2, 3, -(-tq // bq), -(-tk // bk))
    assert torch.equal(corners.kind, everywhere.kind)


def test_band_layout_never_evaluates_the_mask():
    calls = []

    def window(b, h, q, kv):
        calls.append(1)
        return (q >= kv) & (q - kv < 64)

    window._effarch_band = (0, 64)
    layout = block_layout(window, 1 << 17, 1 << 17, block_q=64, block_k=64)
    assert not calls  # 2^34 pairs: element-wise, 16 GiB of booleans
    assert layout.kind.shape == (1, 1, 2048, 2048)
    assert int((layout.kind != EMPTY).sum()) == 2 * 2048 - 1  # diagonal tile, the one before


@pytest.mark.parametrize("i", range(len(PATTERNS)))
@pytest.mark.parametrize(("tq", "tk", "bs"), [(256, 256, 32), (200, 300, 64), (130, 70, (32, 16))])
def test_layout_equals_flex_attentions_block_mask(i, tq, tk, bs):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    bq, bk = bs if isinstance(bs, tuple) else (bs, bs)
    ours = block_layout(PATTERNS[i], tq, tk, block_q=bq, block_k=bk, batch=2, heads=2)
    theirs = flex.create_block_mask(PATTERNS[i], 2, 2, tq, tk, device="cpu", BLOCK_SIZE=(bq, bk))
    for n, idx, their_n, their_idx in [
        (ours.kv_num_blocks, ours.kv_indices, theirs.kv_num_blocks, theirs.kv_indices),
        (ours.full_kv_num_blocks, ours.full_kv_indices, theirs.full_kv_num_blocks,
         theirs.full_kv_indices),
    ]:  # fmt: skip
        assert torch.equal(n, their_n)
        assert idx.shape == their_idx.shape
        for pos in itertools.product(*(range(s) for s in n.shape)):
            c = int(n[pos])
            # the first c entries: the same indices, ascending in both
            assert idx[pos][:c].tolist() == their_idx[pos][:c].tolist()
            assert idx[pos][:c].tolist() == sorted(idx[pos][:c].tolist())
            # the unused slots differ: ours hold 0 (FlexAttention's the remaining indices)
            assert not idx[pos][c:].any()


# ------------------------------------------------------------------------------------------
# block-sparse attention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(PATTERNS)))
@pytest.mark.parametrize(("tq", "tk", "bq", "bk"), [(100, 100, 32, 16), (40, 130, 16, 32),
                                                     (130, 40, 64, 64)])  # fmt: skip
def test_block_sparse_equals_masked_attention(i, tq, tk, bq, bk):
    q, k, v = qkv(2, tq, tk, 4, 2, 8)
    want = masked_attention(q, k, v, PATTERNS[i])
    got = block_sparse_attention(q, k, v, PATTERNS[i], block_q=bq, block_k=bk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_block_sparse_gradients_equal_masked_attentions():
    q, k, v = (x.requires_grad_() for x in qkv(2, 70, 70, 4, 2, 8))
    mod = PATTERNS[5]  # window + global tokens
    grad = torch.randn(2, 70, 4, 11, dtype=torch.float64)
    got = torch.autograd.grad(block_sparse_attention(q, k, v, mod, block_q=32, block_k=16),
                              (q, k, v), grad)  # fmt: skip
    want = torch.autograd.grad(masked_attention(q, k, v, mod), (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_sparse_touches_only_non_empty_tiles_and_masks_only_partial_ones():
    t, w, bs = 1024, 64, 64
    evaluated = []

    def counting_window(b, h, q, kv):
        out = (q >= kv) & (q - kv < w)
        evaluated.append(torch.broadcast_shapes(q.shape, kv.shape).numel())
        return out

    layout = block_layout(counting_window, t, t, block_q=bs, block_k=bs)
    evaluated.clear()
    q, k, v = qkv(1, t, t, 2, 2, 8)
    o = block_sparse_attention(q, k, v, counting_window, block_q=bs, block_k=bs, layout=layout)
    torch.testing.assert_close(o, masked_attention(q, k, v, sliding_window(w)))
    n_partial = int((layout.kind == PARTIAL).sum())
    # each query block evaluates the mask over the keys of its used tiles only when it has a
    # partial tile; a window has 2 partial tiles per block row (diagonal and the one before)
    assert sum(evaluated) <= n_partial * bs * bs * 2
    assert sum(evaluated) < t * t / 4
    assert layout.density < 2.5 * w / t


def test_block_sparse_bad_input():
    q, k, v = qkv(1, 64, 64, 2, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, causal(), backend="cuda")
    layout = block_layout(causal(), 64, 64, block_q=32, block_k=32)
    with pytest.raises(ValueError, match="layout was built for Tq=64, Tk=64, tiles 32x32"):
        block_sparse_attention(q, k, v, causal(), block_q=16, block_k=16, layout=layout)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        block_sparse_attention(q, k, v, causal(), layout="x")
    with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
        masked_attention(q, *qkv(1, 64, 64, 3, 3, 8)[1:], causal())


def test_block_layout_fields_stay_on_its_device():
    from effarch.sparse import block_layout, causal

    layout = block_layout(causal(), 64, 64, block_q=16, block_k=16, device="meta")
    for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert getattr(layout, field).device.type == "meta", field
