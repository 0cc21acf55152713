r"""Masked attention, its block layout, and block-sparse attention (chapters 3.1 and 3.4).

:func:`masked_attention` is the dense reference: every score, then the mask,

.. math::  o_i = \sum_j \mathrm{softmax}_j\big(s_{ij} + \log M_{ij}\big)\, v_j,
           \qquad s_{ij} = \mathrm{scale}\; q_i \cdot k_j,

with ``o_i = 0`` for a query that sees no key. It costs ``Tq Tk`` whatever the mask.

A sparse pattern pays only where the mask is non-zero if the work is cut into tiles:
:func:`block_layout` sorts every ``block_q x block_k`` tile into *empty* (skipped), *full*
(computed without a mask) or *partial* (computed, then masked), the three kinds
FlexAttention's ``BlockMask`` distinguishes (its ``kv_num_blocks``/``kv_indices`` list the
partial tiles of each query block, ``full_kv_num_blocks``/``full_kv_indices`` the full ones).
Positions past ``Tq`` or ``Tk`` in a ragged last tile count as masked, so such a tile is never
full. :func:`block_sparse_attention` computes only the non-empty tiles; its cost is the
layout's :attr:`BlockLayout.density` times the dense cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from effarch_kernels.limits import head_dim_reason, tile_size_reason
from einops import rearrange

from .._checks import check_attention_qkv, check_positive_int
from .._kernels import use_triton
from .masks import MaskMod, dense_mask, mask_band

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockLayout",
    "block_layout",
    "block_sparse_attention",
    "kernel_tables",
    "masked_attention",
]

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile kinds in :attr:`BlockLayout.kind`."""

