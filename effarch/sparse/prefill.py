r"""Training-free sparse *prefill*: estimate each head's pattern from the prompt, then attend
only there (chapter 3.3).

Decoding policies (:mod:`effarch.sparse.kv_policies`) choose what to keep; prefill methods
choose what to compute. Both need a cheap estimate of where a head's attention goes before
computing it. A :class:`PrefillPattern` maps the prompt's rotated ``q, k`` of one layer to a
per-head ``mask_mod`` (3.1's convention); :func:`sparse_prefill` runs the block-sparse
attention of 3.4 on it, and :func:`prefill_nll` runs a whole Llama-family model that way.

=======================  =====================================================================
:class:`VerticalSlash`   MInference's "vertical-slash" pattern (Jiang et al., 2024): the last
                         ``last_q`` queries attend to every key; the keys they attend to most
                         (summed over those queries) become *vertical* lines (every query
                         reads them), the query-key offsets ``i - j`` they use most become
                         *slash* lines (diagonals). The first ``n_init`` keys and the
                         ``n_local`` nearest offsets are always kept.
:class:`XAttention`      XAttention's antidiagonal block scoring (Xu et al., 2025): the score
                         of a tile is estimated from the sums along the antidiagonals of its
                         ``stride x stride`` sub-blocks (:func:`antidiagonal_scores`); each
                         query tile keeps its largest tiles until their estimated share of the
                         row reaches ``threshold``, and always its diagonal tile.
:class:`Static`          a fixed ``mask_mod`` (a window, a BigBird pattern): the baseline
=======================  =====================================================================

Why antidiagonals: an antidiagonal of an ``S x S`` sub-block meets every row and every column
of it once, so a vertical line (one key column) and a slash line (one diagonal) both cross it
and both raise its sum; a diagonal sample would miss the slash lines parallel to it.

Both estimates assume self-attention of a prompt (``Tq == Tk``, causal) and see the queries'
rotated positions, as the originals do. MInference fuses its estimate and the sparse kernel;
here the estimate is materialised as index tables of ``T`` entries per head, readable and
small at the book's sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._checks import check_attention_qkv, check_positive_int, check_token_ids
from ..attention import apply_rope
from ..nn import repeat_kv
from .block import block_sparse_attention
from .kv_policies import llama_view
from .masks import MaskMod, and_masks, causal, dense_mask

__all__ = [
    "PrefillPattern",
    "Static",
    "VerticalSlash",
    "XAttention",
    "antidiagonal_scores",
    "prefill_nll",
    "sparse_prefill",
    "vertical_slash_tables",
    "xattention_tiles",
]


def _check_prefill(q: torch.Tensor, k: torch.Tensor) -> None:
    check_attention_qkv(q, k, k)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"sparse prefill estimates self-attention of a prompt: q and k need the same "
            f"length, got Tq={q.shape[1]} and Tk={k.shape[1]}"
        )


def _check_vertical_slash(n_vertical: int, n_slash: int, last_q: int, n_init: int,
                          n_local: int) -> None:  # fmt: skip
    for name, v in (("n_vertical", n_vertical), ("n_slash", n_slash), ("last_q", last_q)):
        check_positive_int(name, v)
    check_positive_int("n_init", n_init, allow_zero=True)
    check_positive_int("n_local", n_local, allow_zero=True)
    if n_init > n_vertical or n_local > n_slash:
        raise ValueError(
            f"n_init and n_local must be at most n_vertical and n_slash, got n_init={n_init}, "
            f"n_vertical={n_vertical}, n_local={n_local}, n_slash={n_slash}"
        )


def vertical_slash_tables(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    n_vertical: int,
    n_slash: int,
    last_q: int = 64,
    n_init: int = 4,
    n_local: int = 16,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MInference's estimate: which key columns and which offsets each head keeps.

    With ``A = softmax(q_{T-m..T-1} k^T / sqrt(d))`` the causal attention of the last
    ``m = last_q`` queries (float32 or wider),

    - vertical score of key ``j``: ``sum_i A[i, j]``; the ``n_vertical`` largest are kept,
      the first ``n_init`` always (MInference forces 30);
    - slash score of offset ``o``: ``sum_i A[i, i - o]``; the ``n_slash`` largest offsets are
      kept, the ``n_local`` smallest always (MInference forces 100).

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, G, D]`` (GQA: each query head estimates its own).
        n_vertical, n_slash: columns and diagonals kept per head (``>= n_init``, ``n_local``;
            capped at ``T``).

    Returns:
        ``(vertical [B, H, T], slash [B, H, T])`` bool: ``vertical[b, h, j]`` keeps key ``j``
        for every query, ``slash[b, h, o]`` keeps offset ``o = i - j`` for every query.
    """
    _check_prefill(q, k)
    _check_vertical_slash(n_vertical, n_slash, last_q, n_init, n_local)
    b, t, h, d = q.shape
    m = min(last_q, t)
    sc = d**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (
        torch.einsum("bihd,bjhd->bhij", q[:, t - m :].to(acc), repeat_kv(k, q.shape[2]).to(acc))
        * sc
    )
    rows = torch.arange(t - m, t, device=q.device)[:, None]
    cols = torch.arange(t, device=q.device)[None]
    a = s.masked_fill(cols > rows, float("-inf")).softmax(-1)  # [B, H, m, T]
    vertical_score = a.sum(-2)  # [B, H, T]
    vertical_score[..., :n_init] = float("inf")
    # slash score: offset o collects A[i, i - o]; scatter each entry onto its offset
    offset = (rows - cols).clamp(min=0).expand(m, t)  # [m, T]; masked entries carry 0 mass
    slash_score = torch.zeros(b, h, t, dtype=a.dtype, device=q.device)
    slash_score.scatter_add_(-1, offset.reshape(1, 1, -1).expand(b, h, -1), a.flatten(-2))
    slash_score[..., :n_local] = float("inf")
    vertical = torch.zeros(b, h, t, dtype=torch.bool, device=q.device)
    slash = torch.zeros_like(vertical)
    vertical.scatter_(-1, vertical_score.topk(min(n_vertical, t), dim=-1).indices, True)
    slash.scatter_(-1, slash_score.topk(min(n_slash, t), dim=-1).indices, True)
    return vertical, slash


