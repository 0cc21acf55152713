"""selected_blocks_attention: key-block major attention over per-query chosen blocks, checked
against a float64 loop over queries and against masked dense attention with autograd."""

import math

import pytest
import torch

import effarch.attention.selected as selected_module
from effarch.attention import selected_blocks_attention
from effarch.bench import peak_memory

F64 = torch.float64


def loop_reference(q, k, v, chosen, block, causal, scale=None):
    """One query at a time: collect its keys, softmax over them (float64, plain loops)."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    hs = chosen.shape[1]
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=F64)
    for bb in range(b):
        for h in range(hq):
            s = h // (hq // hs)
            g = s // (hs // hkv)
            for i in range(tq):
                pos = i + tk - tq
                keys = [
                    j
                    for n in range(chosen.shape[-1])
                    if chosen[bb, s, i, n]
                    for j in range(n * block, min((n + 1) * block, tk))
                    if not causal or j <= pos
                ]
                if not keys:
                    continue
                sc = torch.stack([q[bb, i, h].double() @ k[bb, j, g].double() for j in keys])
                p = torch.softmax(sc * (d**-0.5 if scale is None else scale), 0)
                out[bb, i, h] = sum(p[n] * v[bb, j, g].double() for n, j in enumerate(keys))
    return out


def dense_masked(q, k, v, chosen, block, causal):
    """Masked softmax over the full score matrix: differentiable, for the gradient check."""
    tq, hq, tk, hkv, hs = q.shape[1], q.shape[2], k.shape[1], k.shape[2], chosen.shape[1]
    mask = chosen.repeat_interleave(block, dim=-1)[..., :tk].repeat_interleave(hq // hs, dim=1)
    if causal:
        mask = mask & (torch.arange(tk) <= torch.arange(tq)[:, None] + tk - tq)
    kk, vv = (x.repeat_interleave(hq // hkv, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def outputs_and_grads(q, k, v, chosen, block, causal):
    """[output, dq, dk, dv] of selected_blocks_attention and of masked dense attention, for
    the same random output gradient: ``(ours, dense)``."""
    do = torch.randn(
        *q.shape[:-1], v.shape[-1], dtype=F64, generator=torch.Generator().manual_seed(1)
    )
    grads = []
    for fn in (selected_blocks_attention, None):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if fn is None:
            out = dense_masked(*leaves, chosen, block, causal)
        else:
            out = fn(*leaves, chosen, block_size=block, causal=causal)
        out.backward(do)
        grads.append([out.detach(), *(x.grad for x in leaves)])
    return grads


def case(b, tq, tk, hq, hkv, hs, block, density, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, 8, generator=gen, dtype=dtype)
    k = torch.randn(b, tk, hkv, 8, generator=gen, dtype=dtype)
    v = torch.randn(b, tk, hkv, 6, generator=gen, dtype=dtype)
    chosen = torch.rand(b, hs, tq, -(-tk // block), generator=gen) < density
    return q, k, v, chosen


CASES = [
    # (b, tq, tk, hq, hkv, hs, block, density, causal)
    (2, 24, 24, 2, 2, 2, 8, 0.5, True),  # Tk a multiple of the block
    (1, 29, 29, 4, 2, 2, 8, 0.5, True),  # not a multiple: the last block is short
    (2, 5, 40, 4, 1, 4, 8, 0.6, True),  # the last queries only, every query head selects
    (1, 20, 12, 2, 1, 2, 4, 0.7, True),  # more queries than keys: early rows see nothing
    (1, 19, 33, 8, 2, 4, 8, 0.4, False),  # selection heads between Hkv and Hq
    (2, 16, 16, 2, 2, 2, 4, 1.0, False),  # every block: full attention
]


@pytest.mark.parametrize("tile", [1, 3, 64])  # pairs per product: groups span several tiles
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "hs", "block", "density", "causal"), CASES)
def test_equals_a_loop_over_queries(monkeypatch, tile, b, tq, tk, hq, hkv, hs, block, density,
                                    causal):  # fmt: skip
    monkeypatch.setattr(selected_module, "_PAIR_TILE", tile)
    q, k, v, chosen = case(b, tq, tk, hq, hkv, hs, block, density)
    got = selected_blocks_attention(q, k, v, chosen, block_size=block, causal=causal)
    want = loop_reference(q, k, v, chosen, block, causal)
    assert got.shape == want.shape and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = selected_blocks_attention(q, k, v, chosen, block_size=block, causal=causal, scale=0.9)
    want = loop_reference(q, k, v, chosen, block, causal, scale=0.9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_every_block_is_plain_attention():
    q, k, v, _ = case(1, 32, 32, 4, 2, 2, 8, 1.0)
    chosen = torch.ones(1, 4, 32, 4, dtype=torch.bool)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(x.repeat_interleave(4 // x.shape[2], 2).transpose(1, 2) for x in (q, k, v)),
        is_causal=True,
    ).transpose(1, 2)
    got = selected_blocks_attention(q, k, v, chosen, block_size=8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", [1, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_masked_dense_attention(monkeypatch, tile, causal):
    monkeypatch.setattr(selected_module, "_PAIR_TILE", tile)
    q, k, v, chosen = case(1, 30, 27, 4, 2, 4, 4, 0.4, seed=3)
    chosen[:, :, 3] = False  # a query that selected nothing: zero output, zero gradient
    grads = outputs_and_grads(q, k, v, chosen, 4, causal)
    assert (grads[0][0][:, 3] == 0).all() and (grads[0][1][:, 3] == 0).all()
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_nothing_selected_gives_zeros_and_zero_gradients():
    q, k, v, chosen = case(1, 6, 6, 2, 1, 2, 4, 0.0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = selected_blocks_attention(*leaves, chosen, block_size=4)
    assert not chosen.any() and out.shape == (1, 6, 2, 6) and (out == 0).all()
    out.sum().backward()
    assert all((x.grad == 0).all() for x in leaves)
    k = k.clone()
    k[0, 0, 0, 0] = float("inf")  # never read: nothing is selected
    assert (selected_blocks_attention(q, k, v, chosen, block_size=4) == 0).all()


def test_large_scores_keep_the_row_maximum():
    # scores near 1e3: exp overflows unless each row's maximum is subtracted first
    q, k, v, chosen = case(1, 24, 24, 2, 2, 2, 4, 0.6, seed=5)
    got = selected_blocks_attention(q * 30, k * 30, v, chosen, block_size=4)
    want = loop_reference(q * 30, k * 30, v, chosen, 4, True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# scores per chunk: one tile (of 3 pairs) at a time, or a few tiles
@pytest.mark.parametrize("chunk", [1, 3 * 2 * 8 * 2 + 1])
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "hs", "block", "density", "causal"), CASES)
def test_chunks_of_tiles_merge_to_the_loop_over_queries(monkeypatch, chunk, b, tq, tk, hq, hkv,
                                                        hs, block, density, causal):  # fmt: skip
    """Many tiles are computed a chunk at a time: a query's blocks then fall in different
    chunks, whose row maxima (a pass of their own) and sums must meet in the query's row."""
    monkeypatch.setattr(selected_module, "_PAIR_TILE", 3)
    monkeypatch.setattr(selected_module, "_SCORE_CHUNK", chunk)
    q, k, v, chosen = case(b, tq, tk, hq, hkv, hs, block, density, seed=11)
    got = selected_blocks_attention(q, k, v, chosen, block_size=block, causal=causal)
    torch.testing.assert_close(got, loop_reference(q, k, v, chosen, block, causal), rtol=1e-12,
                               atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
def test_chunks_share_the_row_maximum_and_gradients(monkeypatch, causal):
    """A query's later chunk holds scores far above its earlier one: each chunk's exp must be
    taken from the maximum over all chunks; the gradients are exact too."""
    monkeypatch.setattr(selected_module, "_PAIR_TILE", 2)
    monkeypatch.setattr(selected_module, "_SCORE_CHUNK", 2 * 4 * 4)  # 4 tiles per chunk
    q, k, v, chosen = case(1, 30, 27, 4, 2, 4, 4, 0.4, seed=3)
    # the later blocks (later tiles, later chunks) score thousands higher: exp of that
    # overflows float64, so every chunk must subtract the maximum over all chunks
    q, k = q.abs(), k.clone()
    k[:, 16:] = k[:, 16:].abs() * 1500
    chosen[:, :, 3] = False
    grads = outputs_and_grads(q, k, v, chosen, 4, causal)
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunks_bound_the_memory_without_gradients(monkeypatch):
    """Without gradients, one chunk's scores are freed before the next is computed: the
    peak of the bytes allocated falls with the chunk (counted by the profiler, not timed)."""
    q, k, v, chosen = case(1, 512, 512, 2, 2, 2, 16, 0.5, seed=2)
    q, k, v = (x.float() for x in (q, k, v))
    peaks = {}
    for chunk in (1 << 25, 1 << 12):
        monkeypatch.setattr(selected_module, "_SCORE_CHUNK", chunk)
        with torch.no_grad():
            usage = peak_memory(lambda: selected_blocks_attention(q, k, v, chosen, block_size=16))
        peaks[chunk] = usage.peak
    n_scores = int(chosen.sum()) * 16  # 1 query head per selection head, 16 keys a block
    assert peaks[1 << 25] > 2 * 4 * n_scores, peaks  # the scores and their exp, 4 bytes each
    # what is left is the bookkeeping of the pairs (int64) and the accumulators
    assert peaks[1 << 12] < 0.25 * peaks[1 << 25], peaks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_without_overflow(dtype):
    # 16 blocks of 64 equal scores: the unnormalised sum of weighted values is 1,024 x 80,
    # past float16's largest number (65,504); the sums are kept in float32
    t = 1024
    q = torch.zeros(1, t, 1, 8, dtype=dtype)
    k = torch.randn(1, t, 1, 8).to(dtype)
    v = torch.full((1, t, 1, 4), 80.0, dtype=dtype)
    chosen = torch.ones(1, 1, t, 16, dtype=torch.bool)
    got = selected_blocks_attention(q, k, v, chosen, block_size=64, causal=False)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), torch.full((1, t, 1, 4), 80.0), rtol=1e-2, atol=0)
    # one block of 1,024 equal scores: already one tile's weighted sum passes 65,504
    one = torch.ones(1, 1, t, 1, dtype=torch.bool)
    got = selected_blocks_attention(q, k, v, one, block_size=t, causal=False)
    torch.testing.assert_close(got.float(), torch.full((1, t, 1, 4), 80.0), rtol=1e-2, atol=0)
    q, k, v, chosen = case(1, 33, 33, 2, 1, 2, 8, 0.5, seed=7)
    exact = loop_reference(q, k, v, chosen, 8, True)
    half = selected_blocks_attention(*(x.to(dtype) for x in (q, k, v)), chosen, block_size=8)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(half.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (dict(selected=torch.ones(1, 2, 8, 2)), TypeError, "selected must have dtype"),
        (dict(selected=torch.ones(1, 2, 8, 3, dtype=torch.bool)), ValueError, r"\[1, Hs, 8, 2\]"),
        (dict(selected=torch.ones(1, 2, 8, dtype=torch.bool)), ValueError, "selected must have 4"),
        (dict(selected=torch.ones(1, 3, 8, 2, dtype=torch.bool)), ValueError, "heads"),
        (dict(selected=[[True]]), TypeError, "selected must be a torch.Tensor"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=2.0), TypeError, "block_size"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale="0.5"), TypeError, "scale"),
    ],
)
def test_rejects_bad_arguments(change, exc, match):
    q, k, v, _ = case(1, 8, 8, 4, 2, 2, 4, 0.5)
    kw = dict(selected=torch.ones(1, 2, 8, 2, dtype=torch.bool), block_size=4) | change
    with pytest.raises(exc, match=match):
        selected_blocks_attention(q, k, v, kw.pop("selected"), **kw)
