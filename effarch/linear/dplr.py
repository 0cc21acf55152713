r"""The generalised delta rule with a diagonal-plus-low-rank transition (RWKV-7's).

Per batch element and head, with per-key log decays ``gk_t`` and the low-rank pair
``a_t, b_t`` (``[K]`` each)::

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale q_t)

It contains the delta rules (:mod:`effarch.linear.delta`) as special cases. The op has the
step loop (``"recurrent"``) and a chunkwise form (``"chunk"``) in which the reads of a
chunk solve one triangular system; see :func:`dplr_delta_rule`.
"""

from __future__ import annotations

import math

import torch

from .._checks import (
    check_bool,
    check_choice,
    check_like,
    check_linear_qkv,
    check_log_gate,
    check_positive_int,
)
from .common import (
    compute_dtype,
    from_heads,
    from_time_major,
    heads,
    intra_chunk_scores,
    load_state,
    resolve_scale,
    step_major,
    time_major,
)

__all__ = ["MODES", "dplr_delta_rule"]

MODES = ("recurrent", "chunk")


# --------------------------------------------------------------------------------------------
# The two forms, on checked [B, H, T, ...] tensors in the accumulation dtype (q scaled)
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
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    qs, ks, vs, as_, bs = (step_major(x) for x in (q, k, v, a, b))  # [T, B*H, K | V]
    decay = step_major(torch.exp(g))  # [T, B*H, K]
    s = s.reshape(bsz * h, dk, dv)
    outs = []
    for i in range(t):
        read = torch.bmm(as_[i, :, None, :], s)  # a_t^T S_{t-1}: [B*H, 1, V]
        # S_t = diag(exp(g_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        s = torch.baddbmm(s * decay[i, :, :, None], bs[i, :, :, None], read)
        s = torch.baddbmm(s, ks[i, :, :, None], vs[i, :, None, :])
        outs.append(torch.bmm(qs[i, :, None, :], s))
    o = torch.cat(outs, dim=1).view(bsz, h, t, dv)  # [B*H, T, V] -> [B, H, T, V]
    return o, s.view(bsz, h, dk, dv)


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
    q, k, v, a, b, g = (time_major(x, n, c) for x in (q, k, v, a, b, g))  # [N, B, H, C, .]
    gcum = g.cumsum(-2)  # G_i, per key row
    g_prev = gcum - g  # G_{i-1}: the reads a_i^T S_{i-1} see the state before step i decays
    sub = min(16, c)
    a_b = intra_chunk_scores(a, b, g_prev, gcum, sub, strict=True)  # how read j feeds read i
    a_k = intra_chunk_scores(a, k, g_prev, gcum, sub, strict=True)  # how write j feeds read i
    q_b = intra_chunk_scores(q, b, gcum, gcum, sub)  # what output i sees of read j
    q_k = intra_chunk_scores(q, k, gcum, gcum, sub)  # ... and of write j
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
    return from_time_major(o, bsz, h, t), s.view(bsz, h, dk, dv)


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


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
    Every exponent is a difference of cumulative log gates, bounded as in GLA's secondary
    chunking (``<= 0``, or at most ``SAFE_LOG_RANGE`` inside a sub-chunk of small decays).

    fla: ``fla.ops.generalized_delta_rule.fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk,
    scale, initial_state, output_final_state)`` (``mode="recurrent"``) and
    ``chunk_dplr_delta_rule`` (``mode="chunk"``).
    """
    bsz, t, h, dk, dv = check_linear_qkv(q, k, v)
    for name, x in (("a", a), ("b", b)):
        check_like(name, x, (bsz, t, h, dk), "[B, T, H, K]", q)
    check_log_gate("gk", gk, (bsz, t, h, dk), "[B, T, H, K]", q)
    check_choice("mode", mode, MODES)
    check_positive_int("chunk_size", chunk_size)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    s = load_state(initial_state, bsz, h, dk, dv, q, dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    ah, bh, gh = heads(a, dtype), heads(b, dtype), heads(gk, dtype)
    if s is None:
        s = qh.new_zeros(bsz, h, dk, dv)
    if mode == "recurrent":
        o, s = _dplr_recurrent(qh, kh, vh, ah, bh, gh, s)
    else:
        o, s = _dplr_chunk(qh, kh, vh, ah, bh, gh, s, chunk_size)
    return from_heads(o, q), (s if output_final_state else None)
