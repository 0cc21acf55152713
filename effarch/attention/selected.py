r"""Attention over the key blocks each query chose, computed key-block major.

The shared core of MoBA (:func:`~effarch.attention.moba_attention`, chapter 4.3) and of NSA's
selected branch (:func:`~effarch.sparse.nsa_attention`, chapter 3.2): once a router has
chosen, per query, a set of key blocks, both attend with one softmax over the keys of those
blocks. Computing it query by query copies ``top_k x block_size`` keys and values per query;
computing it key block by key block reads each block once per tile of the queries that
chose it, the way MoBA's released code runs FlashAttention's variable-length kernel on the
queries gathered per key block and merges the partial results by their log-sum-exp, and the
way a MoE layer runs each expert on the tokens routed to it (:func:`~effarch.moe.row_tiles`
is the same grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import (
    check_attention_qkv,
    check_bool,
    check_positive_int,
    check_positive_number,
    check_same,
    check_tensor,
)
from ..moe import row_tiles

__all__ = ["selected_blocks_attention"]

# the most (query, block) pairs per tile: one block of keys is copied per tile (of 32, 64 and
# 128, 64 was the fastest for NSA's selected branch at T = 8192 on a CPU)
_PAIR_TILE = 64
# the most scores computed at once (2^25: 128 MiB in float32): more tiles than that are
# computed a chunk at a time (the pages' sizes need one chunk; tests set it smaller)
_SCORE_CHUNK = 1 << 25


def _check_selected(selected: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: int) -> int:
    check_tensor("selected", selected, ndim=4, dtypes=(torch.bool,))
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    n_blocks = -(-tk // block)
    hs = selected.shape[1]
    check_same(("q", "selected"), (q, selected), dtype=False)
    if (selected.shape[0], selected.shape[2], selected.shape[3]) != (b, tq, n_blocks):
        raise ValueError(
            f"selected must have shape [{b}, Hs, {tq}, {n_blocks}] (batch, selection heads, "
            f"queries, ceil(Tk / block_size) blocks), got {tuple(selected.shape)}"
        )
    if hs == 0 or hs % hkv or hq % hs:
        raise ValueError(
            f"selected's heads (dim 1) must be a multiple of k's {hkv} heads and divide q's "
            f"{hq} heads, got {hs}"
        )
    return hs


def _tile_scores(
    q: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    sorted_pairs: torch.Tensor,
    ends: torch.Tensor,
    grp: torch.Tensor,
    first: torch.Tensor,
    *,
    tile: int,
    hs: int,
    tk: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked scores of some tiles, ``[n_tiles, M, R, l]`` (``-inf`` where a key is not
    the query's), each tile-row's accumulator row ``[n_tiles M]`` (one per (batch, query,
    selection head); the spare last row ``B Tq Hs`` for the padding) and the tiles' value
    blocks ``[n_tiles, l, Dv]``."""
    b, t, hq, d = q.shape
    n_all, block, hkv = kp.shape[1], kp.shape[2], kp.shape[3]
    r, e = hq // hs, hs // hkv
    n_pairs, n_tiles = sorted_pairs.shape[0], grp.shape[0]
    rows = first[:, None] + torch.arange(tile, device=q.device)  # [n_tiles, M]
    live = rows < ends[grp][:, None]  # the last tile of a group is padded
    pair = sorted_pairs[rows.clamp(max=n_pairs - 1)]
    bs_, tt = pair // (t * n_all), pair // n_all % t  # (batch, selection head) and query
    # a pair's query heads are one row of q viewed as [B Tq Hs, R D], a block's keys (values)
    # one [l, D] slice of k viewed as [B, N, l, Hkv, D]: each is gathered whole, one copy
    # per tile
    q_row = ((bs_ // hs) * t + tt) * hs + bs_ % hs  # [n_tiles, M]
    qs = q.reshape(b * t * hs, r * d).index_select(0, q_row.flatten())
    gb, gj, gh = grp // (hs * n_all), grp % n_all, grp // n_all % hs // e
    kb, vb = kp[gb, gj, :, gh], vp[gb, gj, :, gh]
    s = torch.bmm(qs.view(n_tiles, -1, d) * scale, kb.mT).view(n_tiles, tile, r, block)
    del qs, kb  # freed here when no gradient is taken (autograd keeps what it needs)
    cols = gj[:, None] * block + torch.arange(block, device=q.device)  # [n_tiles, l]
    ok = (cols < tk)[:, None] & live[..., None]  # [n_tiles, M, l]
    if causal:
        qpos = tk - t + tt  # [n_tiles, M]
        ok = ok & (cols[:, None] <= qpos[..., None])
    s = s.masked_fill(~ok[:, :, None], float("-inf"))  # [n_tiles, M, R, l]
    return s, torch.where(live, q_row, b * t * hs).flatten(), vb


def selected_blocks_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    r"""Each query attends, with one softmax, to the keys of the blocks it selected.

    The ``Tk`` keys form ``N = ceil(Tk / block_size)`` blocks ``I_n = {n l, ..., min((n + 1)
    l, Tk) - 1}`` (``l = block_size``). Query ``i`` sits at key position ``p_i = i + Tk - Tq``
    (bottom-right aligned, as :func:`~effarch.attention.attention_mask`); query head ``h``
    follows selection head ``s = h // (Hq / Hs)``, which reads key/value head
    ``s // (Hs / Hkv)``::

        K_i = union of I_n over the blocks n with selected[b, s, i, n],
              minus the keys j > p_i when causal
        o_i = sum_{j in K_i} softmax_j(scale q_i . k_j) v_j        (0 when K_i is empty)

    Key-block major: the selected (query, block) pairs are sorted by (batch, selection head,
    block) and cut into tiles of up to 64 pairs on :func:`~effarch.moe.row_tiles`' grid;
    every tile's query rows (the ``Hq / Hs`` heads that share a selection) are scored against
    its one block in a single batched product over all tiles, so one block of keys is copied
    per tile instead of ``top_k l`` keys per query, and no Python step is taken per block.
    Each query's softmax spans the tiles of its blocks: the row maxima, the sums of
    exponentials and the weighted values are reduced into the query's row (the weighted
    values and every sum in at least float32) and divided at the end, which is the
    log-sum-exp merge of MoBA's released code (FlashAttention's variable-length kernel run on
    the queries gathered per key block).
    Differentiable; the row maxima only steady ``exp`` and carry no gradient.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (flash-attn's
            layout; ``Hq`` a multiple of ``Hkv``).
        selected: bool ``[B, Hs, Tq, N]``, True where a query selects a key block. ``Hs`` is
            a multiple of ``Hkv`` and divides ``Hq``: ``Hs = Hq`` lets every query head
            choose (MoBA), ``Hs = Hkv`` makes a GQA group share one choice (NSA).
        block_size: keys per block ``l`` (``Tk`` need not be a multiple).
        causal: drop the keys after each query's position from every selected block (with
            MoBA's and NSA's selections, only the own block holds such keys).
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``o [B, Tq, Hq, Dv]`` in the dtype of ``q``.

    Cost: about ``P l (D + Dv)`` multiply-adds for ``P`` selected (query, block) pairs times
    ``Hq / Hs`` heads, plus the padding of each group's last tile; the work of the pairs
    never selected is never done. Memory: the tiles are computed in chunks of at most 2^25
    scores (128 MiB in float32). Over several chunks the row maxima take a first pass of
    their own (the scores computed once more, ``P l D`` multiply-adds, and dropped), so that
    without gradients what is allocated beyond the inputs and the output stays bounded at
    any length (a few int64 indices per selected pair aside); with gradients autograd keeps
    every chunk's scores, as it keeps the gather's.
    """
    check_attention_qkv(q, k, v)
    block = check_positive_int("block_size", block_size)
    causal = check_bool("causal", causal)
    hs = _check_selected(selected, q, k, block)
    sc = q.shape[-1] ** -0.5 if scale is None else check_positive_number("scale", scale)
    b, t, hq, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    r, n_all = hq // hs, selected.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # sums of up to N l terms
    # the selected (query, block) pairs, in [B, Hs, Tq, N] order, sorted by group: one group
    # per (batch, selection head, block), its pairs contiguous after the sort
    pairs = selected.flatten().nonzero().squeeze(1)
    n_groups, n_pairs = b * hs * n_all, pairs.shape[0]
    if n_pairs == 0:  # no query selected anything: every output is zero (kept in the graph
        # by empty sums, so that backward gives zero gradients, also for inputs holding inf)
        return q.new_zeros(b, t, hq, dv) + sum(x[..., :0].sum() for x in (q, k, v))
    gid = pairs // (t * n_all) * n_all + pairs % n_all
    ends = torch.bincount(gid, minlength=n_groups).cumsum(0)
    # tiles as tall as the mean group, rounded up to a power of two (1 when decoding a token)
    tile = min(_PAIR_TILE, 1 << max(0, -(-n_pairs // n_groups) - 1).bit_length())
    tile_group, tile_start = row_tiles(ends, n_pairs, tile)
    used = tile_group >= 0  # the grid has room for one tile per group: keep those in use
    grp, first = tile_group[used].long(), tile_start[used].long()  # [n_tiles]
    sorted_pairs = pairs[torch.argsort(gid, stable=True)]
    # padded only when Tk is not a multiple of l: then a block is one [l, D] slice
    kp, vp = ((x if tk == n_all * block else F.pad(x, (0, 0, 0, 0, 0, n_all * block - tk)))
              .unflatten(1, (n_all, block)) for x in (k, v))  # fmt: skip
    # the tiles in chunks of at most _SCORE_CHUNK scores (with their copies of queries, keys
    # and values): without gradients, memory beyond the inputs and the output stays bounded
    step = max(1, _SCORE_CHUNK // (tile * r * block))
    chunks = [(grp[lo : lo + step], first[lo : lo + step]) for lo in range(0, len(grp), step)]
    n_rows = b * t * hs + 1  # one per (batch, query, selection head), and a spare one
    kw = dict(tile=tile, hs=hs, tk=tk, causal=causal, scale=sc)

    def scores(chunk: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return _tile_scores(q, kp, vp, sorted_pairs, ends, *chunk, **kw)

    # one softmax per query over its blocks, spread over tiles (and chunks): the row maximum,
    # the sum and the weighted values are reduced into the query's row (the padding into the
    # spare row). The maximum only steadies exp and carries no gradient; over several chunks
    # it takes a first pass of its own, whose scores are dropped as soon as reduced
    held = [scores(chunks[0])] if len(chunks) == 1 else []  # [] when the maximum is a pass
    with torch.no_grad():
        m = q.new_full((n_rows, r), float("-inf"))
        for s, row, _ in held or map(scores, chunks):
            m.scatter_reduce_(0, row[:, None].expand(-1, r), s.amax(-1).flatten(0, 1), "amax")
        m = m.masked_fill(m == float("-inf"), 0.0)  # rows with no key (and the spare row)
    z = q.new_zeros(n_rows, r, dtype=acc)
    o = q.new_zeros(n_rows, r, dv, dtype=acc)
    for chunk in chunks:
        s, row, vb = held.pop() if held else scores(chunk)  # (the one reference to s)
        s = torch.exp(s - m[row].view(*s.shape[:-1], 1))
        z.index_add_(0, row, s.sum(-1).flatten(0, 1).to(acc))
        o.index_add_(0, row, torch.bmm(s.flatten(1, 2).to(acc), vb.to(acc)).view(-1, r, dv))
    z = torch.where(z > 0, z, torch.ones_like(z))  # a query with no key: o = 0
    return (o[:-1] / z[:-1, :, None]).to(q.dtype).view(b, t, hq, dv)
