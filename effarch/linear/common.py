"""What the linear-attention ops share: layout moves, dtypes, initial states, chunk layout.

The ops (:mod:`effarch.linear.gated`, :mod:`~effarch.linear.delta`,
:mod:`~effarch.linear.dplr`, :mod:`~effarch.linear.ttt` and :mod:`effarch.unified`) take
flash-linear-attention's layout, ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, states
``[B, H, K, V]``, and compute head-major, ``[B, H, T, ...]``, where every per-head product is
a batched matrix product. A public op checks its arguments (:mod:`effarch._checks`), moves
them here with :func:`heads` in the accumulation dtype (:func:`compute_dtype`), runs its
recurrent, parallel or chunk form on those checked tensors, and returns with
:func:`from_heads`.

The chunk forms cut time into ``N`` chunks of ``C`` steps, chunk-major (:func:`time_major`),
and share two pieces of arithmetic: the scalar decay matrix ``exp(G_i - G_j)`` of a chunk
(:func:`scalar_decay_matrix`) and the per-key decayed scores of GLA and RWKV-7
(:func:`intra_chunk_scores`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .._checks import check_like, check_positive_number

__all__ = [
    "SAFE_LOG_RANGE",
    "compute_dtype",
    "from_heads",
    "from_time_major",
    "heads",
    "intra_chunk_scores",
    "load_state",
    "resolve_scale",
    "scalar_decay_matrix",
    "time_major",
    "tril",
]


# --------------------------------------------------------------------------------------------
# Arguments into the head-major compute layout and back
# --------------------------------------------------------------------------------------------


def resolve_scale(scale: Any, dk: int) -> float:
    """The multiplier of ``q``: ``scale`` (checked: a finite positive number) or, when None,
    ``K ** -0.5`` as in fla and attention."""
    check_positive_number("scale", scale, allow_none=True)
    return dk**-0.5 if scale is None else float(scale)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float32 for half precision (as fla
    does), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, ...] -> [B, H, T, ...]`` in ``dtype`` (a view when the dtype matches)."""
    return rearrange(x, "b t h ... -> b h t ...").to(dtype)