def antidiagonal_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int = 64,
    stride: int = 8,
    scale: float | None = None,
) -> torch.Tensor:
    r"""XAttention's estimate of each tile's share of attention, per query head.

    The scores are sampled along antidiagonals: sub-block ``(a, c)`` of ``stride x stride``
    entries gets ``e[a, c] = sum_{s < S} q_{Sa + S-1-s} . k_{Sc + s}``, computed as one
    matrix product of strided copies of ``q`` and ``k``. A causal softmax over ``c`` (scaled
    by ``1 / (S sqrt(d))``) turns each row of sub-blocks into shares; the shares of the
    ``(block / S)^2`` sub-blocks of a tile are summed and each tile row is normalised to 1.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, G, D]``; ``T`` a multiple of ``block``, ``block`` a
            multiple of ``stride``.

    Returns:
        ``[B, H, T / block, T / block]`` estimated shares, zero above the diagonal; each
        row sums to 1.
    """
    _check_prefill(q, k)
    check_positive_int("block", block)
    check_positive_int("stride", stride)
    b, t, h, d = q.shape
    if block % stride or t % block:
        raise ValueError(
            f"block must be a multiple of stride and T of block, got T={t}, block={block}, "
            f"stride={stride}"
        )
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = rearrange(q.to(acc), "b (n s) h d -> b h n s d", s=stride).flip(-2)  # row S-1-s
    ks = rearrange(repeat_kv(k, q.shape[2]).to(acc), "b (n s) h d -> b h n s d", s=stride)
    sc = d**-0.5 if scale is None else scale
    e = torch.einsum("bhasd,bhcsd->bhac", qs, ks) * sc / stride  # [B, H, T/S, T/S]
    n = t // stride
    upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    shares = e.masked_fill(upper, float("-inf")).softmax(-1)
    r = block // stride
    tiles = rearrange(shares, "b h (i r) (j c) -> b h i j r c", r=r, c=r).sum((-1, -2))
    return tiles / tiles.sum(-1, keepdim=True)


def xattention_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    threshold: float = 0.9,
    block: int = 64,
    stride: int = 8,
    scale: float | None = None,
) -> torch.Tensor:
    """XAttention's selection: per query tile, the fewest tiles whose estimated shares
    (:func:`antidiagonal_scores`) reach ``threshold``, plus the diagonal tile.

    Returns:
        bool ``[B, H, T / block, T / block]``, causal (no tile above the diagonal).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    est = antidiagonal_scores(q, k, block=block, stride=stride, scale=scale)
    ranked, order = est.sort(dim=-1, descending=True, stable=True)
    before = ranked.cumsum(-1) - ranked  # share of the tiles ranked above
    take = (before < threshold) & (ranked > 0)
    keep = torch.zeros_like(take).scatter(-1, order, take)
    n = est.shape[-1]
    return keep | torch.eye(n, dtype=torch.bool, device=est.device)


class PrefillPattern:
    """Maps one layer's prompt ``q [B, T, H, D]``, ``k [B, T, G, D]`` (rotated) to a per-head
    ``mask_mod``; subclasses implement ``__call__``."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> MaskMod:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "mask_mod")
        return f"{type(self).__name__}({args})"


