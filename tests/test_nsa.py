"""Chapter 3.2: Native Sparse Attention against its loop reference, decoding, causality."""

import pytest
import torch

from effarch.sparse import (
    NativeSparseAttention,
    NSACache,
    expert_choice_attention,
    future_leaks,
    masked_attention,
    nsa_attention,
    nsa_compress,
    nsa_decode,
    nsa_reference,
    nsa_select,
)


def inputs(t, hq, g, d=8, seed=0, b=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, g, d + 2, generator=gen, dtype=torch.float64)
    gates = torch.rand(b, t, hq, 3, generator=gen, dtype=torch.float64)
    return q, k, v, gates


@pytest.mark.parametrize(("t", "hq", "g", "block", "top_n", "window"), [
    (37, 4, 2, 8, 2, 10), (50, 2, 1, 16, 3, 64), (20, 2, 2, 4, 8, 3), (64, 4, 4, 16, 1, 1),
])  # fmt: skip
def test_nsa_equals_its_loop_reference(t, hq, g, block, top_n, window):
    q, k, v, gates = inputs(t, hq, g)
    kw = dict(block=block, top_n=top_n, window=window)
    want = nsa_reference(q, k, v, gates, **kw)
    torch.testing.assert_close(nsa_attention(q, k, v, gates, **kw), want, rtol=1e-12, atol=1e-12)


def test_branches_reduce_to_known_attention():
    q, k, v, _ = inputs(40, 2, 2)
    only = lambda i: torch.nn.functional.one_hot(torch.tensor(i), 3).double().expand(2, 40, 2, 3)  # noqa: E731
    # window alone is sliding-window attention; selection of every block is causal attention
    win = nsa_attention(q, k, v, only(2), block=8, window=6)
    ref = masked_attention(q, k, v, lambda b, h, i, j: (j <= i) & (i - j < 6))
    torch.testing.assert_close(win, ref, rtol=1e-12, atol=1e-12)
    slc = nsa_attention(q, k, v, only(1), block=8, top_n=5)  # 5 blocks of 8 cover 40 tokens
    ref = masked_attention(q, k, v, lambda b, h, i, j: j <= i)
    torch.testing.assert_close(slc, ref, rtol=1e-12, atol=1e-12)


