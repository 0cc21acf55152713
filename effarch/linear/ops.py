r"""Linear attention and its gated and delta-rule variants, as recurrences over a matrix state.

Every op here keeps, per batch element and head, a state ``S`` of shape ``[K, V]`` and writes
``o_t = S_t^T (scale * q_t)``. They differ only in how ``S`` is updated:

* ``linear_attention``: ``S_t = S_{t-1} + k_t v_t^T`` (``k v^T`` is the outer product).
* ``retention``: ``S_t = gamma_h S_{t-1} + k_t v_t^T`` with RetNet's ``gamma_h = 1 - 2^(-5-h)``.
* ``simple_gla``: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, one data-dependent gate per head.
* ``gla``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, a gate for each key row of ``S``.
* ``delta_rule``: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``.
* ``gated_delta_rule``: the delta rule applied to the decayed ``exp(g_t) S_{t-1}``.
* ``dplr_delta_rule``: ``S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``.

Each docstring names the flash-linear-attention op it matches
(``fla.ops.linear_attn``, ``retention``, ``simple_gla``, ``gla``, ``delta_rule``,
``gated_delta_rule`` and ``generalized_delta_rule``).

The layout follows flash-linear-attention (fla): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``,
states ``[B, H, K, V]``, gates in log space (``g <= 0``, decay ``exp(g)`` in ``(0, 1]``), and
``scale`` defaulting to ``K ** -0.5``. Each op returns ``(o, final_state)`` with
``final_state`` ``None`` unless ``output_final_state=True``. The ops never normalise ``q`` or
``k``; feature maps (:mod:`effarch.linear.feature_maps`) and key normalisation belong to the
layers that call them.

Three ways to compute the same thing (``mode``):

``"recurrent"``
    One step at a time, the definition above: ``O(T K V)`` work, ``T`` sequential steps. It is
    the reference the other modes are tested against.
``"parallel"``
    The quadratic form ``O = (Q K^T * D) V`` with ``D_ij`` the product of the decays between
    ``j`` and ``i`` (``j <= i``, zero above the diagonal), as in attention: ``O(T^2 K)`` work, no
    sequential steps. Only for the ops without a delta rule, whose state is a plain sum.
``"chunk"``
    Chunkwise parallel: split the sequence into chunks of ``C`` steps; inside a chunk use the
    parallel form, across chunks carry the state with the recurrence. ``O(T C K + T K V)`` work
    and ``T / C`` sequential steps, all of them matrix products. This is the form fla's
    ``chunk_*`` kernels compute.

Precision: half-precision inputs are accumulated in float32 and ``o`` is returned in the input
dtype; the final state is returned in the accumulation dtype (float32 for half inputs, as fla
does, so that states passed between calls lose nothing). float64 stays float64 throughout.

Numerical safety of the gated chunk forms: decays enter only as ``exp`` of a sum of log gates
over a stretch ``s < r <= t`` *inside* a chunk, which is ``<= 0``; a pairwise factor
``exp(G_i - G_j)`` is only ever evaluated for ``j <= i`` (the rest is masked to ``-inf``
*before* ``exp``). Products of decays therefore underflow to zero, as they should, and never
overflow, however strong the decay or long the sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_choice, check_positive_int, check_positive_number, check_tensor
from .._kernels import grad_required, triton_unusable_reason

__all__ = [
    "delta_rule",
    "dplr_delta_rule",
    "gated_delta_rule",
    "gla",
    "linear_attention",
    "retention",
    "retention_log_decays",
    "simple_gla",
]

_ALL_MODES = ("recurrent", "parallel", "chunk")
_DELTA_MODES = ("recurrent", "chunk")

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Argument checks and layout
# --------------------------------------------------------------------------------------------


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; return ``B, T, H, K, V``."""
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q, [B, T, H, K] = {_shape(q)}, got {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        b, t, h = q.shape[:3]
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {b}, {t}, {h} as in q, got {_shape(v)}"
        )
    if q.shape[1] == 0:
        raise ValueError(f"q must hold at least one time step, got shape {_shape(q)}")
    b, t, h, dk = q.shape
    return b, t, h, dk, v.shape[3]


def _check_like(
    name: str, x: Any, shape: tuple[int, ...], layout: str, ref: torch.Tensor
) -> torch.Tensor:
    """Check a floating tensor of an exact shape on the device of ``ref``."""
    check_tensor(name, x, floating=True)
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {_shape(x)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of q ({ref.device}), got {x.device}")
    return x


def _check_log_gate(
    name: str, g: Any, shape: tuple[int, ...], layout: str, ref: torch.Tensor
) -> torch.Tensor:
    """Check a log-space decay: its shape, and that every entry is ``<= 0``."""
    _check_like(name, g, shape, layout, ref)
    if g.numel() and bool((g > 0).any()):
        raise ValueError(
            f"{name} holds log decays, which must be <= 0 (the decay exp({name}) lies in "
            f"(0, 1]); got a largest value of {g.max().item():.6g}"
        )
    return g


def _check_mode(mode: Any, allowed: tuple[str, ...], chunk_size: Any) -> None:
    check_choice("mode", mode, allowed)
    check_positive_int("chunk_size", chunk_size)


def _check_flags(output_final_state: Any, **flags: Any) -> None:
    for name, value in (("output_final_state", output_final_state), *flags.items()):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def _scale(scale: Any, dk: int) -> float:
    check_positive_number("scale", scale, allow_none=True)
    return dk**-0.5 if scale is None else float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, ...] -> [B, H, T, ...]`` in the accumulation dtype."""
    return x.transpose(1, 2).to(dtype)


def _out(o: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, V] -> [B, T, H, V]`` in the dtype of ``like``."""
    return o.transpose(1, 2).to(like.dtype)


