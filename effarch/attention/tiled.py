"""Tiled attention with the online softmax: FlashAttention's algorithm in plain PyTorch.

The score matrix is never built. Queries are processed in blocks of ``block_q`` rows;
for each, the keys and values stream past in blocks of ``block_k``, and three running
quantities per query row summarise everything seen so far (Milakov & Gimelshein, 2018;
Dao et al., 2022):

    m   the largest score so far                  m' = max(m, rowmax(S_blk))
    l   the softmax denominator, scaled by e^-m   l' = e^(m - m') l + rowsum(e^(S_blk - m'))
    acc the unnormalised output, scaled by e^-m   acc' = e^(m - m') acc + e^(S_blk - m') V_blk

and at the end ``O = acc / l`` and ``lse = m + log l``. Memory is ``O(block_q * block_k)``
per (batch, head) instead of ``O(Tq * Tk)``.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .._checks import check_attention_qkv, check_positive_int


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention computed tile by tile with the online softmax.

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]``, with
            ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses key/value head
            ``h // (Hq // Hkv)``).
        causal: bottom-right aligned causal mask (query ``i`` sees keys
            ``j <= i + Tk - Tq``), as flash-attn.
        scale: score scale, default ``D ** -0.5``.
        block_q, block_k: tile sizes (any positive ints; ``T`` need not be a multiple).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``o`` of shape ``[B, Tq, Hq, Dv]`` in the dtype of ``q`` and, with ``return_lse``,
        ``lse`` of shape ``[B, Hq, Tq]`` in float32 (``-inf`` for a row that sees no key,
        whose output is zero). Same contract as ``flash_attn_func(..., return_attn_probs)``
        for the output and its ``softmax_lse``.

    Half-precision inputs are accumulated in float32; float64 stays float64. Key blocks
    that lie entirely in a query block's masked future are skipped and only the blocks that
    cross the diagonal are masked, as in the kernels.
    Autograd works through this function; unlike the fused kernel, its backward keeps
    every tile (FlashAttention instead recomputes them from ``lse``).
    """
    check_attention_qkv(q, k, v)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    # Group the query heads that share a key/value head: [B, Hkv, G, Tq, D].
    qg = rearrange(q.to(compute), "b t (h g) d -> b h g t d", g=g)
    kh = rearrange(k.to(compute), "b t h d -> b h t d")
    vh = rearrange(v.to(compute), "b t h d -> b h t d")
    offset = tk - tq  # bottom-right alignment: query i sees keys j <= i + offset

    out_blocks, lse_blocks = [], []
    for qs in range(0, tq, block_q):
        qe = min(qs + block_q, tq)
        q_blk = qg[:, :, :, qs:qe]  # [B, Hkv, G, bq, D]
        rows = qe - qs
        m = torch.full((b, hkv, g, rows), float("-inf"), dtype=compute, device=q.device)
        l_sum = torch.zeros((b, hkv, g, rows), dtype=compute, device=q.device)
        acc = torch.zeros((b, hkv, g, rows, dv), dtype=compute, device=q.device)
        # keys beyond the last one the block's bottom row may see are all masked
        k_end = min(tk, qe + offset) if causal else tk
        for ks in range(0, max(k_end, 0), block_k):
            ke = min(ks + block_k, tk)
            s = torch.einsum("bhgqd,bhkd->bhgqk", q_blk, kh[:, :, ks:ke]) * scale
            if causal and ke - 1 > qs + offset:  # only a tile crossing the diagonal needs
                # a mask, as in FlashAttention-2: below it every key is visible to every row
                i = torch.arange(qs, qe, device=q.device)[:, None] + offset
                j = torch.arange(ks, ke, device=q.device)[None, :]
                s = s.masked_fill(j > i, float("-inf"))
            # the online softmax (online_softmax_update): m' = max(m, rowmax(s)),
            # l' = e^(m - m') l + rowsum(e^(s - m')), acc' = e^(m - m') acc + e^(s - m') V
            m, l_sum, acc = online_softmax_update(
                m, l_sum, acc, s, vh[:, :, ks:ke], "bhgqk,bhkd->bhgqd"
            )
        seen = l_sum > 0
        o_blk = acc / torch.where(seen, l_sum, torch.ones_like(l_sum))[..., None]
        out_blocks.append(o_blk)
        lse_blocks.append(torch.where(seen, m + torch.log(torch.where(seen, l_sum, 1.0)), m))

    o = rearrange(torch.cat(out_blocks, dim=3), "b h g t d -> b t (h g) d").to(q.dtype)
    if not return_lse:
        return o
    lse = rearrange(torch.cat(lse_blocks, dim=3), "b h g t -> b (h g) t").to(torch.float32)
    return o, lse


