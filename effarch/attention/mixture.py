"""Mixture of attention (survey section 4.3): route tokens to heads, or queries to key blocks.

Two ways of spending attention compute only where a router says it matters.

**Mixture of heads (MoH; Jin et al., 2024, "MoH: Multi-Head Attention as Mixture-of-Head
Attention").** Multi-head attention is a sum over heads,
``MHA(x) = sum_h W_O^h H^h`` with ``H^h`` the output of head ``h`` and ``W_O^h`` its slice of
the output projection. MoH treats the heads as experts and weights the sum per token,

    MoH(x_t) = sum_h g_{t,h} W_O^h H^h_t,

where ``n_shared`` heads are always on and a linear router picks ``top_k`` of the other
(routed) heads for each token; all other gates are zero. See
:class:`MixtureOfHeadsAttention` for the exact gates.

**Mixture of block attention (MoBA; Lu et al., 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs").** The keys are cut into blocks of ``block_size``; each query scores
every block by its dot product with the block's mean key, keeps the ``top_k`` best ones
(its own block always, future blocks never) and runs ordinary softmax attention over the
union of their keys. See :func:`moba_attention`.

Both reduce to plain attention in a degenerate setting, which is what the tests check: MoH
with every routed head selected and a zero router is multi-head attention, and MoBA with
``top_k`` at least the number of blocks is full (causal) attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from .._checks import (
    check_attention_qkv,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_tensor,
)
from .naive import attention_mask, naive_attention
from .selected import selected_blocks_attention
from .tiled import online_softmax_update

# --- mixture of heads ----------------------------------------------------------------------


def moh_active_fraction(n_heads: int, n_shared: int, top_k: int) -> float:
    """Fraction of heads a token uses in MoH: ``(n_shared + top_k) / n_heads``.

    Per query token, only the active heads need their query projection, their scores
    against the keys, their weighted sum of values and their slice of ``W_O``; so a kernel
    that skips inactive (token, head) pairs does this fraction of the per-head attention
    work of multi-head attention. Keys and values are still needed for every head, since
    different tokens pick different heads.
    """
    _check_moh_sizes(n_heads, n_shared, top_k)
    return (n_shared + top_k) / n_heads


def _check_moh_sizes(n_heads: int, n_shared: int, top_k: int) -> None:
    check_positive_int("n_heads", n_heads)
    check_positive_int("n_shared", n_shared, allow_zero=True)
    check_positive_int("top_k", top_k)
    if n_shared >= n_heads:
        raise ValueError(
            f"n_shared must be smaller than n_heads ({n_heads}) so that some heads are "
            f"routed, got {n_shared}"
        )
    n_routed = n_heads - n_shared
    if top_k > n_routed:
        raise ValueError(
            f"top_k must be at most the number of routed heads, n_heads - n_shared = "
            f"{n_heads} - {n_shared} = {n_routed}, got {top_k}"
        )


class MoHRouting(NamedTuple):
    """What the MoH router decided for every token (for plots and checks).

    Attributes:
        heads: ``[B, T, top_k]`` long, the routed heads each token picked, as indices into
            all heads (so in ``n_shared .. n_heads - 1``), in increasing order.
        routed_weights: ``[B, T, top_k]``, softmax of the router logits over the picked
            heads (aligned with ``heads``; sums to 1 per token).
        alpha: ``[B, T, 2]``, the weights ``(alpha_shared, alpha_routed)`` of the two head
            groups (a softmax; ``(0, 1)`` when there are no shared heads).
        gates: ``[B, T, n_heads]``, the gate ``g_{t,h}`` that multiplies each head's output;
            zero for a routed head that was not picked.
    """

    heads: torch.Tensor
    routed_weights: torch.Tensor
    alpha: torch.Tensor
    gates: torch.Tensor


class MixtureOfHeadsAttention(nn.Module):
    """Mixture-of-head attention (MoH): multi-head self-attention with per-token head gates.

    Heads ``0 .. n_shared - 1`` are shared (always on); heads ``n_shared .. n_heads - 1``
    are routed, and each token keeps the ``top_k`` routed heads with the largest router
    logits. With ``x_t`` a token, ``H^h_t`` the output of head ``h`` (``[head_dim]``) and
    ``W_O^h`` the columns of the output projection that read head ``h``
    (``[d_model, head_dim]``):

        H^h       = softmax(Q^h K^h^T / sqrt(head_dim) + causal mask) V^h
        out_t     = sum_h g_{t,h} W_O^h H^h_t

    The gates follow MoH's two-stage routing (its equations for ``g``, with the constant
    factors of the authors' released code):

        (alpha_s, alpha_r) = softmax(W_h x_t)                        # 2-way: shared vs routed
        g_{t,h} = 2 alpha_s n_shared softmax(W_s x_t)_h               for a shared head h
        g_{t,h} = 2 alpha_r top_k    softmax_{S_t}(W_r x_t)_h         for h in S_t
        g_{t,h} = 0                                                   for a routed h not in S_t

    where ``S_t`` is the set of ``top_k`` routed heads with the largest logits ``W_r x_t``
    and ``softmax_{S_t}`` normalises over those heads only (the full softmax over the routed
    heads, zeroed outside ``S_t`` and renormalised, which is the same thing). The paper
    writes the gates without the factors ``2 n_shared`` and ``2 top_k`` and with the routed
    softmax over all routed heads, not renormalised over ``S_t``; the released code
    renormalises and scales, and so does this module. The factors only rescale,
    and make a token with uniform router outputs give every active head the gate 1, so that
    MoH with all heads active and a zero router (:meth:`zero_router_`) is exactly
    multi-head attention. Within a group the gates therefore sum to
    ``2 alpha_s n_shared`` and ``2 alpha_r top_k``. With ``n_shared = 0`` there is no
    2-way stage: ``alpha = (0, 1)`` and ``g = top_k softmax_{S_t}(W_r x_t)``.
    ``W_s [n_shared, d_model]``, ``W_r [n_heads - n_shared, d_model]`` and
    ``W_h [2, d_model]`` are bias-free linear maps (``router_shared``, ``router_routed``,
    ``router_mix``), as are ``W_Q, W_K, W_V, W_O [d_model, d_model]`` (``q_proj`` ...).

    This module computes every head for every token and multiplies the unpicked ones by
    zero: exact and easy to check, but it saves nothing. The saving a sparse kernel would
    get is :func:`moh_active_fraction` ``= (n_shared + top_k) / n_heads`` of the per-head
    attention work. The load-balancing loss MoH trains with is not included.

    Args:
        d_model: model width; a multiple of ``n_heads`` (``head_dim = d_model // n_heads``).
        n_heads: number of heads, shared and routed together.
        n_shared: number of always-on heads (may be 0).
        top_k: routed heads each token uses, ``1 <= top_k <= n_heads - n_shared``.
        causal: causal self-attention inside every head.

    ``forward(x [B, T, d_model]) -> [B, T, d_model]``; ``forward(x, return_routing=True)``
    also returns a :class:`MoHRouting`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_shared: int = 2,
        top_k: int = 2,
        causal: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        _check_moh_sizes(n_heads, n_shared, top_k)
        if d_model % n_heads != 0:
            raise ValueError(
                f"n_heads must divide d_model ({d_model}) into equal heads, got {n_heads}"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.n_shared, self.n_routed, self.top_k = n_shared, n_heads - n_shared, top_k
        self.causal = bool(causal)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.router_routed = nn.Linear(d_model, self.n_routed, bias=False)  # W_r
        if n_shared > 0:
            self.router_shared: nn.Linear | None = nn.Linear(d_model, n_shared, bias=False)  # W_s
            self.router_mix: nn.Linear | None = nn.Linear(d_model, 2, bias=False)  # W_h
        else:
            self.router_shared = self.router_mix = None

    @property
    def active_fraction(self) -> float:
        """``(n_shared + top_k) / n_heads``, see :func:`moh_active_fraction`."""
        return moh_active_fraction(self.n_heads, self.n_shared, self.top_k)

    @torch.no_grad()
    def zero_router_(self) -> MixtureOfHeadsAttention:
        """Set ``W_s``, ``W_r`` and ``W_h`` to zero, so every softmax is uniform.

        Then ``alpha = (1/2, 1/2)`` (if there are shared heads) and every active head gets
        the gate 1. With ``top_k = n_heads - n_shared`` the module is plain multi-head
        attention. (With fewer routed heads, ``torch.topk`` breaks the tie among the equal
        logits.)
        """
        for lin in (self.router_routed, self.router_shared, self.router_mix):
            if lin is not None:
                lin.weight.zero_()
        return self

    def _check_x(self, x: torch.Tensor) -> None:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have d_model={self.d_model} features in dim 2, got {tuple(x.shape)}"
            )

    def route(self, x: torch.Tensor) -> MoHRouting:
        """The router's decision for every token of ``x [B, T, d_model]`` (see the class)."""
        self._check_x(x)
        logits = self.router_routed(x)  # [B, T, n_routed]
        top_logits, top = logits.topk(self.top_k, dim=-1)
        order = top.argsort(dim=-1)  # report the picked heads in increasing order
        top, top_logits = top.gather(-1, order), top_logits.gather(-1, order)
        weights = torch.softmax(top_logits, dim=-1)  # softmax over the picked heads only
        routed = torch.zeros_like(logits).scatter(-1, top, weights)
        if self.router_shared is None:
            alpha = torch.zeros(*x.shape[:2], 2, dtype=x.dtype, device=x.device)
            alpha[..., 1] = 1.0
            gates = self.top_k * routed
        else:
            alpha = torch.softmax(self.router_mix(x), dim=-1)
            shared = torch.softmax(self.router_shared(x), dim=-1)
            gates = torch.cat(
                [
                    2 * alpha[..., :1] * self.n_shared * shared,
                    2 * alpha[..., 1:] * self.top_k * routed,
                ],
                dim=-1,
            )
        return MoHRouting(heads=top + self.n_shared, routed_weights=weights, alpha=alpha,
                          gates=gates)  # fmt: skip

    def head_states(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's attention output ``H^h`` before the output projection.

        ``x [B, T, d_model] -> [B, T, n_heads, head_dim]``, computed for all heads with
        :func:`naive_attention`.
        """
        self._check_x(x)
        q, k, v = (
            rearrange(proj(x), "b t (h e) -> b t h e", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return naive_attention(q, k, v, causal=self.causal)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's contribution ``W_O^h H^h`` to the output, ungated: the dense reference.

        ``x [B, T, d_model] -> [B, T, n_heads, d_model]``. Summed over heads this is
        multi-head attention; weighted by the gates it is :meth:`forward`.
        """
        w_o = rearrange(self.o_proj.weight, "d (h e) -> h d e", h=self.n_heads)
        return torch.einsum("bthe,hde->bthd", self.head_states(x), w_o)

    def forward(
        self, x: torch.Tensor, *, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MoHRouting]:
        """``out_t = sum_h g_{t,h} W_O^h H^h_t`` for ``x [B, T, d_model]``; ``[B, T, d_model]``.

        The gates scale each head's state before the output projection, which is the same
        as scaling the projected head outputs. With ``return_routing`` also returns the
        :class:`MoHRouting`.
        """
        routing = self.route(x)
        heads = self.head_states(x) * routing.gates[..., None]
        out = self.o_proj(rearrange(heads, "b t h e -> b t (h e)"))
        return (out, routing) if return_routing else out


# --- mixture of block attention -------------------------------------------------------------


def _moba_gate_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``s[b, h, i, n] = q_i . mean(keys of block n)`` per query head: ``[B, Hq, Tq, N]``."""
    b, tk, hkv, d = k.shape
    n_blocks = -(-tk // block_size)
    pad = n_blocks * block_size - tk
    kp = torch.cat([k, k.new_zeros(b, pad, hkv, d)], dim=1) if pad else k
    sums = rearrange(kp, "b (n s) h d -> b n s h d", s=block_size).sum(dim=2)
    counts = torch.full((n_blocks,), block_size, dtype=k.dtype, device=k.device)
    counts[-1] = tk - (n_blocks - 1) * block_size  # the last block may be short
    mean_k = sums / counts[None, :, None, None]  # [B, N, Hkv, D]
    mean_k = repeat(mean_k, "b n h d -> b n (h g) d", g=q.shape[2] // hkv)
    return torch.einsum("bqhd,bnhd->bhqn", q, mean_k)


def _moba_select(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool
) -> torch.Tensor:
    """Selected block indices ``[B, Hq, Tq, min(top_k, N)]``, increasing, ``-1`` when unused."""
    tq, tk = q.shape[1], k.shape[1]
    n_blocks = -(-tk // block_size)
    compute = torch.promote_types(q.dtype, torch.float32)
    gate = _moba_gate_scores(q.to(compute), k.to(compute), block_size)
    if causal:
        pos = torch.arange(tq, device=q.device) + (tk - tq)  # query i sits at key position pos
        current = torch.div(pos, block_size, rounding_mode="floor")[:, None]  # -1 if pos < 0
        blocks = torch.arange(n_blocks, device=q.device)[None, :]
        gate = gate.masked_fill(blocks > current, float("-inf"))  # never a future block
        gate = gate.masked_fill(blocks == current, float("inf"))  # always the current block
    vals, idx = gate.topk(min(top_k, n_blocks), dim=-1)
    idx = torch.where(vals > float("-inf"), idx, n_blocks)  # fewer allowed blocks than k
    idx = idx.sort(dim=-1).values
    return torch.where(idx < n_blocks, idx, -1)


def _check_moba_args(block_size: int, top_k: int) -> None:
    check_positive_int("block_size", block_size)
    check_positive_int("top_k", top_k)


def moba_select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    top_k: int = 3,
    causal: bool = True,
) -> torch.Tensor:
    """The key blocks each query of MoBA attends to.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]`` with ``Hq`` a multiple of ``Hkv``.
        block_size: keys per block; block ``n`` holds keys ``n * block_size`` up to
            ``(n + 1) * block_size - 1`` (the last block may be shorter).
        top_k: blocks per query, the current block included.
        causal: see :func:`moba_attention`.

    Returns:
        ``[B, Hq, Tq, min(top_k, N)]`` long tensor of block indices, ``N = ceil(Tk /
        block_size)``, in increasing order; slots beyond the blocks a query may use
        (early queries with fewer than ``top_k`` blocks in their past) hold ``-1``.
        Each query head selects on its own (with GQA, against the mean keys of its
        key/value head).
    """
    check_attention_qkv(q, k, k)
    _check_moba_args(block_size, top_k)
    return _moba_select(q, k, block_size, top_k, bool(causal))


def _blocks_to_block_mask(sel: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Selected block indices ``[B, H, Tq, k]`` (``-1`` unused) to a bool ``[B, H, Tq, N]``."""
    one_hot = torch.zeros(*sel.shape[:-1], n_blocks + 1, dtype=torch.bool, device=sel.device)
    one_hot.scatter_(-1, torch.where(sel < 0, n_blocks, sel), True)  # -1 goes to a spare column
    return one_hot[..., :n_blocks]


def _blocks_to_key_mask(sel: torch.Tensor, tk: int, block_size: int, causal: bool) -> torch.Tensor:
    """Selected block indices ``[B, H, Tq, k]`` to the boolean key mask ``[B, H, Tq, Tk]``."""
    blocks = _blocks_to_block_mask(sel, -(-tk // block_size))
    mask = blocks.repeat_interleave(block_size, dim=-1)[..., :tk]
    if causal:
        mask = mask & attention_mask(sel.shape[2], tk, causal=True, device=sel.device)
    return mask


def moba_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    top_k: int = 3,
    causal: bool = True,
) -> torch.Tensor:
    """Boolean ``[B, Hq, Tq, Tk]`` mask, True where a query attends to a key under MoBA.

    The keys of the blocks from :func:`moba_select_blocks`, intersected with the causal
    mask (bottom-right aligned, as :func:`attention_mask`) when ``causal``. Shapes and
    arguments as :func:`moba_attention`.
    """
    sel = moba_select_blocks(q, k, block_size=block_size, top_k=top_k, causal=causal)
    return _blocks_to_key_mask(sel, k.shape[1], block_size, bool(causal))


def _moba_dense(q, k, v, sel, block_size, causal, scale) -> torch.Tensor:
    """Full score matrix, masked to the selected keys: the readable reference."""
    groups = q.shape[2] // k.shape[2]
    kf = repeat(k, "b t h d -> b t (h g) d", g=groups)
    vf = repeat(v, "b t h d -> b t (h g) d", g=groups)
    mask = _blocks_to_key_mask(sel, k.shape[1], block_size, causal)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kf) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = probs.masked_fill(~mask, 0.0)  # a query that sees no key: NaN -> 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf)


def _moba_blocks(q, k, v, sel, block_size, causal, scale) -> torch.Tensor:
    """Key-block major: the queries that chose a block are scored against it in place."""
    chosen = _blocks_to_block_mask(sel, -(-k.shape[1] // block_size))  # [B, Hq, Tq, N]
    return selected_blocks_attention(
        q, k, v, chosen, block_size=block_size, causal=causal, scale=scale
    )


def _moba_gather(q, k, v, sel, block_size, causal, scale) -> torch.Tensor:
    """Gather each query's selected blocks one slot at a time, merge with the online softmax.

    Never forms the ``[Tq, Tk]`` score matrix: per slot, each query meets only the
    ``block_size`` keys of the block it chose for that slot.
    """
    b, tq, hq, _ = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    n_blocks = -(-tk // block_size)
    pad = n_blocks * block_size - tk
    if pad:
        k = torch.cat([k, k.new_zeros(b, pad, hkv, k.shape[3])], dim=1)
        v = torch.cat([v, v.new_zeros(b, pad, hkv, dv)], dim=1)
    kb = rearrange(k, "b (n s) h d -> b h n s d", s=block_size)
    vb = rearrange(v, "b (n s) h d -> b h n s d", s=block_size)
    qg = rearrange(q, "b t (h g) d -> b h g t d", g=g)
    selg = rearrange(sel, "b (h g) t k -> b h g t k", g=g)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(hkv, device=q.device)[None, :, None, None]
    pos = (torch.arange(tq, device=q.device) + (tk - tq))[:, None]  # [Tq, 1]
    offs = torch.arange(block_size, device=q.device)

    shape = (b, hkv, g, tq)
    m = torch.full(shape, float("-inf"), dtype=q.dtype, device=q.device)
    l_sum = torch.zeros(shape, dtype=q.dtype, device=q.device)
    acc = torch.zeros((*shape, dv), dtype=q.dtype, device=q.device)
    for slot in range(selg.shape[-1]):
        blk = selg[..., slot]  # [B, Hkv, G, Tq]
        k_blk = kb[bi, hi, blk.clamp(min=0)]  # [B, Hkv, G, Tq, S, D]
        v_blk = vb[bi, hi, blk.clamp(min=0)]
        s = torch.einsum("bhgtd,bhgtsd->bhgts", qg, k_blk) * scale
        key_pos = blk[..., None] * block_size + offs  # [B, Hkv, G, Tq, S]
        keep = (blk[..., None] >= 0) & (key_pos < tk)
        if causal:
            keep = keep & (key_pos <= pos)
        s = s.masked_fill(~keep, float("-inf"))
        m, l_sum, acc = online_softmax_update(m, l_sum, acc, s, v_blk, "bhgts,bhgtsd->bhgtd")
    out = acc / torch.where(l_sum > 0, l_sum, torch.ones_like(l_sum))[..., None]
    return rearrange(out, "b h g t d -> b t (h g) d")


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    top_k: int = 3,
    causal: bool = True,
    scale: float | None = None,
    return_selection: bool = False,
    impl: str = "blocks",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mixture of block attention (MoBA): each query attends to its ``top_k`` key blocks.

    The ``Tk`` keys are split into ``N = ceil(Tk / block_size)`` blocks ``I_n`` (the last
    may be shorter). For query ``q_i`` at key position ``p_i = i + Tk - Tq`` (bottom-right
    aligned, as :func:`attention_mask`), in block ``c_i = floor(p_i / block_size)``::

        s_{i,n} = q_i . mean_{j in I_n} k_j               (parameter-free gate, unscaled)
        causal:  s_{i,n} = -inf for n > c_i (future),  s_{i,c_i} = +inf (always kept)
        S_i     = the top_k blocks by s_{i,n}, dropping any with s = -inf
        o_i     = softmax_{j in K_i}(scale * q_i . k_j) v_j,
                  K_i = union of I_n for n in S_i, minus keys j > p_i when causal

    one softmax over all selected keys together. The current block counts among the
    ``top_k`` (as in MoBA's reference code), so a causal query uses its own block, which
    it sees causally, plus the ``top_k - 1`` past blocks with the highest gates. A query
    with fewer past blocks uses all of them. Without ``causal`` the gate alone picks the
    ``top_k`` blocks, with no block forced in.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, with ``Hq``
            a multiple of ``Hkv`` (query head ``h`` uses key/value head ``h // (Hq //
            Hkv)``). Every query head selects its own blocks.
        block_size: keys per block (``Tk`` need not be a multiple).
        top_k: blocks per query, the current one included. With ``top_k >= N`` this is
            exactly full attention (causal or not).
        causal: exclude future blocks and future keys, and always keep the current block.
        scale: score scale, default ``D ** -0.5`` (the gate is not scaled: it only ranks).
        return_selection: also return the :func:`moba_select_blocks` indices
            ``[B, Hq, Tq, min(top_k, N)]`` (``-1`` in unused slots).
        impl: ``"blocks"`` runs key-block major with
            :func:`~effarch.attention.selected_blocks_attention`: the queries that chose a
            block are gathered and scored against it, one copy of the block per tile of up
            to 64 (query, head) rows (as MoBA's released code runs FlashAttention's variable-length
            kernel per key block); ``"gather"`` gathers each query's own ``top_k *
            block_size`` keys and values, one slot at a time with the online softmax
            (simple, memory-bound); ``"dense"`` masks the full score matrix with
            :func:`moba_mask` (the readable reference). None builds the ``[Tq, Tk]`` scores
            but ``"dense"``; all are equal up to rounding.

    Returns:
        ``o`` of shape ``[B, Tq, Hq, Dv]`` in the dtype of ``q`` (a query that sees no key,
        ``p_i < 0``, outputs zeros), and with ``return_selection`` the block indices.

    Cost per query: ``N`` gate dot products plus at most ``top_k * block_size`` keys,
    instead of ``Tk``. Half-precision inputs are computed in float32.
    """
    check_attention_qkv(q, k, v)
    _check_moba_args(block_size, top_k)
    check_choice("impl", impl, ("blocks", "gather", "dense"))
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else check_positive_number("scale", scale)
    causal = bool(causal)
    sel = _moba_select(q, k, block_size, top_k, causal)
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    run = {"blocks": _moba_blocks, "gather": _moba_gather, "dense": _moba_dense}[impl]
    out = run(qf, kf, vf, sel, block_size, causal, scale).to(q.dtype)
    return (out, sel) if return_selection else out