def _pad_time(x: torch.Tensor, total: int) -> torch.Tensor:
    """Zero-pad dim 2 (time, in ``[B, H, T, ...]``) up to ``total`` steps."""
    extra = total - x.shape[2]
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[2] = extra
    return torch.cat([x, x.new_zeros(pad_shape)], dim=2)


def _tril(c: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(diagonal)


# --------------------------------------------------------------------------------------------
# Gated linear attention: recurrent, parallel and chunkwise kernels
#
# All kernels take ``[B, H, T, ...]`` tensors in the accumulation dtype, with ``q`` already
# multiplied by ``scale``; ``g`` is None (no decay), ``[B, H, T]`` (one log decay per head and
# step) or ``[B, H, T, K]`` (one per key row); ``s0`` is ``[B, H, K, V]`` or None.
# --------------------------------------------------------------------------------------------


def _decay_rows(g_t: torch.Tensor) -> torch.Tensor:
    """The multiplier ``exp(g_t)`` shaped to scale a ``[B, H, K, V]`` state."""
    d = torch.exp(g_t)
    return d[..., None, None] if g_t.ndim == 2 else d[..., None]


def _gated_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if s0 is None else s0
    outs = []
    for i in range(t):
        if g is not None:
            s = _decay_rows(g[:, :, i]) * s
        s = s + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], s))
    return torch.stack(outs, dim=2), s


def _segsum(g: torch.Tensor, vector: bool) -> torch.Tensor:
    """Sums of log gates over ``(j, i]``: ``out[i, j] = g_{j+1} + ... + g_i`` for ``j <= i``.

    ``-inf`` above the diagonal, so ``exp`` of the result is the causal decay matrix. Built as
    a cumulative sum of a masked copy rather than as ``G_i - G_j``, which would lose precision
    to cancellation once the running sum ``G`` is large. ``g`` is ``[..., T]`` (scalar gates;
    the result is ``[..., T, T]``) or ``[..., T, K]`` with ``vector`` (result ``[..., T, T, K]``).
    """
    t = g.shape[-2] if vector else g.shape[-1]
    strict = _tril(t, g.device, -1)
    causal = _tril(t, g.device, 0)
    if vector:
        x = g[..., :, None, :].expand(*g.shape[:-2], t, t, g.shape[-1])
        x = x.masked_fill(~strict[..., None], 0.0).cumsum(dim=-3)
        return x.masked_fill(~causal[..., None], float("-inf"))
    x = g[..., :, None].expand(*g.shape, t)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    return x.masked_fill(~causal, float("-inf"))


def _suffix_sum(g: torch.Tensor, dim: int) -> torch.Tensor:
    """``out_j = sum_{s > j} g_s`` along ``dim``, without subtracting large running sums."""
    inclusive = g.flip(dim).cumsum(dim).flip(dim)
    tail = inclusive.narrow(dim, 1, g.shape[dim] - 1)
    return torch.cat([tail, torch.zeros_like(g.narrow(dim, 0, 1))], dim=dim)


def _gated_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = q.shape[2]
    if g is None:
        scores = (q @ k.transpose(-1, -2)).masked_fill(~_tril(t, q.device), 0.0)
        q_in, k_out, total = q, k, None
    elif g.ndim == 3:
        scores = (q @ k.transpose(-1, -2)) * torch.exp(_segsum(g, vector=False))
        q_in = q * torch.exp(g.cumsum(-1))[..., None]
        k_out = k * torch.exp(_suffix_sum(g, dim=-1))[..., None]
        total = torch.exp(g.sum(-1))[..., None, None]
    else:
        decay = torch.exp(_segsum(g, vector=True))  # [B, H, T, T, K]
        scores = torch.einsum("bhik,bhjk,bhijk->bhij", q, k, decay)
        q_in = q * torch.exp(g.cumsum(-2))
        k_out = k * torch.exp(_suffix_sum(g, dim=-2))
        total = torch.exp(g.sum(-2))[..., None]
    o = scores @ v
    s = k_out.transpose(-1, -2) @ v
    if s0 is not None:
        o = o + q_in @ s0
        s = s + (s0 if total is None else total * s0)
    return o, s


#: Largest log-decay range over which a block of decayed scores may be computed as one
#: product of ``q exp(gq - ref)`` and ``k exp(ref - gk)``: ``exp(30)`` is far from overflow
#: in float32 and costs no relative precision.
_SAFE_LOG_RANGE = 30.0