def online_softmax_update(
    m: torch.Tensor,
    l_sum: torch.Tensor,
    acc: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    equation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge one block of scores into the running online-softmax state (module docstring).

    Args:
        m: ``[...]`` the largest score so far per row (``-inf`` before any key).
        l_sum: ``[...]`` the softmax denominator so far, scaled by ``e^-m``.
        acc: ``[..., Dv]`` the unnormalised output so far, scaled by ``e^-m``.
        s: ``[..., n]`` the block's scaled scores (``-inf`` where masked).
        v: the block's values, combined with ``p = e^(s - m')`` by
            ``torch.einsum(equation, p, v)`` into ``[..., Dv]`` (for example
            ``"bhgqk,bhkd->bhgqd"`` for one key block shared by the rows).
        equation: that ``einsum`` equation.

    Returns:
        ``(m', l', acc')``. A row that has seen no key yet (``m' = -inf``) is shifted by 0
        instead of ``m'``, so it stays at ``l = 0, acc = 0`` rather than turning NaN; divide
        by ``l`` where ``l > 0`` at the end. Used by :func:`tiled_attention` and MoBA's
        gathered path (:func:`~effarch.attention.moba_attention`).
    """
    m_new = torch.maximum(m, s.amax(dim=-1))
    # rows that have seen no key yet keep m = -inf; shift by 0 there to avoid nan
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)  # rescales what was accumulated so far
    p = torch.exp(s - m_safe[..., None])
    l_sum = alpha * l_sum + p.sum(dim=-1)
    acc = alpha[..., None] * acc + torch.einsum(equation, p, v)
    return m_new, l_sum, acc


def online_softmax_steps(
    scores: torch.Tensor, values: torch.Tensor, block: int
) -> list[dict[str, torch.Tensor]]:
    """The online softmax of one query row, one key block at a time, for teaching.

    Args:
        scores: ``[T]`` scaled scores ``s_j`` of one query against ``T`` keys.
        values: ``[T, Dv]`` the values ``v_j``.
        block: keys per step.

    Returns:
        One dict per step with the running max ``m``, the running sum
        ``l = sum_j exp(s_j - m)``, the unnormalised output ``acc = sum_j exp(s_j - m) v_j``
        over the keys seen so far, the output so far ``o = acc / l`` and ``seen`` (keys
        processed). After the last step ``o`` equals ``softmax(scores) @ values``.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D tensor [T], got {getattr(scores, 'shape', scores)}")
    if not isinstance(values, torch.Tensor) or values.ndim != 2 or values.shape[0] != len(scores):
        raise ValueError(
            f"values must be [T, Dv] with T={len(scores)}, got {getattr(values, 'shape', values)}"
        )
    check_positive_int("block", block)
    m = torch.tensor(float("-inf"), dtype=scores.dtype)
    l_sum = torch.zeros((), dtype=scores.dtype)
    acc = torch.zeros(values.shape[1], dtype=values.dtype)
    steps = []
    for start in range(0, len(scores), block):
        s, v = scores[start : start + block], values[start : start + block]
        m_new = torch.maximum(m, s.max())
        alpha = torch.exp(m - m_new)  # how much the old sums shrink under the new max
        p = torch.exp(s - m_new)
        l_sum = alpha * l_sum + p.sum()
        acc = alpha * acc + p @ v
        m = m_new
        steps.append(dict(m=m.clone(), l=l_sum.clone(), acc=acc.clone(), o=acc / l_sum,
                          seen=torch.tensor(start + len(s))))  # fmt: skip
    return steps