def from_heads(o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, ...] -> [B, T, H, ...]`` in the dtype of ``like`` (the op's ``q``)."""
    return rearrange(o, "b h t ... -> b t h ...").to(like.dtype)


def load_state(
    initial_state: Any, b: int, h: int, dk: int, dv: int, ref: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """Check an optional ``initial_state [B, H, K, V]`` (on the device of ``ref``, any
    floating dtype) and return it in ``dtype``; None stays None (a zero state)."""
    if initial_state is None:
        return None
    check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", ref)
    return initial_state.to(dtype)


# --------------------------------------------------------------------------------------------
# Chunks: chunk-major layout and the decays inside a chunk
# --------------------------------------------------------------------------------------------


def tril(c: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    """The boolean ``[c, c]`` mask of ``j <= i + diagonal``."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(diagonal)


def time_major(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[B, H, T, ...] -> [N, B, H, C, ...]``, contiguous and zero-padded to ``N * C`` steps.

    Chunk-major order makes every per-chunk slice ``x[i]`` one contiguous block, so the
    sequential pass over chunks reads no strided memory, and all batched products over
    ``(chunk, batch, head)`` flatten to plain ``bmm`` calls without copies. The padding
    steps are zeros: no key, no write, and a log decay of 0 (no decay).
    """
    trailing = x.ndim - 3  # dims after time, e.g. K
    x = F.pad(x, (0, 0) * trailing + (0, n * c - x.shape[2]))
    return rearrange(x, "b h (n c) ... -> n b h c ...", c=c).contiguous()


def step_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, ...] -> [T, B * H, ...]``, contiguous: the recurrent forms' token loops read
    one contiguous block per step and update all heads with one batched product (``bmm``,
    ``baddbmm``) instead of a broadcast outer product, an add and an einsum."""
    return rearrange(x, "b h t ... -> t (b h) ...").contiguous()


def from_time_major(o: torch.Tensor, b: int, h: int, t: int) -> torch.Tensor:
    """``[N * B * H, C, V]`` chunk outputs back to ``[B, H, T, V]`` (padding dropped)."""
    return rearrange(o, "(n b h) c v -> b h (n c) v", b=b, h=h)[:, :, :t]


def scalar_decay_matrix(gcum: torch.Tensor) -> torch.Tensor:
    """``D_ij = exp(G_i - G_j)`` for ``j <= i`` from cumulative log gates ``G [..., C]``.

    Above the diagonal the exponent is ``>= 0`` and could overflow, so it is zeroed first
    (``exp -> 1``); callers discard those entries with ``tril_``, so no ``inf`` ever reaches a
    product or its gradient.
    """
    return (gcum[..., :, None] - gcum[..., None, :]).tril_().exp_()


#: Largest log-decay range over which a block of decayed scores may be computed as one
#: product of ``q exp(gq - ref)`` and ``k exp(ref - gk)``: ``exp(30)`` is far from overflow
#: in float32 and costs no relative precision.
SAFE_LOG_RANGE = 30.0


def intra_chunk_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    gq: torch.Tensor,
    gk: torch.Tensor,
    sub: int,
    strict: bool = False,
) -> torch.Tensor:
    """Within-chunk scores ``A_ij = sum_d q_id k_jd exp(gq_id - gk_jd)`` for ``j <= i``.

    ``q, k, gq, gk: [..., C, K]``: the query side decayed by ``gq``, the key side by ``gk``,
    cumulative log gates from the chunk start with ``gq_i <= gk_j`` wherever ``j <= i``
    (GLA: ``gq = gk = G``; the reads of the generalised delta rule use ``gq_i = G_{i-1}``
    with ``strict``, which keeps only ``j < i``). Returns ``[..., C, C]``, zero above the
    diagonal (and on it with ``strict``).

    The chunk is cut into row blocks of ``sub`` rows (fla's secondary level). For the block
    starting at row ``r`` and a key ``j < r``, the exponent splits at the reference
    ``G_{r-1} = gk_{r-1}`` into ``(gq_i - G_{r-1}) + (G_{r-1} - gk_j)``, both ``<= 0``, so
    those scores are one matrix product of ``q_i exp(gq_i - G_{r-1})`` and
    ``k_j exp(G_{r-1} - gk_j)``. Keys inside the block have ``G_{r-1} - gk_j >= 0``: when the
    block's decay range is small (at most ``SAFE_LOG_RANGE``, always true for RWKV-7's
    decays) the same product covers them and the triangle is masked afterwards; otherwise
    they get the exact pairwise ``[sub, sub, K]`` factor, masked to the triangle before
    ``exp``. This is the intra-chunk part of fla's ``chunk_gla``.
    """
    c = q.shape[-2]
    starts = list(range(0, c, sub))
    # Each block's decay range G_{r-1} - G_{e-1} (G_{-1} = 0), all in one reduction.
    last = gk[..., [min(r + sub, c) - 1 for r in starts], :]
    first = torch.cat(
        [torch.zeros_like(gk[..., :1, :]), gk[..., [r - 1 for r in starts[1:]], :]], -2
    )
    ranges = (first - last).flatten(0, -3).amax(dim=(0, 2)).tolist()
    rows = []
    for blk, r in enumerate(starts):
        e = min(r + sub, c)
        qi, gqi = q[..., r:e, :], gq[..., r:e, :]
        ref = first[..., blk : blk + 1, :]  # G_{r-1}
        q_ref = qi * torch.exp(gqi - ref)  # exponents <= 0
        if ranges[blk] <= SAFE_LOG_RANGE:  # one product over keys 0 .. e-1, then the mask
            k_ref = k[..., :e, :] * torch.exp(ref - gk[..., :e, :])  # exponents <= the range
            block = (q_ref @ k_ref.transpose(-1, -2)).tril(r - 1 if strict else r)
        else:  # keys before the block by the product, keys inside it pairwise
            pair = gqi[..., :, None, :] - gk[..., None, r:e, :]
            keep = tril(e - r, q.device, -1 if strict else 0)
            pair = pair.masked_fill(~keep[..., None], float("-inf"))
            block = torch.einsum("...ik,...jk,...ijk->...ij", qi, k[..., r:e, :], torch.exp(pair))
            if r > 0:
                k_ref = k[..., :r, :] * torch.exp(ref - gk[..., :r, :])  # exponents <= 0
                block = torch.cat([q_ref @ k_ref.transpose(-1, -2), block], dim=-1)
        if e < c:
            block = torch.cat([block, q.new_zeros(*q.shape[:-2], e - r, c - e)], dim=-1)
        rows.append(block)
    return torch.cat(rows, dim=-2)