class Static(PrefillPattern):
    """The same ``mask_mod`` whatever the prompt (combined with :func:`causal`)."""

    def __init__(self, mask_mod: MaskMod, name: str = "static") -> None:
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
        self.mask_mod, self.name = mask_mod, name

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> MaskMod:
        return and_masks(self.mask_mod, causal())  # a window stays a declared band


class VerticalSlash(PrefillPattern):
    """MInference's vertical-slash pattern (see :func:`vertical_slash_tables`)."""

    def __init__(self, n_vertical: int, n_slash: int, *, last_q: int = 64, n_init: int = 4,
                 n_local: int = 16) -> None:  # fmt: skip
        _check_vertical_slash(n_vertical, n_slash, last_q, n_init, n_local)
        self.n_vertical, self.n_slash, self.last_q = n_vertical, n_slash, last_q
        self.n_init, self.n_local = n_init, n_local

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> MaskMod:
        vertical, slash = vertical_slash_tables(
            q, k, n_vertical=self.n_vertical, n_slash=self.n_slash, last_q=self.last_q,
            n_init=self.n_init, n_local=self.n_local,
        )  # fmt: skip

        def mask_mod(b, h, i, j):
            return (j <= i) & (vertical[b, h, j] | slash[b, h, (i - j).clamp(min=0)])

        return mask_mod


class XAttention(PrefillPattern):
    """XAttention's antidiagonal block selection (see :func:`xattention_tiles`)."""

    def __init__(self, threshold: float = 0.9, *, block: int = 64, stride: int = 8) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        check_positive_int("block", block)
        check_positive_int("stride", stride)
        self.threshold, self.block, self.stride = threshold, block, stride

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> MaskMod:
        tiles = xattention_tiles(q, k, threshold=self.threshold, block=self.block,
                                 stride=self.stride)  # fmt: skip
        n = self.block
        return lambda b, h, i, j: (j <= i) & tiles[b, h, i // n, j // n]


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: PrefillPattern,
    *,
    block: int = 64,
    backend: str = "auto",
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate ``pattern`` on ``q, k`` and attend only where it allows.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, G, D]`` (rotated, as the layer uses them).
        pattern: a :class:`PrefillPattern`.
        block, backend: tiles and backend of :func:`block_sparse_attention`.

    Returns:
        ``(o [B, T, H, D], density [B, H])``: the output and the fraction of the causal
        query-key pairs each head computed.
    """
    if not isinstance(pattern, PrefillPattern):
        raise TypeError(f"pattern must be a PrefillPattern, got {type(pattern).__name__}")
    _check_prefill(q, k)
    mod = pattern(q, k)
    b, t, h, _ = q.shape
    kept = dense_mask(mod, t, t, batch=b, heads=h, device=q.device).sum((-1, -2))
    o = block_sparse_attention(q, k, v, mod, block_q=block, block_k=block, backend=backend,
                               scale=scale)  # fmt: skip
    return o, kept / (t * (t + 1) / 2)


@torch.no_grad()
def prefill_nll(
    model: nn.Module, ids: torch.Tensor, pattern: PrefillPattern, *, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama-family model's forward pass over ``ids`` with every layer's attention
    estimated and computed by ``pattern`` (:func:`sparse_prefill`), scored token by token.

    Args:
        model: a :class:`~effarch.models.ByteLM` or a ``transformers`` Llama-family causal LM
            (see :func:`~effarch.sparse.llama_view`).
        ids: ``[T]`` or ``[1, T]`` int64 token ids.

    Returns:
        ``(nll [T - 1] in nats, density [L])``: the loss of every next token and the
        fraction of causal query-key pairs computed per layer (mean over heads).
    """
    if not isinstance(pattern, PrefillPattern):
        raise TypeError(f"pattern must be a PrefillPattern, got {type(pattern).__name__}")
    ids = check_token_ids("ids", ids)
    view = llama_view(model)
    t, dh = ids.numel(), view.head_dim
    pos = torch.arange(t, device=ids.device)
    x = view.embed(ids[None])  # [1, T, d]
    density = []
    for layer in view.layers:
        attn, y = layer.self_attn, layer.input_layernorm(x)
        q = apply_rope(attn.q_proj(y).view(1, t, view.n_heads, dh), pos, base=view.rope_base)
        k = apply_rope(attn.k_proj(y).view(1, t, view.n_kv_heads, dh), pos, base=view.rope_base)
        v = attn.v_proj(y).view(1, t, view.n_kv_heads, dh)
        o, dens = sparse_prefill(q, k, v, pattern, block=block)
        density.append(dens.mean().item())
        x = x + attn.o_proj(o.reshape(1, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = (view.norm(x) @ view.head_weight.T)[0, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, ids[1:], reduction="none"), torch.tensor(density)