# query rows evaluated at once while building a layout (bounds the dense mask held in memory)
_LAYOUT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BlockLayout:
    """The kind of every tile of a mask: ``kind [B, H, ceil(Tq / bq), ceil(Tk / bk)]`` int8.

    ``EMPTY = 0`` (no pair attends), ``PARTIAL = 1`` (some do), ``FULL = 2`` (all do). The
    FlexAttention ``BlockMask`` fields are derived from it (indices ascending, unused slots
    hold 0, where FlexAttention's hold the remaining block indices).
    """

    kind: torch.Tensor
    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    def _indices(self, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.kind == which
        n = hit.sum(-1).to(torch.int32)
        nk = hit.shape[-1]
        cols = torch.arange(nk, device=hit.device)
        order = torch.where(hit, cols, nk + cols)
        idx = order.sort(-1).values
        idx = torch.where(idx < nk, idx, 0).to(torch.int32)
        return n, idx

    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """Partial tiles per query block ``[B, H, nq]`` (FlexAttention's ``kv_num_blocks``)."""
        return self._indices(PARTIAL)[0]

    @property
    def kv_indices(self) -> torch.Tensor:
        """Their key-block indices ``[B, H, nq, nk]``, the first ``kv_num_blocks`` valid."""
        return self._indices(PARTIAL)[1]

    @property
    def full_kv_num_blocks(self) -> torch.Tensor:
        """Full tiles per query block ``[B, H, nq]``."""
        return self._indices(FULL)[0]

    @property
    def full_kv_indices(self) -> torch.Tensor:
        """Their key-block indices ``[B, H, nq, nk]``, the first ``full_kv_num_blocks`` valid."""
        return self._indices(FULL)[1]

    @property
    def density(self) -> float:
        """Fraction of the ``Tq x Tk`` score matrix that lies in non-empty tiles (clipped to
        the matrix), averaged over batch and heads: the work of block-sparse attention
        relative to dense attention."""
        rows = torch.full((self.kind.shape[-2],), self.block_q, dtype=torch.float64)
        rows[-1] = self.q_len - self.block_q * (len(rows) - 1)
        cols = torch.full((self.kind.shape[-1],), self.block_k, dtype=torch.float64)
        cols[-1] = self.kv_len - self.block_k * (len(cols) - 1)
        area = rows[:, None] * cols[None, :]
        used = ((self.kind.cpu() != EMPTY) * area).sum(dim=(-1, -2)).mean()
        return float(used / (self.q_len * self.kv_len))


def block_layout(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
    batch: int = 1,
    heads: int = 1,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Sort the tiles of ``mask_mod`` into empty, partial and full (see :class:`BlockLayout`).

    Matches ``torch.nn.attention.flex_attention.create_block_mask(mask_mod, batch, heads,
    q_len, kv_len, BLOCK_SIZE=(block_q, block_k))`` (tested): ``kv_num_blocks`` and
    ``full_kv_num_blocks`` are equal, and ``kv_indices`` / ``full_kv_indices`` (same shape)
    are equal on the first ``kv_num_blocks`` / ``full_kv_num_blocks`` entries of each row,
    ascending in both; the unused slots after them differ (0 here, the remaining block
    indices in FlexAttention's). The mask is evaluated a few query blocks at a time, except
    for a declared diagonal band (:func:`~effarch.sparse.masks.mask_band`: causal,
    sliding windows), whose tiles are sorted from their corners in ``O(nq nk)``.
    """
    for name, val in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q),
                      ("block_k", block_k), ("batch", batch), ("heads", heads)):  # fmt: skip
        check_positive_int(name, val)
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    diagonals = mask_band(mask_mod)
    if diagonals is not None:  # the same kinds for every batch and head
        corners = _band_kinds(diagonals, q_len, kv_len, block_q, block_k, device)
        return BlockLayout(corners.expand(batch, heads, nq, nk).contiguous(), q_len, kv_len,
                           block_q, block_k)  # fmt: skip
    per_pass = max(1, _LAYOUT_ELEMENTS // (batch * heads * block_q * nk * block_k))
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    b, h = ar(batch).view(-1, 1, 1, 1), ar(heads).view(1, -1, 1, 1)
    kv = ar(nk * block_k).view(1, 1, 1, -1)
    kinds = []
    for i0 in range(0, nq, per_pass):
        rows = ar(min(per_pass, nq - i0) * block_q).view(1, 1, -1, 1) + i0 * block_q
        m = mask_mod(b, h, rows, kv)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError("mask_mod must return a bool tensor")
        m = m & (rows < q_len) & (kv < kv_len)  # padding past the ends never attends
        # a mask that reads neither b nor h keeps size 1 there: its tiles are sorted once
        # and the kinds repeated, not the mask evaluated again per batch and head
        m = m.expand(m.shape[0], m.shape[1], rows.shape[2], kv.shape[3])
        tiles = rearrange(m, "b h (i r) (j c) -> b h i j (r c)", r=block_q, c=block_k)
        kind = torch.where(tiles.all(-1), FULL, torch.where(tiles.any(-1), PARTIAL, EMPTY))
        kinds.append(kind.to(torch.int8).expand(batch, heads, -1, -1))
    return BlockLayout(torch.cat(kinds, dim=2), q_len, kv_len, block_q, block_k)


def _band_kinds(
    diagonals: tuple[int, int | None], q_len: int, kv_len: int, block_q: int, block_k: int,
    device: torch.device | str | None,
) -> torch.Tensor:  # fmt: skip
    """Tile kinds ``[nq, nk]`` of the band ``lo <= i - j < hi`` from each tile's corners.

    Over the valid rows ``i0 .. i1`` and columns ``j0 .. j1`` of a tile, ``i - j`` takes every
    integer from ``i0 - j1`` to ``i1 - j0``: the tile is empty when that range misses
    ``[lo, hi)``, full when it lies inside and the tile is not cut by the ends, else partial.
    """
    lo, hi = diagonals
    rows = torch.arange(0, q_len, block_q, device=device)
    cols = torch.arange(0, kv_len, block_k, device=device)
    i0, i1 = rows[:, None], (rows + block_q).clamp(max=q_len)[:, None] - 1
    j0, j1 = cols[None, :], (cols + block_k).clamp(max=kv_len)[None, :] - 1
    d_min, d_max = i0 - j1, i1 - j0
    whole = (i1 - i0 + 1 == block_q) & (j1 - j0 + 1 == block_k)
    meets, inside = d_max >= lo, d_min >= lo
    if hi is not None:  # an empty band (hi <= lo, say from and_masks) meets no tile
        meets, inside = meets & (d_min < hi) & (lo < hi), inside & (d_max < hi)
    kind = torch.where(inside & whole, FULL, torch.where(meets, PARTIAL, EMPTY))
    return kind.to(torch.int8)


def kernel_tables(
    layout: BlockLayout, mask_mod: MaskMod, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """What the Triton kernel reads: tile ids, per-block lists and the partial tiles' masks.

    Returns ``tile_id [B', H', nq, nk]`` int32 (-2 empty, -1 full, p >= 0 the p-th partial
    tile), ``kv_count``/``kv_list`` (each query block's non-empty key blocks, ascending),
    ``q_count``/``q_list`` (each key block's query blocks) and ``tile_masks [n_partial,
    block_q, block_k]`` int8, ``mask_mod`` evaluated on the partial tiles (0 past the ends).
    """
    kind = layout.kind.to(device)
    bq, bk = layout.block_q, layout.block_k
    partial = (kind == PARTIAL).nonzero()  # [n_p, 4]: b, h, i, j
    tile_id = torch.full(kind.shape, -2, dtype=torch.int32, device=kind.device)
    tile_id[kind == FULL] = -1
    tile_id[kind == PARTIAL] = torch.arange(len(partial), dtype=torch.int32, device=kind.device)
    bb, hh = partial[:, 0, None, None], partial[:, 1, None, None]
    rows = partial[:, 2, None, None] * bq + torch.arange(bq, device=kind.device)[:, None]
    cols = partial[:, 3, None, None] * bk + torch.arange(bk, device=kind.device)
    m = mask_mod(bb, hh, rows, cols) & (rows < layout.q_len) & (cols < layout.kv_len)
    tile_masks = m.expand(len(partial), bq, bk).to(torch.int8).contiguous()
    if len(partial) == 0:
        tile_masks = torch.zeros(1, bq, bk, dtype=torch.int8, device=kind.device)
    used = kind != EMPTY

    def lists(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[-1]
        ar = torch.arange(n, device=x.device)
        order = torch.where(x, ar, n + ar).sort(-1).values
        return x.sum(-1).to(torch.int32), torch.where(order < n, order, 0).to(torch.int32)

    kv_count, kv_list = lists(used)
    q_count, q_list = lists(used.transpose(-1, -2))
    return {
        "tile_id": tile_id.contiguous(),
        "kv_count": kv_count.contiguous(),
        "kv_list": kv_list.contiguous(),
        "q_count": q_count.contiguous(),
        "q_list": q_list.contiguous(),
        "tile_masks": tile_masks,
    }


class _BlockSparseKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, tables: dict, block_q: int, block_k: int, scale: float):  # type: ignore[override]
        from effarch_kernels.block_sparse_attention import block_sparse_forward

        t = tables
        o, lse = block_sparse_forward(q, k, v, t["tile_id"], t["kv_count"], t["kv_list"],
                                      t["tile_masks"], block_q, block_k, scale)  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.tables, ctx.blocks, ctx.scale = tables, (block_q, block_k), scale
        return o

    @staticmethod
    def backward(ctx: Any, do):  # type: ignore[override]
        from effarch_kernels.block_sparse_attention import block_sparse_backward

        q, k, v, o, lse = ctx.saved_tensors
        t = ctx.tables
        dq, dk, dv = block_sparse_backward(
            do, q, k, v, o, lse, t["tile_id"], t["kv_count"], t["kv_list"], t["q_count"],
            t["q_list"], t["tile_masks"], *ctx.blocks, ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``s [B, G, R, Tq, Tk]`` for ``q [B, Tq, G*R, D]``, ``k [B, Tk, G, D]`` (GQA, no copies)."""
    qg = rearrange(q, "b i (g r) d -> b g r i d", g=k.shape[2])
    return torch.einsum("bgrid,bjgd->bgrij", qg, k) * scale


def _masked_softmax_out(s: torch.Tensor, keep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax of ``s`` over keys where ``keep``, times ``v [B, Tk, G, Dv]``; empty rows 0.
    Returns ``[B, Tq, G*R, Dv]``."""
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no key: 0, not NaN
    o = torch.einsum("bgrij,bjgd->bigrd", p, v.to(p.dtype))
    return rearrange(o, "b i g r d -> b i (g r) d")


def _scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention under any pattern: the reference every sparse form is checked against.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` (GQA:
            ``Hkv`` divides ``Hq``, query head ``h`` reads key head ``h // (Hq / Hkv)``).
        mask_mod: the pattern (:mod:`effarch.sparse.masks`), called with the query head
            index ``h``.
        scale: default ``D ** -0.5``.

    Returns:
        ``o [B, Tq, Hq, Dv]`` in ``q``'s dtype (half precision computed in float32). Equals
        ``F.scaled_dot_product_attention`` with ``attn_mask = dense_mask(...)`` wherever a row
        sees at least one key; rows that see none are 0 (SDPA gives NaN there).
    """
    check_attention_qkv(q, k, v)
    sc = _scale(scale, q.shape[-1])
    b, tq, hq, _ = q.shape
    tk, g = k.shape[1], k.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    keep = dense_mask(mask_mod, tq, tk, batch=b, heads=hq, device=q.device)
    keep = rearrange(keep, "b (g r) i j -> b g r i j", g=g)
    s = _grouped_scores(q.to(work), k.to(work), sc)
    return _masked_softmax_out(s, keep, v).to(q.dtype)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: MaskMod,
    *,
    block_q: int = 128,
    block_k: int = 128,
    backend: str = "auto",
    layout: BlockLayout | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`masked_attention` computed only on the non-empty tiles of the mask.

    For each query block, the key blocks that any batch or head needs are gathered (empty
    tiles are never touched), scores are formed for them alone, ``mask_mod`` is evaluated on
    the partial tiles only (full tiles need no mask), and one softmax runs over the gathered
    keys. Work and memory per query block are proportional to its non-empty key blocks, so a
    sliding window costs ``O(T w)`` instead of ``O(T^2)``.

    Args:
        q, k, v, mask_mod, scale: as :func:`masked_attention`.
        block_q, block_k: tile sizes (FlexAttention's ``BLOCK_SIZE``).
        backend: ``"torch"`` (gather the used key blocks per query block in PyTorch),
            ``"triton"`` (the block-sparse FlashAttention kernel, forward and backward, of
            ``effarch_kernels.block_sparse_attention``; tiles must be powers of two >= 16)
            or ``"auto"`` (the kernel on a CUDA tensor it can take, else PyTorch).
        layout: a precomputed :func:`block_layout` for these shapes and tiles (built when
            ``None``).

    Returns:
        ``o [B, Tq, Hq, Dv]``, equal to :func:`masked_attention` (rows without keys: 0).
    """
    check_attention_qkv(q, k, v)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    sc = _scale(scale, q.shape[-1])
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    if layout is None:
        layout = block_layout(mask_mod, tq, tk, block_q=block_q, block_k=block_k, batch=b,
                              heads=hq, device=q.device)  # fmt: skip
    elif not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    elif (layout.q_len, layout.kv_len, layout.block_q, layout.block_k) != (tq, tk, block_q,
                                                                             block_k):  # fmt: skip
        raise ValueError(
            f"layout was built for Tq={layout.q_len}, Tk={layout.kv_len}, tiles "
            f"{layout.block_q}x{layout.block_k}; got Tq={tq}, Tk={tk}, tiles {block_q}x{block_k}"
        )
    if layout.kind.shape[0] not in (1, b) or layout.kind.shape[1] not in (1, hq):
        raise ValueError(
            f"layout must be for batch {b} (or 1) and {hq} heads (or 1), got "
            f"{tuple(layout.kind.shape[:2])}"
        )
    limit = tile_size_reason(block_q, block_k) or head_dim_reason(max(q.shape[-1], v.shape[-1]))
    if use_triton(backend, q, k, v, limit=limit):
        tables = kernel_tables(layout, mask_mod, q.device)
        return _BlockSparseKernel.apply(q, k, v, tables, block_q, block_k, sc)
    tables = kernel_tables(layout, mask_mod, q.device)
    return _gathered_attention(q, k, v, tables, block_q, block_k, sc)


# scores computed at once by the PyTorch path (elements); bounds its memory
_GATHER_ELEMENTS = 1 << 22


def _gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: dict[str, torch.Tensor],
    block_q: int,
    block_k: int,
    scale: float,
) -> torch.Tensor:
    """The PyTorch block-sparse path: for every query block, gather the key blocks that any
    batch or head uses (padded to the longest list), score them in one batched product,
    keep full tiles, apply the stored masks of partial ones, drop empty and padding slots.
    Query blocks go through in groups so the scores held stay under ``_GATHER_ELEMENTS``."""
    b, tq, hq, _ = q.shape
    tk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    work = torch.promote_types(q.dtype, torch.float32)
    tile_id, tile_masks = tables["tile_id"], tables["tile_masks"]  # [B', H', nq, nk]
    nq = tile_id.shape[2]
    used = (tile_id != -2).flatten(0, 1).any(0)  # [nq, nk]: used by some batch or head
    n_max = int(used.sum(-1).max())
    out = q.new_zeros(b, nq * block_q, hq, dv, dtype=work)
    if n_max == 0:
        return out[:, :tq].to(q.dtype)
    ar_k = torch.arange(used.shape[1], device=q.device)
    slots = torch.where(used, ar_k, used.shape[1] + ar_k).sort(-1).values[:, :n_max]
    valid = slots < used.shape[1]  # [nq, n_max]
    slots = torch.where(valid, slots, 0)
    cols = slots[..., None] * block_k + torch.arange(block_k, device=q.device)  # [nq, n, bk]
    col_ok = valid[..., None] & (cols < tk)
    cols = torch.where(col_ok, cols, 0).flatten(1)  # [nq, n_max * bk]
    # the tile id of every gathered slot, per (b', h'); padding slots count as empty
    tid = torch.gather(tile_id, 3, slots.expand(*tile_id.shape[:2], nq, n_max).long())
    tid = torch.where(valid, tid, -2)
    n_p = tile_masks.shape[0]
    full, empty = torch.zeros_like(tile_masks[:1]), torch.ones_like(tile_masks[:1])
    drop_tiles = torch.cat([tile_masks == 0, full.bool(), empty.bool()])
    slot_of = torch.where(tid >= 0, tid, torch.where(tid == -1, n_p, n_p + 1)).long()
    qp = F.pad(q, (0, 0, 0, 0, 0, nq * block_q - tq)).to(work)
    qp = rearrange(qp, "b (n i) (g r) d -> b n g r i d", i=block_q, g=g)
    training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    per_block = b * hq * block_q * n_max * block_k
    group = max(1, _GATHER_ELEMENTS // per_block)
    for n0 in range(0, nq, group):
        n1 = min(nq, n0 + group)
        c = cols[n0:n1]  # [nc, J]
        kg = k[:, c].to(work)  # [B, nc, J, G, D]
        vg = v[:, c].to(work)
        s = torch.einsum("bngrid,bnjgd->bngrij", qp[:, n0:n1] * scale, kg)
        # which scores to drop, per gathered slot: a partial tile's stored mask inverted,
        # nothing for a full tile, everything for an empty or padding slot (one lookup)
        drop = drop_tiles[slot_of[:, :, n0:n1]]  # [B', H', nc, n_max, bq, bk]
        drop = drop.permute(0, 2, 1, 4, 3, 5)  # [B', nc, H', bq, n_max, bk], no copy
        drop = drop.unflatten(2, (g, hq // g)) if drop.shape[2] > 1 else drop.unsqueeze(2)
        if training:  # out of place, so autograd keeps what it saved
            s = s.view(*s.shape[:-1], n_max, block_k).masked_fill(drop, float("-inf"))
            s = s.flatten(-2)
            m = s.detach().amax(-1, keepdim=True)
            s = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
        else:
            s.view(*s.shape[:-1], n_max, block_k).masked_fill_(drop, float("-inf"))
            m = s.amax(-1, keepdim=True)
            s.sub_(torch.where(torch.isfinite(m), m, 0.0)).exp_()
        denom = s.sum(-1)  # [B, nc, G, R, bq]
        o = torch.einsum("bngrij,bnjgd->bnigrd", s, vg)
        denom = rearrange(denom, "b n g r i -> b n i g r 1")
        o = torch.where(denom > 0, o / denom.clamp_min(torch.finfo(work).tiny), 0.0)
        out[:, n0 * block_q : n1 * block_q] = rearrange(o, "b n i g r d -> b (n i) (g r) d")
    return out[:, :tq].to(q.dtype)
