r"""Linear attention, RetNet's retention and gated linear attention: a decayed sum of writes.

Every op here keeps, per batch element and head, a state ``S [K, V]``, adds one outer
product per step and reads ``o_t = S_t^T (scale * q_t)``; only the decay differs:

* ``linear_attention``: ``S_t = S_{t-1} + k_t v_t^T`` (no decay).
* ``retention``: ``S_t = gamma_h S_{t-1} + k_t v_t^T`` with RetNet's ``gamma_h = 1 - 2^(-5-h)``.
* ``simple_gla``: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, one data-dependent gate per head.
* ``gla``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, a gate for each key row of ``S``.

Because the state is a plain (decayed) sum, each op has all three forms of
:mod:`effarch.linear.ops`: the step loop (``"recurrent"``), the masked quadratic form
``O = (Q K^T * D) V`` (``"parallel"``, with ``D = exp(segsum(g))``, :func:`effarch.scan.segsum`)
and the chunkwise form (``"chunk"``). ``linear_attention``, ``retention`` and ``simple_gla``
also run the chunkwise Triton kernel (:mod:`effarch.linear.chunk_kernel`) by the backend
rule of :mod:`effarch._kernels`.

The internal forms below take checked ``[B, H, T, ...]`` tensors in the accumulation dtype,
``q`` already multiplied by ``scale``; ``g`` is None (no decay), ``[B, H, T]`` (one log
decay per head and step) or ``[B, H, T, K]`` (one per key row); ``s0`` is ``[B, H, K, V]``
or None.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import (
    check_bool,
    check_choice,
    check_like,
    check_linear_qkv,
    check_log_gate,
    check_positive_int,
)
from .._kernels import use_triton
from ..scan import segsum
from .chunk_kernel import chunk_kernel_limit, launch_chunk_scalar_decay
from .common import (
    compute_dtype,
    from_heads,
    from_time_major,
    heads,
    intra_chunk_scores,
    load_state,
    resolve_scale,
    scalar_decay_matrix,
    step_major,
    time_major,
    tril,
)

__all__ = [
    "MODES",
    "State",
    "gla",
    "linear_attention",
    "retention",
    "retention_log_decays",
    "simple_gla",
]

MODES = ("recurrent", "parallel", "chunk")

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""A linear-attention state: ``S [B, H, K, V]``, or the pair ``(S, z [B, H, K])`` with
``normalize=True``."""


# --------------------------------------------------------------------------------------------
# The three forms
# --------------------------------------------------------------------------------------------


def _gated_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    qs, ks, vs = (step_major(x) for x in (q, k, v))  # [T, B*H, K | V]
    decay = None if g is None else step_major(torch.exp(g))  # [T, B*H] or [T, B*H, K]
    s = q.new_zeros(b * h, dk, dv) if s0 is None else s0.reshape(b * h, dk, dv)
    outs = []
    for i in range(t):
        if decay is not None:  # one factor per head, or per key row (GLA)
            s = s * (decay[i, :, None, None] if decay.ndim == 2 else decay[i, :, :, None])
        s = torch.baddbmm(s, ks[i, :, :, None], vs[i, :, None, :])  # S + k v^T
        outs.append(torch.bmm(qs[i, :, None, :], s))  # q^T S: [B*H, 1, V]
    o = torch.cat(outs, dim=1).view(b, h, t, dv)  # [B*H, T, V] -> [B, H, T, V]
    return o, s.view(b, h, dk, dv)


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
        scores = (q @ k.transpose(-1, -2)).masked_fill(~tril(t, q.device), 0.0)
        q_in, k_out, total = q, k, None
    elif g.ndim == 3:
        scores = (q @ k.transpose(-1, -2)) * torch.exp(segsum(g))
        q_in = q * torch.exp(g.cumsum(-1))[..., None]
        k_out = k * torch.exp(_suffix_sum(g, dim=-1))[..., None]
        total = torch.exp(g.sum(-1))[..., None, None]
    else:
        decay = torch.exp(segsum(g, dim=-2))  # [B, H, T, T, K]
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
    (:func:`~effarch.linear.common.intra_chunk_scores`) for GLA's ``[B, H, T, K]`` gates.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk, t)
    n = math.ceil(t / c)
    bh = b * h
    # Padding steps have k = 0 (they write nothing) and g = 0 (they do not decay the state).
    q, k, v = (time_major(x, n, c) for x in (q, k, v))  # [N, B, H, C, K | V]
    if g is None:
        scores = (q @ k.transpose(-1, -2)).tril_()
        q_in, k_out, carry = q, k, None
    elif g.ndim == 3:  # scalar gates [B, H, T]
        gcum = time_major(g, n, c).cumsum(-1)  # [N, B, H, C]
        scores = (q @ k.transpose(-1, -2)).mul_(scalar_decay_matrix(gcum)).tril_()
        q_in = q * torch.exp(gcum)[..., None]
        k_out = k * torch.exp(gcum[..., -1:] - gcum)[..., None]
        carry = torch.exp(gcum[..., -1]).reshape(n, bh, 1, 1)
    else:  # per-key gates [B, H, T, K]
        gcum = time_major(g, n, c).cumsum(-2)  # [N, B, H, C, K]
        scores = intra_chunk_scores(q, k, gcum, gcum, sub=min(16, c))
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
    return from_time_major(o, b, h, t), s.view(b, h, dk, dv)


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