def _gla_intra(
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
    with ``strict``, which keeps only ``j < i``). The chunk is cut into row blocks of ``sub``
    rows (fla's secondary level). For the block starting at row ``r`` and a key ``j < r``,
    the exponent splits at the reference ``G_{r-1} = gk_{r-1}`` into ``(gq_i - G_{r-1}) +
    (G_{r-1} - gk_j)``, both ``<= 0``, so those scores are one matrix product of
    ``q_i exp(gq_i - G_{r-1})`` and ``k_j exp(G_{r-1} - gk_j)``. Keys inside the block have
    ``G_{r-1} - gk_j >= 0``: when the block's decay range is small (at most
    ``_SAFE_LOG_RANGE``, always true for RWKV-7's decays) the same product covers them and the
    triangle is masked afterwards; otherwise they get the exact pairwise ``[sub, sub, K]``
    factor, masked to the triangle before ``exp``.
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
        if ranges[blk] <= _SAFE_LOG_RANGE:  # one product over keys 0 .. e-1, then the mask
            k_ref = k[..., :e, :] * torch.exp(ref - gk[..., :e, :])  # exponents <= the range
            block = (q_ref @ k_ref.transpose(-1, -2)).tril(r - 1 if strict else r)
        else:  # keys before the block by the product, keys inside it pairwise
            pair = gqi[..., :, None, :] - gk[..., None, r:e, :]
            keep = _tril(e - r, q.device, -1 if strict else 0)
            pair = pair.masked_fill(~keep[..., None], float("-inf"))
            block = torch.einsum("...ik,...jk,...ijk->...ij", qi, k[..., r:e, :], torch.exp(pair))
            if r > 0:
                k_ref = k[..., :r, :] * torch.exp(ref - gk[..., :r, :])  # exponents <= 0
                block = torch.cat([q_ref @ k_ref.transpose(-1, -2), block], dim=-1)
        if e < c:
            block = torch.cat([block, q.new_zeros(*q.shape[:-2], e - r, c - e)], dim=-1)
        rows.append(block)
    return torch.cat(rows, dim=-2)


def _time_major(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``[B, H, T, ...] -> [N, B, H, C, ...]``, contiguous and zero-padded to ``N * C`` steps.

    Chunk-major order makes every per-chunk slice ``x[i]`` one contiguous block, so the
    sequential pass over chunks reads no strided memory, and all batched products over
    ``(chunk, batch, head)`` flatten to plain ``bmm`` calls without copies.
    """
    x = _pad_time(x, n * c)
    return x.reshape(*x.shape[:2], n, c, *x.shape[3:]).movedim(2, 0).contiguous()


def _scalar_decay_matrix(gcum: torch.Tensor) -> torch.Tensor:
    """``D_ij = exp(G_i - G_j)`` for ``j <= i`` from cumulative log gates ``G [..., C]``.

    Above the diagonal the exponent is ``>= 0`` and could overflow, so it is zeroed first
    (``exp -> 1``); callers discard those entries with ``tril_``, so no ``inf`` ever reaches a
    product or its gradient.
    """
    return (gcum[..., :, None] - gcum[..., None, :]).tril_().exp_()


def _from_time_major(o: torch.Tensor, b: int, h: int, t: int) -> torch.Tensor:
    """``[N * B * H, C, V]`` chunk outputs back to ``[B, H, T, V]``."""
    c, dv = o.shape[-2:]
    n = o.shape[0] // (b * h)
    o = o.view(n, b, h, c, dv).permute(1, 2, 0, 3, 4).reshape(b, h, n * c, dv)
    return o[:, :, :t]


def _gated_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise gated linear attention: intra-chunk attention plus one pass over chunks.

    Per chunk, with ``G`` the cumulative log gate from its start and ``S`` the entering state,
    ``O = (Q * exp(G)) S + (Q K^T * D) V`` and ``S <- exp(G_C) S + (K * exp(G_C - G))^T V``,
    where ``D_ij = exp(G_i - G_j)`` (``j <= i``) for scalar gates and the per-key version
    (``_gla_intra``) for GLA's ``[B, H, T, K]`` gates.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk, t)
    n = math.ceil(t / c)
    bh = b * h
    # Padding steps have k = 0 (they write nothing) and g = 0 (they do not decay the state).
    q, k, v = (_time_major(x, n, c) for x in (q, k, v))  # [N, B, H, C, K | V]
    if g is None:
        scores = (q @ k.transpose(-1, -2)).tril_()
        q_in, k_out, carry = q, k, None
    elif g.ndim == 3:  # scalar gates [B, H, T]
        gcum = _time_major(g, n, c).cumsum(-1)  # [N, B, H, C]
        scores = (q @ k.transpose(-1, -2)).mul_(_scalar_decay_matrix(gcum)).tril_()
        q_in = q * torch.exp(gcum)[..., None]
        k_out = k * torch.exp(gcum[..., -1:] - gcum)[..., None]
        carry = torch.exp(gcum[..., -1]).reshape(n, bh, 1, 1)
    else:  # per-key gates [B, H, T, K]
        gcum = _time_major(g, n, c).cumsum(-2)  # [N, B, H, C, K]
        scores = _gla_intra(q, k, gcum, gcum, sub=min(16, c))
        q_in = q * torch.exp(gcum)
        k_out = k * torch.exp(gcum[..., -1:, :] - gcum)
        carry = torch.exp(gcum[..., -1, :]).reshape(n, bh, dk, 1)
    # What each chunk adds to the state, then the one sequential pass over chunks.
    delta = (k_out.transpose(-1, -2) @ v).view(n, bh, dk, dv)
    s = q.new_zeros(bh, dk, dv) if s0 is None else s0.reshape(bh, dk, dv)
    before = []
    for i in range(n):
        before.append(s)
        s = delta[i] + s if carry is None else torch.addcmul(delta[i], carry[i], s)
    o = torch.bmm(q_in.reshape(n * bh, c, dk), torch.stack(before).view(n * bh, dk, dv))
    o = o.baddbmm(scores.view(n * bh, c, c), v.view(n * bh, c, dv))
    return _from_time_major(o, b, h, t), s.view(b, h, dk, dv)


def _gated(
    mode: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == "recurrent":
        return _gated_recurrent(q, k, v, g, s0)
    if mode == "parallel":
        return _gated_parallel(q, k, v, g, s0)
    return _gated_chunk(q, k, v, g, s0, chunk)


# --------------------------------------------------------------------------------------------
# Delta rules: recurrent and chunkwise (WY / UT) kernels
# --------------------------------------------------------------------------------------------


def _delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if s0 is None else s0
    outs = []
    for i in range(t):
        if g is not None:
            s = torch.exp(g[:, :, i])[..., None, None] * s
        k_i = k[:, :, i]
        err = v[:, :, i] - torch.einsum("bhk,bhkv->bhv", k_i, s)  # what the memory got wrong
        s = s + (beta[:, :, i, None] * k_i)[..., :, None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], s))
    return torch.stack(outs, dim=2), s


def _delta_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (gated) delta rule in the WY / UT form; see ``delta_rule`` for the maths.

    Within a chunk, with ``A = strictly-lower(diag(beta) (K K^T * D))`` and ``D_ij =
    exp(G_i - G_j)``, the corrected writes are ``U - W S_0`` where ``(I + A) U = diag(beta) V``
    and ``(I + A) W = diag(beta exp(G)) K``: two triangular solves for all chunks at once.
    Only the state hand-off between chunks is sequential: ``S <- exp(G_C) S + K_out^T new``.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk, t)
    n = math.ceil(t / c)
    bh = b * h
    # Padding steps have k = 0 and beta = 0 (no write) and g = 0 (no decay).
    q, k, v = (_time_major(x, n, c) for x in (q, k, v))  # [N, B, H, C, K | V]
    beta = _time_major(beta, n, c)  # [N, B, H, C]
    kt = k.transpose(-1, -2)
    a = k @ kt  # becomes I + A, in place
    scores = q @ kt  # becomes (Q K^T * D), causal with the diagonal
    if g is None:
        q_in, k_out, w_in, carry = q, k, beta[..., None] * k, None
        scores.tril_()
    else:
        gcum = _time_major(g, n, c).cumsum(-1)  # G_i, [N, B, H, C]
        decay = _scalar_decay_matrix(gcum)  # D_ij = exp(G_i - G_j), j <= i
        a.mul_(decay)
        scores.mul_(decay).tril_()
        q_decay = gcum.exp()
        q_in = q * q_decay[..., None]  # reads the incoming state decayed to step i
        k_out = k * torch.exp(gcum[..., -1:] - gcum)[..., None]  # writes decayed to chunk end
        w_in = (beta * q_decay)[..., None] * k
        carry = torch.exp(gcum[..., -1]).reshape(n, bh, 1, 1)  # exp(G_C)
    a.mul_(beta[..., None]).tril_(-1).diagonal(dim1=-2, dim2=-1).fill_(1.0)
    u = torch.linalg.solve_triangular(a, beta[..., None] * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a, w_in, upper=False, unitriangular=True)
    # The one sequential pass: chunk i's corrected writes U - W S, then the hand-off.
    u, w = u.view(n, bh, c, dv), w.view(n, bh, c, dk)
    k_out_t = k_out.view(n, bh, c, dk).transpose(-1, -2)
    s = q.new_zeros(bh, dk, dv) if s0 is None else s0.reshape(bh, dk, dv)
    before, writes = [], []
    for i in range(n):
        new = torch.baddbmm(u[i], w[i], s, alpha=-1.0)  # U - W S_0, [B*H, C, V]
        before.append(s)
        writes.append(new)
        s = torch.baddbmm(s if carry is None else carry[i] * s, k_out_t[i], new)
    # Outputs of all chunks at once: the decayed read of the incoming state plus the
    # intra-chunk attention over the corrected writes.
    o = torch.bmm(q_in.reshape(n * bh, c, dk), torch.stack(before).view(n * bh, dk, dv))
    o = o.baddbmm(scores.view(n * bh, c, c), torch.stack(writes).view(n * bh, c, dv))
    return _from_time_major(o, b, h, t), s.view(b, h, dk, dv)


# --------------------------------------------------------------------------------------------
# The generalised (diagonal-plus-low-rank) delta rule: recurrent and chunkwise kernels
# --------------------------------------------------------------------------------------------


def _dplr_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    outs = []
    for i in range(q.shape[2]):
        read = torch.einsum("bhk,bhkv->bhv", a[:, :, i], s)  # a_t^T S_{t-1}: [V]
        s = (
            torch.exp(g[:, :, i])[..., None] * s
            + b[:, :, i, :, None] * read[..., None, :]
            + k[:, :, i, :, None] * v[:, :, i, None, :]
        )
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], s))
    return torch.stack(outs, dim=2), s


def _dplr_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise generalised delta rule; see :func:`dplr_delta_rule` for the derivation."""
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk, t)
    n = math.ceil(t / c)
    bh = bsz * h
    # Padding steps have k = a = b = 0 (no read, no write) and g = 0 (no decay).
    q, k, v, a, b, g = (_time_major(x, n, c) for x in (q, k, v, a, b, g))  # [N, B, H, C, .]
    gcum = g.cumsum(-2)  # G_i, per key row
    g_prev = gcum - g  # G_{i-1}: the reads a_i^T S_{i-1} see the state before step i decays
    sub = min(16, c)
    a_b = _gla_intra(a, b, g_prev, gcum, sub, strict=True)  # how read j feeds read i
    a_k = _gla_intra(a, k, g_prev, gcum, sub, strict=True)  # how write j feeds read i
    q_b = _gla_intra(q, b, gcum, gcum, sub)  # what output i sees of read j
    q_k = _gla_intra(q, k, gcum, gcum, sub)  # ... and of write j
    # The reads solve (I - A_ab) U = (a * exp(G_{i-1})) S_0 + A_ak V: U = W S_0 + U0.
    lhs = -a_b
    lhs.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    w = torch.linalg.solve_triangular(lhs, a * torch.exp(g_prev), upper=False, unitriangular=True)
    u0 = torch.linalg.solve_triangular(lhs, a_k @ v, upper=False, unitriangular=True)
    to_end = torch.exp(gcum[..., -1:, :] - gcum)  # decay from step i to the chunk end
    b_out_t = (b * to_end).view(n, bh, c, dk).transpose(-1, -2)
    kv = ((k * to_end).transpose(-1, -2) @ v).view(n, bh, dk, dv)
    carry = torch.exp(gcum[..., -1, :]).reshape(n, bh, dk, 1)
    w, u0 = w.view(n, bh, c, dk), u0.view(n, bh, c, dv)
    s = s.reshape(bh, dk, dv)
    before, reads = [], []
    for i in range(n):
        u = torch.baddbmm(u0[i], w[i], s)  # the reads a_i^T S_{i-1} of chunk i, [B*H, C, V]
        before.append(s)
        reads.append(u)
        s = torch.baddbmm(torch.addcmul(kv[i], carry[i], s), b_out_t[i], u)
    o = torch.bmm((q * torch.exp(gcum)).view(n * bh, c, dk), torch.stack(before).view(-1, dk, dv))
    o = o.baddbmm(q_b.view(n * bh, c, c), torch.stack(reads).view(n * bh, c, dv))
    o = o.baddbmm(q_k.view(n * bh, c, c), v.view(n * bh, c, dv))
    return _from_time_major(o, bsz, h, t), s.view(bsz, h, dk, dv)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


BACKENDS = ("auto", "torch", "triton")


def _use_kernel(
    backend: Any,
    mode: str,
    q: torch.Tensor,
    chunk_size: int,
    dk: int,
    *,
    forward_only: tuple[torch.Tensor | None, ...] | None = None,
) -> bool:
    """Whether to run a Triton chunk kernel (``effarch.linear.chunk_kernel`` or, for the delta
    rules, the forward-only ``effarch.linear.delta_kernel``).

    ``"torch"``: never. ``"triton"``: always, or a clear error saying why it cannot.
    ``"auto"``: on CUDA tensors in chunk mode when the kernel supports the call.
    ``forward_only``: the inputs of a kernel without a backward pass; it is then refused
    whenever autograd would record through one of them.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return False
    reason = None
    if mode != "chunk":
        reason = f"the kernel is the chunk form; mode is {mode!r}"
    elif chunk_size < 16 or chunk_size & (chunk_size - 1):
        reason = f"the kernel needs a power-of-two chunk_size >= 16, got {chunk_size}"
    elif dk > 256:
        reason = f"the kernel supports K up to 256, got {dk}"
    elif forward_only is not None and grad_required(*forward_only):
        reason = (
            "the kernel is forward only and an input requires grad (use backend='torch' to "
            "train, or torch.no_grad() for inference)"
        )
    else:
        reason = triton_unusable_reason(q)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}")
        return True
    return reason is None and q.device.type == "cuda"


def _initial(
    initial_state: Any, b: int, h: int, dk: int, dv: int, ref: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    if initial_state is None:
        return None
    _check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", ref)
    return initial_state.to(dtype)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: State | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    r"""Causal linear attention (Katharopoulos et al., 2020) without a decay.

    Recurrence, per batch element and head, with ``S_0 = initial_state`` (zeros by default)::

        S_t = S_{t-1} + k_t v_t^T                       # [K, V]
        o_t = S_t^T (scale q_t)                         # = sum_{s<=t} (scale q_t . k_s) v_s

    With ``normalize=True`` the output is divided by the same sum over the keys,
    ``o_t / ((scale q_t) . z_t)`` with ``z_t = z_{t-1} + k_t`` (``[K]``), i.e. the attention
    weights ``q_t . k_s`` are normalised to sum to one; that only makes sense for positive
    features (apply a feature map first), and the division is exact (no epsilon).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (same dtype and device).
        scale: multiplies ``q``; default ``K ** -0.5``.
        normalize: divide by the running normaliser described above.
        initial_state: ``[B, H, K, V]``, or with ``normalize`` the pair ``(S, z)`` with
            ``z: [B, H, K]``.
        output_final_state: also return the state after the last step (same form).
        mode: ``"recurrent"``, ``"parallel"`` or ``"chunk"`` (see the module docstring).
        chunk_size: steps per chunk in ``"chunk"`` mode (``T`` need not be a multiple).
        backend: ``"torch"``, ``"triton"`` or ``"auto"``, as in :func:`simple_gla`; the
            kernel does not normalise, so ``normalize=True`` always runs in PyTorch.

    Returns:
        ``(o, final_state)``: ``o: [B, T, H, V]`` in the dtype of ``q``; ``final_state`` is
        ``None`` unless ``output_final_state``.

    fla: ``fla.ops.linear_attn.chunk_linear_attn`` / ``fused_recurrent_linear_attn`` with the
    same arguments, except that fla normalises by default and adds ``1e-10`` to the
    denominator, and that its state does not carry ``z``.
    """
    b, _, h, dk, dv = _check_qkv(q, k, v)
    _check_mode(mode, _ALL_MODES, chunk_size)
    _check_flags(output_final_state, normalize=normalize)
    scale = _scale(scale, dk)
    dtype = _compute_dtype(q.dtype)
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
    s0 = None
    if normalize:
        # The normaliser obeys the same recurrence with v_t = 1: carry it as one more column.
        vh = torch.cat([vh, torch.ones_like(vh[..., :1])], dim=-1)
        if initial_state is not None:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(
                    "initial_state must be a pair (S [B, H, K, V], z [B, H, K]) when "
                    f"normalize=True, got {type(initial_state).__name__}"
                )
            s_in, z_in = initial_state
            s_in = _initial(s_in, b, h, dk, dv, q, dtype)
            _check_like("initial_state z", z_in, (b, h, dk), "[B, H, K]", q)
            s0 = torch.cat([s_in, z_in.to(dtype)[..., None]], dim=-1)
    else:
        s0 = _initial(initial_state, b, h, dk, dv, q, dtype)
        if _use_kernel(backend, mode, q, chunk_size, dk):
            from .chunk_kernel import chunk_scalar_decay

            return chunk_scalar_decay(
                q, k, v, None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, chunk_size=chunk_size,
            )  # fmt: skip
    if normalize and backend == "triton":
        raise ValueError("backend='triton' cannot run: the kernel does not normalise")
    o, s = _gated(mode, qh, kh, vh, None, s0, chunk_size)
    final: State | None = s if output_final_state else None
    if normalize:
        o = o[..., :dv] / o[..., dv:]
        final = (s[..., :dv], s[..., dv]) if output_final_state else None
    return _out(o, q), final


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Linear attention with one data-dependent decay per head and step.

    Recurrence, per batch element and head (``g_t`` a scalar, ``exp(g_t)`` in ``(0, 1]``)::

        S_t = exp(g_t) S_{t-1} + k_t v_t^T
        o_t = S_t^T (scale q_t) = sum_{s<=t} exp(g_{s+1} + ... + g_t) (scale q_t . k_s) v_s

    This is the scalar-gated form shared by RetNet (fixed ``g``), Lightning Attention and
    Mamba-2's SSD (``g = A dt``); the chunk mode is the SSD block decomposition.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decays, all ``<= 0``.
        scale: multiplies ``q``; default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]``.
        output_final_state: also return the state after the last step.
        mode: ``"recurrent"``, ``"parallel"`` or ``"chunk"``.
        chunk_size: steps per chunk in ``"chunk"`` mode.
        backend: ``"torch"``, ``"triton"`` (the chunkwise Triton kernel, forward and
            backward: on a GPU, or on the CPU under ``TRITON_INTERPRET=1``) or ``"auto"``
            (the kernel for CUDA tensors in chunk mode, PyTorch otherwise).

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g, scale, initial_state,
    output_final_state)`` and ``fused_recurrent_simple_gla``.
    """
    b, t, h, dk, dv = _check_qkv(q, k, v)
    _check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    _check_mode(mode, _ALL_MODES, chunk_size)
    _check_flags(output_final_state)
    scale = _scale(scale, dk)
    dtype = _compute_dtype(q.dtype)
    s0 = _initial(initial_state, b, h, dk, dv, q, dtype)
    if _use_kernel(backend, mode, q, chunk_size, dk):
        from .chunk_kernel import chunk_scalar_decay

        return chunk_scalar_decay(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
    o, s = _gated(mode, qh, kh, vh, _heads(g, dtype), s0, chunk_size)
    return _out(o, q), (s if output_final_state else None)


def retention_log_decays(
    num_heads: int, *, dtype: torch.dtype = torch.float32, device: Any = None
) -> torch.Tensor:
    """RetNet's fixed per-head log decays ``log(1 - 2^(-5-h))`` for ``h = 0 .. H-1``: ``[H]``."""
    check_positive_int("num_heads", num_heads)
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-5.0 - h)).to(dtype)


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""RetNet's retention (Sun et al., 2023): a fixed, head-dependent exponential decay.

    Recurrence for head ``h`` (``gamma_h = 1 - 2^(-5-h)``, so head 0 keeps ~32 steps in view
    and later heads ever more)::

        S_t = gamma_h S_{t-1} + k_t v_t^T
        o_t = S_t^T (scale q_t) = sum_{s<=t} gamma_h^(t-s) (scale q_t . k_s) v_s

    It is :func:`simple_gla` with ``g[:, :, h] = log(gamma_h)`` at every step (RetNet's
    rotation of ``q`` and ``k`` (xPos) and its group norm belong to the layer).

    Args, returns and modes as :func:`simple_gla`, without ``g``.

    fla: ``fla.ops.retention.chunk_retention`` / ``fused_recurrent_retention``.
    """
    b, t, h, dk, dv = _check_qkv(q, k, v)
    dtype = _compute_dtype(q.dtype)
    g = retention_log_decays(h, dtype=dtype, device=q.device).expand(b, t, h)
    return simple_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        mode=mode,
        chunk_size=chunk_size,
        backend=backend,
    )


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated linear attention (Yang et al., 2024): a data-dependent decay per key dimension.

    Recurrence, per batch element and head (``g_t: [K]``, the decay scales the rows of S)::

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
        o_t = S_t^T (scale q_t)
            = sum_{s<=t} (scale q_t * exp(G_t - G_s)) . k_s  v_s,   G_t = g_1 + ... + g_t

    Chunk mode: with ``G`` the cumulative log gate from the chunk start, the state entering a
    chunk is read as ``(q_i * exp(G_i)) S``, the state leaving it is
    ``diag(exp(G_C)) S + sum_j (k_j * exp(G_C - G_j)) v_j^T``, and the within-chunk scores
    ``sum_k q_ik k_jk exp(G_ik - G_jk)`` use fla's secondary chunking (sub-chunks of 16, a
    reference point between them so every exponent is ``<= 0``); see ``_gla_intra``. No
    exponent is ever positive, so strong decays (``g ~ -5`` per step) over long sequences give
    exact zeros, never ``inf`` or ``nan``. Parallel mode builds a ``[T, T, K]`` decay tensor.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` log decays, all ``<= 0`` (GLA uses ``logsigmoid(x) / 16``).
        scale, initial_state, output_final_state, mode, chunk_size: as :func:`simple_gla`.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.gla.chunk_gla(q, k, v, g, scale, initial_state, output_final_state)`` and
    ``fused_recurrent_gla`` (where the gate is called ``gk``).
    """
    b, t, h, dk, dv = _check_qkv(q, k, v)
    _check_log_gate("g", g, (b, t, h, dk), "[B, T, H, K]", q)
    _check_mode(mode, _ALL_MODES, chunk_size)
    _check_flags(output_final_state)
    scale = _scale(scale, dk)
    dtype = _compute_dtype(q.dtype)
    s0 = _initial(initial_state, b, h, dk, dv, q, dtype)
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
    o, s = _gated(mode, qh, kh, vh, _heads(g, dtype), s0, chunk_size)
    return _out(o, q), (s if output_final_state else None)