def test_selection_is_shared_by_a_group_and_never_looks_ahead():
    q, k, v, _ = inputs(48, 4, 2)
    p = torch.rand(2, 2, 2, 48, 6, dtype=torch.float64)  # [B, G, R, T, nb]
    chosen = nsa_select(p, 8, 3)
    assert chosen.shape == (2, 2, 48, 6)
    pos = torch.arange(48)[:, None]
    assert not (chosen & (torch.arange(6) * 8 > pos)).any()  # no block that has not started
    assert chosen[..., torch.arange(48), pos.flatten() // 8].all()  # the own block, always
    assert (chosen.sum(-1) <= 3).all()


def test_decoding_with_a_cache_equals_the_full_pass():
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, 4, 2, block=4, top_n=2, window=5).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2, 23)
    steps = [layer(x[:, :6], cache)] + [layer(x[:, i : i + 1], cache) for i in range(6, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def block_means(x, block):
    means = [x[:, j * block : (j + 1) * block].mean(1) for j in range(x.shape[1] // block)]
    return torch.stack(means, 1) if means else x[:, :0]


@pytest.mark.parametrize(("hq", "g", "block", "top_n", "window"), [
    (4, 2, 4, 2, 5), (2, 1, 8, 3, 64), (2, 2, 4, 8, 1), (4, 4, 16, 1, 3),
])  # fmt: skip
def test_decode_step_equals_the_loop_reference_at_every_length(hq, g, block, top_n, window):
    # every cache length: shorter than a block, a multiple of it, inside one
    q, k, v, gates = inputs(37, hq, g)
    kw = dict(block=block, top_n=top_n, window=window)
    for tk in range(1, 38):
        kk, vv = k[:, :tk], v[:, :tk]
        got = nsa_decode(q[:, tk - 1 : tk], kk, vv, block_means(kk, block),
                         block_means(vv, block), gates[:, tk - 1 : tk], **kw)  # fmt: skip
        want = nsa_reference(q[:, :tk], kk, vv, gates[:, :tk], **kw)[:, -1:]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_decode_step_breaks_ties_as_the_reference_and_reads_head_major_views():
    # identical keys: every complete block scores the same, so the tie rule picks the blocks
    q, k, v, gates = inputs(29, 4, 2)
    k = k[:, :1].expand_as(k).contiguous()
    for tk in (8, 13, 29):
        kk, vv = k[:, :tk], v[:, :tk]
        kc, vc = (block_means(x, 4).transpose(1, 2).contiguous().transpose(1, 2) for x in (kk, vv))
        assert kc.stride(1) == kc.shape[-1]  # head-major storage, read as [B, n, G, D] views
        got = nsa_decode(q[:, tk - 1 : tk], kk, vv, kc, vc, gates[:, tk - 1 : tk], block=4,
                         top_n=3, window=2)  # fmt: skip
        want = nsa_reference(q[:, :tk], kk, vv, gates[:, :tk], block=4, top_n=3, window=2)
        torch.testing.assert_close(got, want[:, -1:], rtol=1e-12, atol=1e-12)


def test_nsa_cache_pools_each_block_once_as_it_completes():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 30, 2, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 30, 2, 6, generator=gen, dtype=torch.float64)
    cache = NSACache(2, 30, 2, 4, 4, head_dim_v=6, dtype=torch.float64)
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 17), (17, 30)):  # prefill, steps, a chunk
        cache.update(k[:, lo:hi], v[:, lo:hi])
        kp, vp = cache.pooled()
        assert kp.shape[1] == hi // 4
        torch.testing.assert_close(kp, block_means(k[:, :hi], 4), rtol=0, atol=1e-15)
        torch.testing.assert_close(vp, block_means(v[:, :hi], 4), rtol=0, atol=1e-15)
        # bytes held: 8 bytes x B x G x (D + Dv) per token and per pooled block
        assert cache.nbytes() == 8 * 2 * 2 * (4 + 6) * (hi + hi // 4)
    cache.truncate(12)  # a multiple of the block keeps its 3 means
    assert cache.pooled()[0].shape[1] == 3
    cache.truncate(10)  # forget all but 10 tokens: 2 complete blocks; refilling re-pools
    assert cache.pooled()[0].shape[1] == 2
    cache.update(k[:, 10:30] * 2, v[:, 10:30] * 2)
    torch.testing.assert_close(
        cache.pooled()[0][:, 2], (k[:, 8:10].sum(1) + 2 * k[:, 10:12].sum(1)) / 4
    )


def test_layer_decodes_through_the_sparse_step_and_holds_its_state_size():
    torch.manual_seed(1)
    layer = NativeSparseAttention(32, 4, 2, block=4, top_n=2, window=5).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    cache = layer.new_cache(2, 19)
    assert isinstance(cache, NSACache)
    layer(x[:, :3], cache)
    calls = []
    import effarch.sparse.nsa as nsa

    real = nsa.nsa_decode
    try:
        nsa.nsa_decode = lambda *a, **kw: calls.append(a[1].shape[1]) or real(*a, **kw)
        for i in range(3, 19):
            layer(x[:, i : i + 1], cache)
    finally:
        nsa.nsa_decode = real
    assert calls == list(range(4, 20))  # every one-token step took the sparse path
    assert cache.nbytes() == 2 * 8 * layer.state_size(19)


def test_nsa_decode_bad_input():
    q, k, v, gates = inputs(16, 2, 1)
    kp, vp = block_means(k, 4), block_means(v, 4)
    with pytest.raises(ValueError, match="q must hold one query"):
        nsa_decode(q[:, -2:], k, v, kp, vp, gates[:, -2:], block=4)
    with pytest.raises(ValueError, match=r"k_pooled must be \[2, >= 4, 1, 8\]"):
        nsa_decode(q[:, -1:], k, v, kp[:, :3], vp, gates[:, -1:], block=4)
    with pytest.raises(ValueError, match="v_pooled must be"):
        nsa_decode(q[:, -1:], k, v, kp, kp, gates[:, -1:], block=4)
    with pytest.raises(ValueError, match="k_pooled must be torch.float64"):
        nsa_decode(q[:, -1:], k, v, kp.float(), vp, gates[:, -1:], block=4)
    with pytest.raises(ValueError, match="gates must be torch.float64"):
        nsa_decode(q[:, -1:], k, v, kp, vp, gates[:, -1:].float(), block=4)


def leaks(fn, t=32, seed=0, g=1):
    """Positions before ``t // 2`` whose output changes when the later tokens change."""
    q, k, v, gates = inputs(t, 2, g, seed=seed)
    return future_leaks(lambda q, k, v: fn(q, k, v, gates), q, k, v, split=t // 2, seed=seed)


def expert_choice_blocks(q, k, v, gates):
    return expert_choice_attention(q, k, v, block=4, capacity=4)


def test_nsa_is_causal_and_the_check_catches_a_leaky_router():
    for seed in range(3):
        assert not leaks(lambda q, k, v, g: nsa_attention(q, k, v, g, block=4, top_n=2,
                                                          window=3), seed=seed).any()  # fmt: skip
    # the same check flags expert-choice routing: changing later queries changes which
    # earlier queries a key block picks, so earlier outputs move
    assert any(leaks(expert_choice_blocks, seed=s).any() for s in range(3))


def test_nsa_bad_input():
    q, k, v, gates = inputs(16, 2, 1)
    with pytest.raises(ValueError, match=r"gates must be \[B, T, Hq, 3\]"):
        nsa_attention(q, k, v, gates[..., :2])
    with pytest.raises(ValueError, match="Tq <= Tk"):
        nsa_attention(torch.cat([q, q], 1), k, v, torch.cat([gates, gates], 1))
    with pytest.raises(ValueError, match="top_n"):
        nsa_attention(q, k, v, gates, top_n=0)


def test_nsa_compress_and_select_bad_input():
    q, k, v, _ = inputs(16, 2, 1)
    qpos = torch.arange(16)
    with pytest.raises(ValueError, match=r"qpos must have shape \[Tq\] = \[16\].* got \[1\]"):
        nsa_compress(q, k, v, 4, 0.5, torch.tensor([15]))  # broadcast silently before
    with pytest.raises(ValueError, match="qpos must have 1 dimensions"):
        nsa_compress(q, k, v, 4, 0.5, qpos[None])
    with pytest.raises(TypeError, match="qpos must be a torch.Tensor"):
        nsa_compress(q, k, v, 4, 0.5, list(range(16)))
    with pytest.raises(ValueError, match="k must have the head_dim of q"):
        nsa_compress(q, k[..., :4], v, 4, 0.5, qpos)
    with pytest.raises(ValueError, match="block must be a positive int, got 0"):
        nsa_compress(q, k, v, 0, 0.5, qpos)
    _, p = nsa_compress(q, k, v, 4, 0.5, qpos)  # [B, G, R, 16, 4]
    assert nsa_select(p, 4, 2).shape == (2, 1, 16, 4)
    with pytest.raises(ValueError, match="top_n must be a positive int, got 0"):
        nsa_select(p, 4, 0)  # chose nothing before
    with pytest.raises(ValueError, match="block must be a positive int, got 0"):
        nsa_select(p, 0, 2)  # ZeroDivisionError before
    with pytest.raises(ValueError, match=r"kv_len must be at least Tq=16 .*, got 8"):
        nsa_select(p, 4, 2, kv_len=8)  # negative positions before
    with pytest.raises(ValueError, match=r"p_cmp must score the kv_len // block = 16 // 8 = 2 "):
        nsa_select(p, 8, 2)  # pooled with another block: cropped silently before
    with pytest.raises(ValueError, match="p_cmp must have 5 dimensions"):
        nsa_select(p[0], 4, 2)
    # the queries as the last 16 of 20 positions: 20 // 4 = 5 complete blocks
    _, p = nsa_compress(q, torch.cat([k, k[:, :4]], 1), torch.cat([v, v[:, :4]], 1), 4, 0.5,
                        4 + qpos)  # fmt: skip
    assert nsa_select(p, 4, 2, kv_len=20).shape == (2, 1, 16, 5)


# ------------------------------------------------------------------------------------------
# LSH (Reformer) and k-means routing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "chunk", "rounds", "half_buckets"), [(32, 8, 3, 2), (48, 16, 1, 4),
                                                                  (24, 4, 2, 1)])  # fmt: skip
def test_lsh_attention_equals_its_loop_reference(t, chunk, rounds, half_buckets):
    from effarch.sparse import lsh_attention, lsh_reference

    gen = torch.Generator().manual_seed(t)
    qk = torch.randn(2, t, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, t, 2, 5, generator=gen, dtype=torch.float64)
    rot = torch.randn(rounds, 8, half_buckets, generator=gen, dtype=torch.float64)
    want = lsh_reference(qk, v, rot, chunk=chunk)
    torch.testing.assert_close(lsh_attention(qk, v, rot, chunk=chunk), want, rtol=1e-12, atol=1e-12)


def test_lsh_with_one_bucket_and_one_chunk_is_causal_attention_on_normalised_keys():
    from effarch.sparse import lsh_attention

    gen = torch.Generator().manual_seed(1)
    qk = torch.randn(1, 16, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 16, 2, 8, generator=gen, dtype=torch.float64)
    rot = torch.zeros(2, 8, 1, dtype=torch.float64)  # every token hashes to bucket 0
    keys = torch.nn.functional.normalize(qk, dim=-1)
    want = masked_attention(qk, keys, v, lambda b, h, i, j: j <= i)
    torch.testing.assert_close(lsh_attention(qk, v, rot, chunk=16), want, rtol=1e-12, atol=1e-12)
    # scale=1: logits q . k / |k| with nothing more, as transformers' Reformer (which also
    # masks the own key; this keeps it)
    want = masked_attention(qk, keys, v, lambda b, h, i, j: j <= i, scale=1.0)
    got = lsh_attention(qk, v, rot, chunk=16, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lsh_rotations_bad_input():
    from effarch.sparse import lsh_attention, lsh_buckets

    qk = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    v = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    rot = torch.randn(2, 8, 2, dtype=torch.float64)
    assert lsh_buckets(qk, rot).shape == (2, 1, 16, 2)
    with pytest.raises(ValueError, match="rotations must have 3 dimensions"):
        lsh_buckets(qk, rot[0])
    with pytest.raises(ValueError, match=r"rotations must be \[n_rounds >= 1, D = 8 .* got "
                                         r"\(2, 7, 2\)"):  # fmt: skip
        lsh_buckets(qk, rot[:, :7])
    with pytest.raises(ValueError, match=r"rotations must be .* got \(2, 8, 0\)"):
        lsh_buckets(qk, rot[..., :0])
    with pytest.raises(TypeError, match="rotations must be a torch.Tensor"):
        lsh_attention(qk, v, rot.tolist(), chunk=8)
    with pytest.raises(ValueError, match=r"rotations must be \[n_rounds >= 1, D = 8 \(the "
                                         r"head_dim of qk\)"):  # fmt: skip
        lsh_attention(qk, v, rot[:, :4], chunk=8)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        lsh_buckets(qk[0], rot)


def test_routing_attention_equals_its_loop_and_kmeans_moves_towards_members():
    from effarch.sparse import kmeans_update, routing_attention, routing_reference

    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 20, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 20, 2, 5, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(routing_attention(q, k, v, c), routing_reference(q, k, v, c),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    x = torch.randn(1, 50, 2, 8, generator=gen, dtype=torch.float64)
    new = kmeans_update(c, x, decay=0.5)
    members = torch.einsum("bthd,hcd->bthc", torch.nn.functional.normalize(x, dim=-1),
                           torch.nn.functional.normalize(c, dim=-1)).argmax(-1)  # fmt: skip
    for h in range(2):
        for j in range(3):
            xs = torch.nn.functional.normalize(x[0, members[0, :, h] == j, h], dim=-1)
            want = c[h, j] if len(xs) == 0 else 0.5 * c[h, j] + 0.5 * xs.mean(0)
            torch.testing.assert_close(new[h, j], want)


def test_routing_is_causal_but_chunked_lsh_is_not():
    from effarch.sparse import lsh_attention, routing_attention

    rot = torch.randn(2, 8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cents = torch.randn(1, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    routed = lambda q, k, v, g: routing_attention(q, k, v, cents.expand(2, 3, 8))  # noqa: E731
    for seed in range(3):
        assert not leaks(routed, seed=seed, g=2, t=64).any()  # a token's cluster is its own
    # LSH masks future keys, but future tokens still move the chunk boundaries of the sorted
    # order, so an earlier query can see a different set of earlier keys: the check sees it
    lsh = lambda q, k, v, g: lsh_attention(q, v, rot, chunk=8)  # noqa: E731
    assert any(leaks(lsh, seed=s, g=2, t=64).any() for s in range(3))


def test_future_leaks_checks_its_arguments_and_sees_a_one_position_leak():
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    peek = lambda x: x + x[:, -1:]  # noqa: E731  every output reads the last position
    assert future_leaks(peek, x, split=5).all()
    assert not future_leaks(lambda x: x.cumsum(1), x, split=5).any()
    with pytest.raises(ValueError, match="split"):
        future_leaks(peek, x, split=10)
    with pytest.raises(ValueError, match="length"):
        future_leaks(lambda a, b: a, x, x[:, :4], split=2)
    with pytest.raises(TypeError, match="fn"):
        future_leaks("f", x, split=2)


@pytest.mark.parametrize(("t", "tq", "hq", "g", "block", "top_n"), [
    (37, 37, 4, 2, 8, 2), (50, 50, 2, 1, 16, 3), (64, 64, 4, 4, 16, 1), (45, 7, 4, 2, 8, 3),
])  # fmt: skip
def test_the_three_selected_paths_agree(t, tq, hq, g, block, top_n):
    q, k, v, gates = inputs(t, hq, g)
    q, gates = q[:, t - tq :], gates[:, t - tq :]  # the last tq queries (decoding: tq small)
    kw = dict(block=block, top_n=top_n, window=10)
    want = nsa_attention(q, k, v, gates, selected="gather", **kw)
    for path in ("tiles", "blocks"):
        got = nsa_attention(q, k, v, gates, selected=path, backend="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="selected"):
        nsa_attention(q, k, v, gates, selected="dense", **kw)


@pytest.mark.parametrize("tile", [1, 3, 64])  # pairs per product: groups span several tiles
@pytest.mark.parametrize(("t", "tq", "block", "sharp"), [
    (45, 45, 8, 1.0),  # T not a multiple of the block: keys padded
    (48, 48, 8, 1.0),  # a multiple: keys read in place
    (45, 6, 8, 1.0),  # the last queries only (decoding several tokens)
    (40, 40, 4, 30.0),  # scores near 1e3: exp overflows without the row maximum
])  # fmt: skip
def test_key_block_major_tiles_equal_the_gather_path_with_gradients(
    monkeypatch, tile, t, tq, block, sharp
):
    import effarch.attention.selected as selected

    monkeypatch.setattr(selected, "_PAIR_TILE", tile)
    q, k, v, gates = inputs(t, 4, 2)
    q, k, gates = q[:, t - tq :] * sharp, k * sharp, gates[:, t - tq :]
    kw = dict(block=block, top_n=3, window=10)
    grads = []
    for path in ("gather", "blocks"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]
        out = nsa_attention(*leaves, selected=path, **kw)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([out.detach(), *(x.grad for x in leaves)])
    assert torch.isfinite(grads[1][0]).all()
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_key_block_major_path_in_half_precision_sums_without_overflow(dtype):
    # 16 blocks of 64 equal scores: the unnormalised sum of weighted values is 1,024 x 80,
    # past float16's largest number (65,504); the gather path normalises first
    t, d = 1024, 16
    q = torch.zeros(1, t, 2, d, dtype=dtype)
    k = torch.randn(1, t, 1, d).to(dtype)
    v = torch.full((1, t, 1, d), 80.0, dtype=dtype)
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=dtype).expand(1, t, 2, 3)
    kw = dict(block=64, top_n=16, window=8)
    want = nsa_attention(q, k, v, gates, selected="gather", **kw)
    got = nsa_attention(q, k, v, gates, selected="blocks", **kw)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        got.float(), torch.full_like(got, 80.0, dtype=torch.float32), rtol=1e-2, atol=0
    )
    # random inputs: as close to the float64 result as the gather path is
    q, k, v, gates = inputs(37, 4, 2)
    kw = dict(block=8, top_n=2, window=10)
    exact = nsa_attention(q, k, v, gates, **kw)
    half = [x.to(dtype) for x in (q, k, v, gates)]
    err = {p: (nsa_attention(*half, selected=p, **kw).double() - exact).abs().max().item()
           for p in ("gather", "blocks")}  # fmt: skip
    assert err["blocks"] < 2 * err["gather"] + 1e-3, err


def test_the_selected_branch_in_query_chunks_equals_the_reference(monkeypatch):
    import effarch.sparse.nsa as nsa

    monkeypatch.setattr(nsa, "_GATHER_ELEMENTS", 3000)  # chunks of a few queries
    q, k, v, gates = inputs(37, 4, 2)
    kw = dict(block=8, top_n=2, window=10)
    want = nsa_reference(q, k, v, gates, **kw)
    got = nsa_attention(q, k, v, gates, selected="gather", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