def _check_mode(mode: Any, chunk_size: Any) -> None:
    check_choice("mode", mode, MODES)
    check_positive_int("chunk_size", chunk_size)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


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
            ``z: [B, H, K]`` (either half may be ``None``, a zero part).
        output_final_state: also return the state after the last step (same form).
        mode: ``"recurrent"``, ``"parallel"`` or ``"chunk"`` (see :mod:`effarch.linear.ops`).
        chunk_size: steps per chunk in ``"chunk"`` mode (``T`` need not be a multiple).
        backend: ``"torch"``, ``"triton"`` or ``"auto"``, as in :func:`simple_gla`; the
            kernel does not normalise, so ``normalize=True`` runs in PyTorch under
            ``"auto"`` and raises a ValueError under ``"triton"``.

    Returns:
        ``(o, final_state)``: ``o: [B, T, H, V]`` in the dtype of ``q``; ``final_state`` is
        ``None`` unless ``output_final_state``.

    fla: ``fla.ops.linear_attn.chunk_linear_attn`` / ``fused_chunk_linear_attn`` /
    ``fused_recurrent_linear_attn`` with the same arguments (``scale``, ``initial_state``,
    ``output_final_state``, ``normalize``; keywords only here), except that:
    ``chunk_linear_attn`` and ``fused_chunk_linear_attn`` default to ``normalize=True``
    (``fused_recurrent_linear_attn``, like this op, to ``False``); fla adds ``1e-10`` to the
    denominator; and with ``normalize=True`` fla's states are also the pair ``(S, z)`` but
    with ``z: [B, 1, H, K]`` (``z[:, 0]`` here), and fla returns ``(None, z)`` rather than
    ``None`` when ``output_final_state=False``.
    """
    b, _, h, dk, dv = check_linear_qkv(q, k, v)
    _check_mode(mode, chunk_size)
    check_bool("output_final_state", output_final_state)
    check_bool("normalize", normalize)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    s0 = None
    if not normalize:
        s0 = load_state(initial_state, b, h, dk, dv, q, dtype)
    elif initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError(
                "initial_state must be a pair (S [B, H, K, V], z [B, H, K]) when "
                f"normalize=True, got {type(initial_state).__name__}"
            )
        s_in, z_in = initial_state
        s_in = load_state(s_in, b, h, dk, dv, q, dtype)
        if s_in is None:  # a missing half is zero, as fla reads it
            s_in = q.new_zeros(b, h, dk, dv, dtype=dtype)
        if z_in is None:
            z_in = q.new_zeros(b, h, dk, dtype=dtype)
        check_like("initial_state z", z_in, (b, h, dk), "[B, H, K]", q)
        # The normaliser obeys the same recurrence with v_t = 1: one more column of S.
        s0 = torch.cat([s_in, z_in.to(dtype)[..., None]], dim=-1)
    if normalize:
        limit = "the kernel does not normalise"
    else:
        limit = chunk_kernel_limit(mode, chunk_size, dk)
    if use_triton(backend, q, limit=limit):
        return launch_chunk_scalar_decay(
            q, k, v, None, scale, initial_state, output_final_state, chunk_size
        )
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    if normalize:
        vh = torch.cat([vh, torch.ones_like(vh[..., :1])], dim=-1)
    o, s = _gated(mode, qh, kh, vh, None, s0, chunk_size)
    final: State | None = s if output_final_state else None
    if normalize:
        o = o[..., :dv] / o[..., dv:]
        final = (s[..., :dv], s[..., dv]) if output_final_state else None
    return from_heads(o, q), final


def _simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    mode: str,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`simple_gla` on checked arguments (``scale`` resolved, ``initial_state`` checked)."""
    dk = q.shape[-1]
    if use_triton(backend, q, limit=chunk_kernel_limit(mode, chunk_size, dk)):
        return launch_chunk_scalar_decay(
            q, k, v, g, scale, initial_state, output_final_state, chunk_size
        )
    dtype = compute_dtype(q.dtype)
    s0 = None if initial_state is None else initial_state.to(dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    o, s = _gated(mode, qh, kh, vh, heads(g, dtype), s0, chunk_size)
    return from_heads(o, q), (s if output_final_state else None)


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
        backend: ``"torch"`` (the PyTorch form of ``mode``), ``"triton"`` (the chunkwise
            Triton kernel :func:`~effarch.linear.chunk_scalar_decay`, forward and backward:
            on a GPU, or on the CPU under ``TRITON_INTERPRET=1``; a ValueError says why when
            it cannot run, e.g. in another mode or with a chunk size that is not a power of
            two ``>= 16``) or ``"auto"`` (the kernel for CUDA tensors when it can run them,
            PyTorch otherwise): the rule of :mod:`effarch._kernels`.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=g, scale=scale,
    initial_state=initial_state, output_final_state=output_final_state)`` (keywords: fla's
    signature is ``(q, k, v, g=None, g_gamma=None, scale=None, ...)``) and
    ``fused_recurrent_simple_gla``.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    _check_mode(mode, chunk_size)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    if initial_state is not None:
        check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", q)
    return _simple_gla(
        q, k, v, g, scale, initial_state, output_final_state, mode, chunk_size, backend
    )


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

    Args, returns, modes and backends as :func:`simple_gla`, without ``g``.

    fla: ``fla.ops.retention.chunk_retention`` / ``fused_recurrent_retention``.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    _check_mode(mode, chunk_size)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    if initial_state is not None:
        check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", q)
    g = retention_log_decays(h, dtype=compute_dtype(q.dtype), device=q.device).expand(b, t, h)
    return _simple_gla(
        q, k, v, g, scale, initial_state, output_final_state, mode, chunk_size, backend
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
    reference point between them so every exponent is ``<= 0``, or at most
    ``SAFE_LOG_RANGE`` inside a sub-chunk whose decays are that small); see
    :func:`~effarch.linear.common.intra_chunk_scores`. No exponent exceeds that bound, so strong
    decays (``g ~ -5`` per step) over long sequences give exact zeros, never ``inf`` or
    ``nan``. Parallel mode builds a ``[T, T, K]`` decay tensor.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` log decays, all ``<= 0`` (GLA uses ``logsigmoid(x) / 16``).
        scale, initial_state, output_final_state, mode, chunk_size: as :func:`simple_gla`.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``.

    fla: ``fla.ops.gla.chunk_gla(q, k, v, g, scale, initial_state, output_final_state)`` and
    ``fused_recurrent_gla`` (where the gate is called ``gk``).
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    check_log_gate("g", g, (b, t, h, dk), "[B, T, H, K]", q)
    _check_mode(mode, chunk_size)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    s0 = load_state(initial_state, b, h, dk, dv, q, dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    o, s = _gated(mode, qh, kh, vh, heads(g, dtype), s0, chunk_size)
    return from_heads(o, q), (s if output_final_state else None)