def _delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    mode: str,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, t, h, dk, dv = _check_qkv(q, k, v)
    if g is not None:
        _check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    _check_like("beta", beta, (b, t, h), "[B, T, H]", q)
    if mode == "parallel":
        raise ValueError(
            "mode must be one of ['recurrent', 'chunk'] for a delta rule, got 'parallel': its "
            "state is not a plain sum of outer products, so there is no quadratic masked form"
        )
    _check_mode(mode, _DELTA_MODES, chunk_size)
    _check_flags(output_final_state)
    scale = _scale(scale, dk)
    dtype = _compute_dtype(q.dtype)
    s0 = _initial(initial_state, b, h, dk, dv, q, dtype)
    inputs = (q, k, v, beta, g, initial_state)
    if _use_kernel(backend, mode, q, chunk_size, dk, forward_only=inputs):
        from .delta_kernel import chunk_delta_rule

        return chunk_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, chunk_size=chunk_size,
        )  # fmt: skip
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
    bh = _heads(beta, dtype)
    gh = None if g is None else _heads(g, dtype)
    if mode == "recurrent":
        o, s = _delta_recurrent(qh, kh, vh, bh, gh, s0)
    else:
        o, s = _delta_chunk(qh, kh, vh, bh, gh, s0, chunk_size)
    return _out(o, q), (s if output_final_state else None)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""DeltaNet's delta rule (Schlag et al., 2021; Yang et al., 2024): write only the error.

    Recurrence, per batch element and head: the memory first predicts ``S_{t-1}^T k_t`` for the
    key, then moves towards ``v_t`` by ``beta_t`` of the error (one step of online regression
    of ``v`` on ``k`` with learning rate ``beta_t``)::

        S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T = (I - beta_t k_t k_t^T) S_{t-1}
                                                              + beta_t k_t v_t^T
        o_t = S_t^T (scale q_t)

    With ``||k_t|| = 1`` and ``beta_t = 1`` the memory's value for ``k_t`` is replaced by
    ``v_t`` exactly; keys are not normalised here (DeltaNet L2-normalises them in the layer,
    fla's ``use_qk_l2norm_in_kernel``), and without that the recurrence may diverge.

    Chunk mode (the WY / UT form, Yang et al., 2024). Within a chunk of ``C`` steps starting
    from state ``S``, write ``u_t = beta_t (v_t - S_{t-1}^T k_t)`` (the scaled error, ``[V]``) so
    that ``S_t = S + sum_{s<=t} k_s u_s^T``. Substituting this into the definition of ``u_t``::

        u_t = beta_t v_t - beta_t S^T k_t - beta_t sum_{s<t} (k_t . k_s) u_s
        (I + A) U = diag(beta) V - diag(beta) K S,   A = strictly_lower(diag(beta) K K^T)

    so ``U = u - w S`` with ``u = T diag(beta) V``, ``w = T diag(beta) K`` and
    ``T = (I + A)^-1`` (unit lower triangular: one triangular solve per chunk, independent of
    ``S``, so it is done for all chunks at once). The only sequential part is then, chunk by
    chunk, ``U = u - w S``, ``O = Q S + (Q K^T * M) U`` (``M`` causal, diagonal included) and
    ``S <- S + K^T U``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strengths (usually a sigmoid, in ``(0, 1)``; ``(0, 2)`` allows
            negative eigenvalues). Not range-checked.
        scale, initial_state, output_final_state, chunk_size: as :func:`simple_gla`.
        mode: ``"recurrent"`` or ``"chunk"`` (there is no parallel form).
        backend: ``"torch"``, ``"triton"`` or ``"auto"``. ``"triton"`` runs the same chunk
            form in the Triton kernel :func:`~effarch.linear.delta_kernel.chunk_delta_rule`
            (on a GPU, or on the CPU under ``TRITON_INTERPRET=1``); it is forward only, so
            it refuses inputs that require grad while grad mode is on. ``"auto"`` picks the
            kernel for CUDA tensors in chunk mode when nothing requires grad, PyTorch
            otherwise.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta, scale, initial_state,
    output_final_state)`` with ``use_qk_l2norm_in_kernel=False``, and
    ``fused_recurrent_delta_rule``.
    """
    return _delta(
        q, k, v, None, beta, scale, initial_state, output_final_state, mode, chunk_size, backend
    )


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated DeltaNet's rule (Yang et al., 2025): decay the memory, then apply the delta rule.

    Recurrence, per batch element and head (``g_t`` a scalar log decay)::

        S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
        o_t = S_t^T (scale q_t)

    Chunk mode extends :func:`delta_rule`'s WY form with the decays. With ``G_t`` the
    cumulative log gate from the chunk start and ``S`` the entering state,
    ``S_t = exp(G_t) S + sum_{s<=t} exp(G_t - G_s) k_s u_s^T``, and the same substitution gives
    ``(I + A) U = diag(beta) V - diag(beta exp(G)) K S`` with
    ``A_ts = beta_t exp(G_t - G_s) (k_t . k_s)`` for ``s < t``. Hence ``U = u - w S``,
    ``u = T diag(beta) V``, ``w = T diag(beta exp(G)) K``, ``T = (I + A)^-1``, and per chunk
    ``O = (Q * exp(G)) S + (Q K^T * D) U`` and
    ``S <- exp(G_C) S + (K * exp(G_C - G))^T U``, where ``D_ts = exp(G_t - G_s)`` for
    ``s <= t`` and 0 otherwise. All exponents are ``<= 0``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decays, all ``<= 0``.
        beta: ``[B, T, H]`` write strengths.
        scale, initial_state, output_final_state, chunk_size: as :func:`simple_gla`.
        mode: ``"recurrent"`` or ``"chunk"``.
        backend: ``"torch"``, ``"triton"`` (the forward-only kernel) or ``"auto"``, as in
            :func:`delta_rule`.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale,
    initial_state, output_final_state)`` with ``use_qk_l2norm_in_kernel=False``, and
    ``fused_recurrent_gated_delta_rule``.
    """
    return _delta(
        q, k, v, g, beta, scale, initial_state, output_final_state, mode, chunk_size, backend
    )


def dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "recurrent",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The generalised delta rule with a diagonal-plus-low-rank transition (RWKV-7).

    Recurrence in this module's ``[K, V]`` state, per batch element and head::

        S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
            = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
        o_t = S_t^T (scale q_t)

    Note that ``a_t^T S_{t-1}`` reads the state *before* this step's decay. fla writes the
    state transposed, ``S' = S^T`` of shape ``[V, K]``, where the same recurrence reads
    ``S'_t = S'_{t-1} (diag(exp(gk_t)) + a_t b_t^T) + v_t k_t^T`` (the form quoted in
    ``fused_recurrent_dplr_delta_rule``); the tensors ``initial_state`` and ``final_state``
    are ``[B, H, K, V]`` in both, so they can be exchanged with fla as they are.

    Special cases: ``gk = 0, a = -k_hat, b = beta k_hat`` and keys ``beta k_hat`` give the delta
    rule; ``a = -exp(g) k_hat`` with ``gk = g`` the gated delta rule. RWKV-7 uses
    ``a = -kappa_hat``, ``b = kappa_hat * iclr`` (its in-context learning rate) and log decays
    ``gk = -exp(-0.5) * sigmoid(w_raw)``.

    Args:
        q, k, a, b: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gk: ``[B, T, H, K]`` log decays, all ``<= 0``.
        scale: multiplies ``q``; default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]``.
        output_final_state: also return the state after the last step.
        mode: ``"recurrent"`` (the step loop) or ``"chunk"`` (below).
        chunk_size: steps per chunk in ``"chunk"`` mode (``T`` need not be a multiple).

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    Chunkwise form. In a chunk entered with state ``S_0``, let ``G_i`` be the cumulative log
    decay (per key row) up to step ``i`` and ``u_i = S_{i-1}^T a_i`` the value-sized *read*
    of step ``i``. Unrolling the recurrence::

        S_i = exp(G_i) S_0 + sum_{j <= i} exp(G_i - G_j) * (b_j u_j^T + k_j v_j^T)
        u_i = S_0^T (a_i exp(G_{i-1})) + sum_{j < i} [A_ab]_ij u_j + sum_{j < i} [A_ak]_ij v_j

    with ``[A_ab]_ij = sum_d a_id b_jd exp(G_{i-1,d} - G_{j,d})`` (and ``A_ak`` with ``k``).
    So the reads of a chunk solve one unit lower-triangular system, ``(I - A_ab) U =
    (A * exp(G_{-1})) S_0 + A_ak V``, i.e. ``U = W S_0 + U_0`` with ``W`` and ``U_0`` from
    two triangular solves for all chunks at once (the WY idea of the delta rule, generalised).
    Then ``O = (Q * exp(G)) S_0 + Q_b U + Q_k V`` with the causal decayed scores ``Q_b, Q_k``
    (``j <= i``, exponent ``G_i - G_j``), and the state moves on as ``S <- exp(G_C) S +
    (B * exp(G_C - G))^T U + (K * exp(G_C - G))^T V``: only this hand-off is sequential.
    Every exponent is taken as a difference ``<= 0``, sub-chunked like GLA's.

    fla: ``fla.ops.generalized_delta_rule.fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk,
    scale, initial_state, output_final_state)`` (``mode="recurrent"``) and
    ``chunk_dplr_delta_rule`` (``mode="chunk"``).
    """
    bsz, t, h, dk, dv = _check_qkv(q, k, v)
    for name, x in (("a", a), ("b", b)):
        _check_like(name, x, (bsz, t, h, dk), "[B, T, H, K]", q)
    _check_log_gate("gk", gk, (bsz, t, h, dk), "[B, T, H, K]", q)
    _check_mode(mode, ("recurrent", "chunk"), chunk_size)
    _check_flags(output_final_state)
    scale = _scale(scale, dk)
    dtype = _compute_dtype(q.dtype)
    s = _initial(initial_state, bsz, h, dk, dv, q, dtype)
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
    ah, bh, gh = _heads(a, dtype), _heads(b, dtype), _heads(gk, dtype)
    if s is None:
        s = qh.new_zeros(bsz, h, dk, dv)
    if mode == "recurrent":
        o, s = _dplr_recurrent(qh, kh, vh, ah, bh, gh, s)
    else:
        o, s = _dplr_chunk(qh, kh, vh, ah, bh, gh, s, chunk_size)
    return _out(o, q), (s if output_final_state else None)
