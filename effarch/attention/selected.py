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
    never selected is never done.
    """
    check_attention_qkv(q, k, v)
    block = check_positive_int("block_size", block_size)
    causal = check_bool("causal", causal)
    hs = _check_selected(selected, q, k, block)
    sc = q.shape[-1] ** -0.5 if scale is None else check_positive_number("scale", scale)
    b, t, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    r, e, n_all = hq // hs, hs // hkv, selected.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # sums of up to N l terms
    # the selected (query, block) pairs, in [B, Hs, Tq, N] order, sorted by group: one group
    # per (batch, selection head, block), its pairs contiguous after the sort
    pairs = selected.flatten().nonzero().squeeze(1)
    n_groups, n_pairs = b * hs * n_all, pairs.shape[0]
    if n_pairs == 0:  # no query selected anything: every output is zero (kept in the graph
        # by empty sums, so that backward gives zero gradients, also for inputs holding inf)
        return q.new_zeros(b, t, hq, dv) + sum(x[..., :0].sum() for x in (q, k, v))
    gid = pairs // (t * n_all) * n_all + pairs % n_all
    order = torch.argsort(gid, stable=True)
    ends = torch.bincount(gid, minlength=n_groups).cumsum(0)
    # tiles as tall as the mean group, rounded up to a power of two (1 when decoding a token)
    tile = min(_PAIR_TILE, 1 << max(0, -(-n_pairs // n_groups) - 1).bit_length())
    tile_group, tile_start = row_tiles(ends, n_pairs, tile)
    used = tile_group >= 0  # the grid has room for one tile per group: keep those in use
    grp, first = tile_group[used].long(), tile_start[used].long()  # [n_tiles]
    rows = first[:, None] + torch.arange(tile, device=q.device)  # [n_tiles, M]
    live = rows < ends[grp][:, None]  # the last tile of a group is padded
    pair = pairs[order[rows.clamp(max=n_pairs - 1)]]
    bs_, tt = pair // (t * n_all), pair // n_all % t  # (batch, selection head) and query
    n_tiles = grp.shape[0]
    # a pair's query heads are one row of q viewed as [B Tq Hs, R D], a block's keys (values)
    # one [l, D] slice of k viewed as [B, N, l, Hkv, D] (padded only when Tk is not a
    # multiple of l): each is gathered whole, one copy per tile
    q_row = ((bs_ // hs) * t + tt) * hs + bs_ % hs  # [n_tiles, M]
    qs = q.reshape(b * t * hs, r * d).index_select(0, q_row.flatten())
    gb, gj, gh = grp // (hs * n_all), grp % n_all, grp // n_all % hs // e
    kb, vb = ((x if tk == n_all * block else F.pad(x, (0, 0, 0, 0, 0, n_all * block - tk)))
              .unflatten(1, (n_all, block))[gb, gj, :, gh] for x in (k, v))  # fmt: skip
    s = torch.bmm(qs.view(n_tiles, -1, d) * sc, kb.mT).view(n_tiles, tile, r, block)
    del qs, kb  # freed here when no gradient is taken (autograd keeps what it needs)
    cols = gj[:, None] * block + torch.arange(block, device=q.device)  # [n_tiles, l]
    ok = (cols < tk)[:, None] & live[..., None]  # [n_tiles, M, l]
    if causal:
        qpos = tk - t + tt  # [n_tiles, M]
        ok = ok & (cols[:, None] <= qpos[..., None])
    s = s.masked_fill(~ok[:, :, None], float("-inf"))  # [n_tiles, M, R, l]
    # one softmax per query over its blocks, spread over as many tiles: the row maximum, the
    # sum and the weighted values are reduced into the query's row (padding rows go to a
    # spare last row); the maximum only steadies exp, so it carries no gradient
    row = torch.where(live, q_row, b * t * hs).flatten()
    with torch.no_grad():
        m = s.new_full((b * t * hs + 1, r), float("-inf"))
        m = m.scatter_reduce(0, row[:, None].expand(-1, r), s.amax(-1).flatten(0, 1), "amax")
        m = m.masked_fill(m == float("-inf"), 0.0)  # rows with no key (and the spare row)
    s = torch.exp(s - m[row].view(n_tiles, tile, r, 1))
    z = s.new_zeros(b * t * hs + 1, r, dtype=acc).index_add(0, row, s.sum(-1).flatten(0, 1).to(acc))
    o = torch.bmm(s.view(n_tiles, -1, block).to(acc), vb.to(acc)).view(-1, r, dv)
    o = o.new_zeros(b * t * hs + 1, r, dv).index_add(0, row, o)
    z = torch.where(z > 0, z, torch.ones_like(z))  # a query with no key: o = 0
    return (o[:-1] / z[:-1, :, None]).to(q.dtype).view(b, t, hq, dv)
