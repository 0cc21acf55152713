r"""Native Sparse Attention (NSA, Yuan et al., 2025; chapter 3.2): three branches, gated.

For query ``t`` of head ``h`` (key/value head ``g(h)``), with blocks of ``l`` tokens:

* **compressed**: each complete block ``j`` (tokens ``j l .. j l + l - 1 <= t``) is pooled into
  one key and one value, ``kc_j = mean(k_{jl..jl+l-1})`` (NSA learns the pooling; mean pooling
  is its simplest instance), and the query attends to the pooled blocks:
  ``p^cmp_t = softmax_j(q_t . kc_j / sqrt(d))``, ``o^cmp_t = sum_j p^cmp_tj vc_j``;
* **selected**: the compressed probabilities, summed over the query heads of a GQA group so
  that the group shares one choice, score the blocks; the ``top_n`` best among the blocks
  that have started (``j l <= t``), always including the query's own block, are attended at
  full resolution (causally inside the own block);
* **window**: the ``window`` most recent tokens (:func:`~effarch.sparse.sliding_window`);

and the output is ``o_t = g^cmp_t o^cmp_t + g^slc_t o^slc_t + g^win_t o^win_t`` with per-head
gates ``g = sigmoid(...)`` in ``(0, 1)`` computed from the token. Every choice depends on
queries and keys up to ``t`` only, so NSA is causal (tested by changing future tokens).

:func:`nsa_attention` is the vectorised form (the selected branch key-block major, per
query, or on block-sparse tiles; the window through
:func:`~effarch.sparse.block_sparse_attention`); :func:`nsa_reference` computes the same
thing one query at a time in plain loops, as the check. :func:`nsa_decode` is the one-token
step, which reads only what its three branches need: the pooled blocks (kept in a
:class:`NSACache`), the ``top_n`` selected blocks and the window, about
``T / l + top_n l + window`` keys and values instead of all ``T``.
:class:`NativeSparseAttention` is the layer (a TinyLM mixer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .._checks import check_attention_qkv, check_positive_int, check_tensor
from ..attention import KVCache, apply_rope, selected_blocks_attention
from .block import PARTIAL, BlockLayout, block_sparse_attention
from .masks import sliding_window

# numbers of gathered keys and values held at once by the selected branch's gather path
_GATHER_ELEMENTS = 1 << 23

__all__ = [
    "NSACache",
    "NativeSparseAttention",
    "nsa_attention",
    "nsa_compress",
    "nsa_decode",
    "nsa_reference",
    "nsa_select",
]


def _check(q, k, v, gates, block, top_n, window) -> None:
    check_attention_qkv(q, k, v)
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q holds the last Tq of the Tk positions of k: Tq <= Tk, got "
                         f"Tq={q.shape[1]}, Tk={k.shape[1]}")  # fmt: skip
    for name, val in (("block", block), ("top_n", top_n), ("window", window)):
        check_positive_int(name, val)
    want = (*q.shape[:3], 3)
    if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != want:
        got = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be [B, T, Hq, 3] = {list(want)}, got {got}")
    if gates.dtype != q.dtype or gates.device != q.device:
        raise ValueError(f"gates must be {q.dtype} on {q.device} like q, got {gates.dtype} "
                         f"on {gates.device}")  # fmt: skip


def _check_compress(q, k, v, block, qpos) -> None:
    check_attention_qkv(q, k, v)
    check_positive_int("block", block)
    check_tensor("qpos", qpos, ndim=1)
    if qpos.shape[0] != q.shape[1]:
        raise ValueError(f"qpos must have shape [Tq] = [{q.shape[1]}] (one position per "
                         f"query), got {list(qpos.shape)}")  # fmt: skip
    if qpos.device != q.device:
        raise ValueError(f"qpos must be on the device of q ({q.device}), got {qpos.device}")


def _check_select(p_cmp, block, top_n, kv_len) -> None:
    check_tensor("p_cmp", p_cmp, ndim=5, floating=True)
    check_positive_int("block", block)
    check_positive_int("top_n", top_n)
    t, nb = p_cmp.shape[3], p_cmp.shape[4]
    if kv_len is not None:
        check_positive_int("kv_len", kv_len)
        if kv_len < t:
            raise ValueError(f"kv_len must be at least Tq={t} (the queries are the last Tq of "
                             f"kv_len positions), got {kv_len}")  # fmt: skip
    kv = t if kv_len is None else kv_len
    if nb != kv // block:
        raise ValueError(f"p_cmp must score the kv_len // block = {kv} // {block} = "
                         f"{kv // block} complete blocks in its last dimension, got {nb} "
                         f"(shape {tuple(p_cmp.shape)})")  # fmt: skip


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """The mean of every complete block of ``block`` positions: ``[B, T, ...] -> [B, T // block,
    ...]`` (a trailing incomplete block is left out)."""
    nb = x.shape[1] // block
    return x[:, : nb * block].unflatten(1, (nb, block)).mean(2)


def nsa_compress(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float,
    qpos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The compressed branch: every complete block of ``block`` keys and values mean-pooled,
    attended by queries at positions ``qpos``. Returns ``o [B, Tq, Hq, Dv]`` and the
    probabilities ``p [B, G, R, Tq, n_blocks]`` that :func:`nsa_select` ranks blocks by.

    ``q [B, Tq, Hq, D]``, ``k [B, Tk, G, D]``, ``v [B, Tk, G, Dv]`` (``Hq`` a multiple of
    ``G``), ``qpos [Tq]`` the position of every query, on the device of ``q``."""
    _check_compress(q, k, v, block, qpos)
    g = k.shape[2]
    kc, vc = _block_means(k, block), _block_means(v, block)  # [B, nb, G, D], complete blocks
    nb = kc.shape[1]
    qg = rearrange(q, "b t (g r) d -> b g r t d", g=g)
    s = torch.einsum("bgrtd,bjgd->bgrtj", qg, kc) * scale
    ends = (torch.arange(nb, device=q.device) + 1) * block - 1
    done = ends <= qpos[:, None]
    s = s.masked_fill(~done, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a query before the first complete block: 0
    o = torch.einsum("bgrtj,bjgd->btgrd", p, vc)
    return rearrange(o, "b t g r d -> b t (g r) d"), p


def nsa_select(
    p_cmp: torch.Tensor, block: int, top_n: int, kv_len: int | None = None
) -> torch.Tensor:
    """The selected blocks per query and GQA group: ``bool [B, G, Tq, n_blocks]``.

    ``p_cmp [B, G, R, Tq, nb]`` are the compressed-branch probabilities of queries at the
    last ``Tq`` of ``kv_len`` positions (default ``Tq``: self-attention). A block is eligible
    for query ``t`` when it has started (``j l <= t``); the query's own block ``t // l`` is
    always chosen, then the ``top_n - 1`` eligible blocks with the largest group score
    ``sum_r p_cmp`` (ties to the earlier block). ``nb`` must be ``kv_len // block``, the
    complete blocks :func:`nsa_compress` pools; ``block``, ``top_n >= 1``; ``kv_len >= Tq``.
    """
    _check_select(p_cmp, block, top_n, kv_len)
    b, g, _, t, nb = p_cmp.shape
    kv_len = t if kv_len is None else kv_len
    n_all = -(-kv_len // block)  # blocks that exist, the last possibly incomplete
    score = F.pad(p_cmp.sum(2), (0, n_all - nb))  # [B, G, Tq, n_all]; incomplete block: 0
    pos = (kv_len - t + torch.arange(t, device=p_cmp.device))[:, None]
    idx = torch.arange(n_all, device=p_cmp.device)
    own = idx == pos // block
    eligible = idx * block <= pos
    score = torch.where(own, float("inf"), torch.where(eligible, score, float("-inf")))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)[..., :top_n]
    chosen = torch.zeros(b, g, t, n_all, dtype=torch.bool, device=p_cmp.device)
    chosen.scatter_(-1, order, True)
    return chosen & eligible


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block: int = 16,
    top_n: int = 4,
    window: int = 64,
    scale: float | None = None,
    selected: str = "blocks",
    backend: str = "auto",
) -> torch.Tensor:
    """Native Sparse Attention, causal: see the module docstring.

    Args:
        q: ``[B, Tq, Hq, D]``, the queries of the last ``Tq`` positions (``Tq = Tk`` for a
            full pass, 1 when decoding); k, v: ``[B, Tk, Hkv, D]`` (GQA as in chapter 4).
        gates: ``[B, Tq, Hq, 3]`` in (0, 1): compressed, selected, window.
        block: tokens per compression and selection block ``l``.
        top_n: selected blocks per query (the own block included).
        window: the sliding window's width.
        scale: default ``D ** -0.5``.
        selected: how the selected branch runs, all three exact. ``"blocks"``: key-block
            major (:func:`~effarch.attention.selected_blocks_attention`, which MoBA shares),
            the queries that chose a block are gathered and scored against it, all
            blocks in one batched product over tiles of up to 64 (query, block) pairs (as
            tokens routed to an expert are; about ``T top_n`` query rows move, plus the
            padding of each block's last tile, instead of ``T top_n l`` keys);
            ``"gather"``: every query gathers its own ``top_n l`` keys
            and values (simple, memory-bound); ``"tiles"``:
            :func:`~effarch.sparse.block_sparse_attention` on the tiles of ``l x l`` that any
            query of a query block selected (per-query selections as stored tile masks), so
            the Triton kernel runs it on a GPU; the work is the union over the ``l`` queries
            of a tile, the price of dense tiles (NSA's own kernel instead loads, per query,
            the blocks its GQA group shares).
        backend: for the ``"tiles"`` path and the window branch (see
            :func:`~effarch.sparse.block_sparse_attention`).

    Returns:
        ``o [B, T, Hq, Dv]``.
    """
    _check(q, k, v, gates, block, top_n, window)
    if selected not in ("blocks", "gather", "tiles"):
        raise ValueError(f"selected must be 'blocks', 'gather' or 'tiles', got {selected!r}")
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, t, hq, _ = q.shape
    g, tk = k.shape[2], k.shape[1]
    qpos = tk - t + torch.arange(t, device=q.device)
    o_cmp, p_cmp = nsa_compress(q, k, v, block, sc, qpos)
    chosen = nsa_select(p_cmp, block, top_n, tk)  # [B, G, Tq, nb_all]
    tile = [min(64, max(16, 1 << (n - 1).bit_length())) for n in (t, tk)]  # kernel: 2^m
    o_win = block_sparse_attention(q, k, v, sliding_window(window, tk - t), scale=sc,
                                   block_q=tile[0], block_k=tile[1], backend=backend)  # fmt: skip
    if selected != "gather":
        if selected == "tiles":
            o_slc = _selected_by_tiles(q, k, v, chosen, qpos, block, sc, backend)
        else:
            o_slc = selected_blocks_attention(q, k, v, chosen, block_size=block, scale=sc)
        branches = torch.stack([o_cmp, o_slc, o_win], dim=-1)
        return (branches * gates[..., None, :]).sum(-1)
    # gather the selected blocks of every query: n = top_n blocks of l tokens
    slots = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[..., :top_n]
    valid = torch.gather(chosen, -1, slots)  # [B, G, T, n]
    cols = slots[..., None] * block + torch.arange(block, device=q.device)  # [B, G, T, n, l]
    keep = (valid[..., None] & (cols <= qpos[:, None, None])).flatten(-2)  # causal in own block
    # keys and values as whole blocks, rows of [B G n_all, l D]: a gather copies a block
    n_all = chosen.shape[-1]
    kb, vb = (F.pad(x, (0, 0, 0, 0, 0, n_all * block - tk)).unflatten(1, (n_all, block))
              .permute(0, 3, 1, 2, 4).flatten(0, 2).flatten(1) for x in (k, v))  # fmt: skip
    first = ((torch.arange(b, device=q.device)[:, None] * g + torch.arange(g, device=q.device))
             * n_all)[..., None, None]  # row of block 0 of (b, g) in kb  # fmt: skip
    qg = rearrange(q, "b t (g r) d -> b g r t d", g=g)
    o_slc = q.new_empty(b, t, hq, v.shape[-1])
    # queries in chunks, so the gathered keys stay under _GATHER_ELEMENTS numbers
    per_query = b * g * top_n * block * (k.shape[-1] + v.shape[-1])
    chunk = max(1, _GATHER_ELEMENTS // per_query)
    for t0 in range(0, t, chunk):
        c = slots[:, :, t0 : t0 + chunk]  # [B, G, c, n]
        rows = (first + c).flatten()  # index_select of whole blocks: one copy of l D numbers
        kg = kb.index_select(0, rows).view(*c.shape[:3], c.shape[3] * block, k.shape[-1])
        vg = vb.index_select(0, rows).view(*c.shape[:3], c.shape[3] * block, v.shape[-1])
        s = torch.einsum("bgrtd,bgtjd->bgrtj", qg[:, :, :, t0 : t0 + chunk], kg) * sc
        s = s.masked_fill(~keep[:, :, None, t0 : t0 + chunk], float("-inf"))
        p = torch.softmax(s, -1)  # the own block always holds the query itself: never empty
        o = torch.einsum("bgrtj,bgtjd->btgrd", p, vg)
        o_slc[:, t0 : t0 + chunk] = rearrange(o, "b t g r d -> b t (g r) d")
    branches = torch.stack([o_cmp, o_slc, o_win], dim=-1)  # [B, T, Hq, Dv, 3]
    return (branches * gates[..., None, :]).sum(-1)


def _selected_by_tiles(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen: torch.Tensor, qpos: torch.Tensor,
    block: int, scale: float, backend: str,
) -> torch.Tensor:  # fmt: skip
    """The selected branch as block-sparse attention over ``block x block`` tiles: a tile is
    visited when any query of its query block chose its key block, and masked by the
    per-query choices (and causality inside the own block)."""
    b, t, hq, _ = q.shape
    g, tk = k.shape[2], k.shape[1]
    r = hq // g
    nq = -(-t // block)
    pad = F.pad(chosen, (0, 0, 0, nq * block - t))  # [B, G, nq * l, nk]
    hit = pad.unflatten(2, (nq, block)).any(3)  # [B, G, nq, nk]
    kind = repeat(hit.to(torch.int8) * PARTIAL, "b g i j -> b (g r) i j", r=r)
    layout = BlockLayout(kind.contiguous(), t, tk, block, block)
    off = tk - t

    def mask_mod(bb, hh, i, j):
        row = i.clamp(max=t - 1)
        return chosen[bb, hh // r, row, j // block] & (j <= i + off)

    return block_sparse_attention(q, k, v, mask_mod, block_q=block, block_k=block,
                                  layout=layout, scale=scale, backend=backend)  # fmt: skip


def nsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block: int = 16,
    top_n: int = 4,
    window: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`nsa_attention` one query and one head at a time, in plain loops (the check);
    self-attention (``Tq = Tk``) only."""
    _check(q, k, v, gates, block, top_n, window)
    if q.shape[1] != k.shape[1]:
        raise ValueError("nsa_reference takes Tq = Tk")
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, t, hq, _ = q.shape
    g = k.shape[2]
    r = hq // g
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=q.dtype)

    def attend(qv, keys, values):
        if len(keys) == 0:
            return torch.zeros(v.shape[-1], dtype=q.dtype)
        w = torch.softmax(torch.stack([qv @ key for key in keys]) * sc, 0)
        return sum(wi * vi for wi, vi in zip(w, values, strict=True))

    for bi in range(b):
        for ti in range(t):
            complete = [j for j in range((ti + 1) // block)]  # blocks ending at or before t
            pooled_k = [k[bi, j * block : (j + 1) * block].mean(0) for j in complete]
            pooled_v = [v[bi, j * block : (j + 1) * block].mean(0) for j in complete]
            # group scores of the compressed probabilities
            group_p = {}
            for h in range(hq):
                gh = h // r
                qv = q[bi, ti, h]
                if complete:
                    s = torch.stack([qv @ pooled_k[j][gh] for j in complete]) * sc
                    for j, wj in zip(complete, torch.softmax(s, 0), strict=True):
                        group_p[(gh, j)] = group_p.get((gh, j), 0.0) + wj.item()
            for h in range(hq):
                gh, qv = h // r, q[bi, ti, h]
                o_cmp = attend(qv, [pk[gh] for pk in pooled_k], [pv[gh] for pv in pooled_v])
                own = ti // block
                started = [j for j in range(own)]  # blocks before the own one have started
                ranked = sorted(started, key=lambda j: (-group_p.get((gh, j), 0.0), j))
                picked = [own] + ranked[: top_n - 1]
                toks = sorted(s for j in picked for s in range(j * block, (j + 1) * block)
                              if s <= ti)  # fmt: skip
                o_slc = attend(qv, [k[bi, s, gh] for s in toks], [v[bi, s, gh] for s in toks])
                recent = range(max(0, ti - window + 1), ti + 1)
                o_win = attend(qv, [k[bi, s, gh] for s in recent], [v[bi, s, gh] for s in recent])
                gt = gates[bi, ti, h]
                out[bi, ti, h] = gt[0] * o_cmp + gt[1] * o_slc + gt[2] * o_win
    return out


def nsa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pooled: torch.Tensor,
    v_pooled: torch.Tensor,
    gates: torch.Tensor,
    *,
    block: int = 16,
    top_n: int = 4,
    window: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    r"""One NSA decoding step: the newest query against a cache, reading only what it needs.

    The query sits at position ``t = Tk - 1``. With ``n_c = Tk // l`` complete blocks pooled
    beforehand (``kc_j = mean(k_{jl..jl+l-1})``, kept by :class:`NSACache`):

    .. math::
        p^{cmp} = \mathrm{softmax}_j(q \cdot kc_j / \sqrt d),\ j < n_c;\quad
        \mathcal S = \{t // l\} \cup \mathrm{top}_{n-1}\big(\textstyle\sum_r p^{cmp}_r\big);\quad
        o = g^{cmp} \textstyle\sum_j p^{cmp}_j vc_j + g^{slc}\,\mathrm{attn}(q, K_{\mathcal S})
            + g^{win}\,\mathrm{attn}(q, K_{t-w+1..t})

    with ``n = min(top_n, ceil(Tk / l))`` blocks in all: the own block ``t // l`` and the
    ``n - 1`` best of the others (ties to the earlier block), as :func:`nsa_select`.

    It copies out only the ``top_n`` selected blocks and slices the window, so a step reads
    ``n_c + top_n l + window`` of the ``Tk`` cached keys and values (plus ``O(n_c)`` work to
    score and rank the blocks), where :func:`nsa_attention` re-pools and scores the whole
    cache. It equals ``nsa_attention(q, k, v, gates, ...)`` with ``Tq = 1`` (tested against
    :func:`nsa_reference`). The means must have been pooled with the same ``block``: their
    shape cannot tell.

    Args:
        q: ``[B, 1, Hq, D]``, the newest query.
        k, v: ``[B, Tk, Hkv, D]`` and ``[B, Tk, Hkv, Dv]``, every cached key and value, the
            newest included.
        k_pooled, v_pooled: ``[B, >= Tk // block, Hkv, D]``, the block means of ``k`` and
            ``v`` (rows past ``Tk // block`` are ignored); any strides, and read in place
            when stored head-major (:meth:`NSACache.pooled`'s views), else copied per step.
        gates: ``[B, 1, Hq, 3]`` in (0, 1): compressed, selected, window.
        block, top_n, window, scale: as in :func:`nsa_attention`.

    Returns:
        ``o [B, 1, Hq, Dv]``.
    """
    _check(q, k, v, gates, block, top_n, window)
    if q.shape[1] != 1:
        raise ValueError(f"q must hold one query [B, 1, Hq, D] to decode, got {tuple(q.shape)}")
    b, _, hq, d = q.shape
    tk, g = k.shape[1], k.shape[2]
    n_c, n_all = tk // block, -(-tk // block)
    for name, x, like in (("k_pooled", k_pooled, k), ("v_pooled", v_pooled, v)):
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < n_c
                or (x.shape[0], *x.shape[2:]) != (b, *like.shape[2:])):  # fmt: skip
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [{b}, >= {n_c}, {g}, {like.shape[-1]}] (the "
                             f"block means of {tk} tokens), got {got}")  # fmt: skip
        if x.dtype != like.dtype or x.device != like.device:
            raise ValueError(f"{name} must be {like.dtype} on {like.device} like the cache, "
                             f"got {x.dtype} on {x.device}")  # fmt: skip
    sc = d**-0.5 if scale is None else float(scale)
    qg = q[:, 0].view(b, g, hq // g, d)  # [B, G, R, D]
    # compressed: every complete block, pooled beforehand; head-major views [B, G, n_c, D]
    # (free when the means are stored head-major, as NSACache does: no copy of the cache)
    kc, vc = (x[:, :n_c].transpose(1, 2) for x in (k_pooled, v_pooled))
    p = torch.softmax(torch.einsum("bgrd,bgjd->bgrj", qg, kc) * sc, -1)
    o_cmp = torch.einsum("bgrj,bgjd->bgrd", p, vc)
    # selected: the own block first, then the best-scored, ties to the earlier block (as
    # nsa_select's stable sort), found in O(n_all) by a threshold instead of a sort
    score = F.pad(p.sum(2), (0, n_all - n_c))  # [B, G, n_all]; an incomplete block scores 0
    score[..., (tk - 1) // block] = float("inf")
    n = min(top_n, n_all)
    kth = torch.topk(score, n, dim=-1).values[..., -1:]  # the n-th best score
    above, tied = score > kth, score == kth
    room = n - above.sum(-1, keepdim=True)  # places left for blocks tied at the threshold
    chosen = above | (tied & (tied.cumsum(-1) <= room))  # exactly n blocks
    chosen = torch.topk(chosen.to(score.dtype), n, dim=-1).indices  # their indices [B, G, n]
    cols = (chosen[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)
    bi = torch.arange(b, device=q.device)[:, None, None]
    gi = torch.arange(g, device=q.device)[None, :, None]
    valid = cols < tk  # the own block may be incomplete: its later slots are not keys yet
    cols = cols.clamp(max=tk - 1)
    k_sel, v_sel = k[bi, cols, gi], v[bi, cols, gi]  # [B, G, n l, D]: only these are read
    s = torch.einsum("bgrd,bgjd->bgrj", qg, k_sel) * sc
    p_slc = torch.softmax(s.masked_fill(~valid[:, :, None], float("-inf")), -1)
    o_slc = torch.einsum("bgrj,bgjd->bgrd", p_slc, v_sel)
    # window: the last `window` keys, a slice
    w = min(window, tk)
    s = torch.einsum("bgrd,bjgd->bgrj", qg, k[:, tk - w :]) * sc
    o_win = torch.einsum("bgrj,bjgd->bgrd", torch.softmax(s, -1), v[:, tk - w :])
    branches = torch.stack([o_cmp, o_slc, o_win], -1).flatten(1, 2)  # [B, Hq, Dv, 3]
    return (branches * gates[:, 0, :, None, :]).sum(-1)[:, None]


class NSACache(KVCache):
    """A :class:`~effarch.attention.KVCache` that also keeps the block means NSA's
    compressed branch attends; :meth:`pooled` returns them as ``[B, n, G, D]`` views.

    ``update(k, v)`` appends as a KV cache does and pools every block the new tokens
    complete, so a decoding step reads ``T / block`` pooled keys instead of re-pooling all
    ``T``. It holds ``2 G D (T + T // block)`` numbers. (The paper's NSA gives each branch
    its own keys and values and pools overlapping blocks with a learned MLP; this layer
    shares one set and mean-pools disjoint blocks.)
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        block: int,
        *,
        head_dim_v: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch, max_len, n_kv_heads, head_dim, head_dim_v=head_dim_v,
                         dtype=dtype, device=device)  # fmt: skip
        self.block = check_positive_int("block", block)
        # stored head-major, [B, G, max_len // block, D], so a step's scores read them in place
        self._k_pooled = self.k.new_zeros(batch, n_kv_heads, max_len // block, head_dim)
        self._v_pooled = self.v.new_zeros(batch, n_kv_heads, max_len // block, self.v.shape[-1])
        self.n_pooled = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(k, v)
        done = self.length // self.block
        if done > self.n_pooled:  # the blocks the new tokens completed
            lo, hi = self.n_pooled * self.block, done * self.block
            for x, pooled in ((keys, self._k_pooled), (values, self._v_pooled)):
                means = _block_means(x[:, lo:hi], self.block)  # [B, n, G, D]
                pooled[:, :, self.n_pooled : done] = means.transpose(1, 2)
            self.n_pooled = done
        return keys, values

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the block means of every complete block held, ``[B, length // block, G, D]``
        (the book's layout, as views of head-major storage)."""
        n = self.n_pooled
        return self._k_pooled[:, :, :n].transpose(1, 2), self._v_pooled[:, :, :n].transpose(1, 2)

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.n_pooled = min(self.n_pooled, length // self.block)

    def nbytes(self) -> int:
        """Bytes held by the filled part: keys and values plus their block means."""
        k_pooled, v_pooled = self.pooled()
        return super().nbytes() + (k_pooled.numel() + v_pooled.numel()) * self.k.element_size()


class NativeSparseAttention(nn.Module):
    """An NSA layer: projections, RoPE, per-head sigmoid gates, :func:`nsa_attention`.

    ``forward(x [B, T, d], cache=None) -> [B, T, d]``; with a KV cache (:meth:`new_cache`)
    the new tokens follow those cached, and decoding token by token equals the full pass.
    Queries, keys and values are shared by the three
    branches (NSA gives each branch its own keys and values; sharing keeps the layer the size
    of an attention layer); the gates are ``sigmoid(W_g x)``, one per head and branch.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
                 block: int = 16, top_n: int = 4, window: int = 64,
                 rope_base: float = 10000.0) -> None:  # fmt: skip
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        g = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        if d_model % n_heads or n_heads % g:
            raise ValueError(f"n_heads must divide d_model and n_kv_heads must divide n_heads, "
                             f"got {d_model}, {n_heads}, {g}")  # fmt: skip
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, g, d_model // n_heads
        self.block, self.top_n, self.window_len, self.rope_base = block, top_n, window, rope_base
        dh = self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d_model, g * dh, bias=False)
        self.v_proj = nn.Linear(d_model, g * dh, bias=False)
        self.g_proj = nn.Linear(d_model, n_heads * 3)
        self.o_proj = nn.Linear(n_heads * dh, d_model, bias=False)

    def new_cache(self, batch: int, max_len: int) -> NSACache:
        """An empty :class:`NSACache` (keys, values and their block means) for decoding."""
        w = self.k_proj.weight
        return NSACache(batch, max_len, self.n_kv_heads, self.head_dim, self.block,
                        dtype=w.dtype, device=w.device)  # fmt: skip

    def state_size(self, seq_len: int) -> int:
        """Cached numbers after ``seq_len`` tokens: every key and value and the block means of
        the complete blocks, ``2 G d_h (T + T // l)`` (NSA reads sparsely but keeps every key
        and value, since any block may be selected later)."""
        check_positive_int("seq_len", seq_len)
        return 2 * (seq_len + seq_len // self.block) * self.n_kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        dh = self.head_dim
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + t, device=x.device)
        q = apply_rope(self.q_proj(x).view(b, t, self.n_heads, dh), pos, base=self.rope_base)
        k = apply_rope(self.k_proj(x).view(b, t, self.n_kv_heads, dh), pos, base=self.rope_base)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, dh)
        if cache is not None:
            k, v = cache.update(k, v)
        gates = torch.sigmoid(self.g_proj(x)).view(b, t, self.n_heads, 3)
        kw = dict(block=self.block, top_n=self.top_n, window=self.window_len)
        if t == 1 and isinstance(cache, NSACache) and cache.block == self.block:
            o = nsa_decode(q, k, v, *cache.pooled(), gates, **kw)  # reads a fraction
        else:
            o = nsa_attention(q, k, v, gates, **kw)
        return self.o_proj(o.reshape(b, t, -1))
