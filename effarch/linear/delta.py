r"""The delta rules: DeltaNet's and Gated DeltaNet's, which write only what the memory got wrong.

Per batch element and head the state ``S [K, V]`` first predicts ``S^T k_t`` for the key and
then moves towards ``v_t`` by ``beta_t`` of the error, after an optional decay ``exp(g_t)``::

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = S_t^T (scale q_t)

(``delta_rule``: no decay; ``gated_delta_rule``: ``g [B, T, H]``). The state is no longer a
plain sum of outer products, so there is no parallel form: the ops have the step loop
(``"recurrent"``) and the chunkwise WY / UT form (``"chunk"``), whose Triton kernel
(:mod:`effarch.linear.delta_kernel`, forward only) runs by the backend rule of
:mod:`effarch._kernels`.
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
from .._kernels import use_triton
from .chunk_kernel import chunk_kernel_limit
from .common import (
    compute_dtype,
    from_heads,
    from_time_major,
    heads,
    load_state,
    resolve_scale,
    scalar_decay_matrix,
    step_major,
    time_major,
)
from .delta_kernel import launch_chunk_delta_rule

__all__ = ["MODES", "delta_rule", "gated_delta_rule"]

MODES = ("recurrent", "chunk")


# --------------------------------------------------------------------------------------------
# The two forms, on checked [B, H, T, ...] tensors in the accumulation dtype (q scaled)
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
    dv = v.shape[-1]
    qs, ks, vs, bs = (step_major(x) for x in (q, k, v, beta))  # [T, B*H, K | V], [T, B*H]
    decay = None if g is None else step_major(torch.exp(g))  # [T, B*H]
    s = q.new_zeros(b * h, dk, dv) if s0 is None else s0.reshape(b * h, dk, dv)
    outs = []
    for i in range(t):
        if decay is not None:
            s = s * decay[i, :, None, None]
        k_i = ks[i, :, None, :]  # [B*H, 1, K]
        err = vs[i, :, None, :] - torch.bmm(k_i, s)  # what the memory got wrong: [B*H, 1, V]
        s = torch.baddbmm(s, (bs[i, :, None, None] * k_i).transpose(1, 2), err)
        outs.append(torch.bmm(qs[i, :, None, :], s))
    o = torch.cat(outs, dim=1).view(b, h, t, dv)  # [B*H, T, V] -> [B, H, T, V]
    return o, s.view(b, h, dk, dv)


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
    q, k, v = (time_major(x, n, c) for x in (q, k, v))  # [N, B, H, C, K | V]
    beta = time_major(beta, n, c)  # [N, B, H, C]
    kt = k.transpose(-1, -2)
    a = k @ kt  # becomes I + A, in place
    scores = q @ kt  # becomes (Q K^T * D), causal with the diagonal
    if g is None:
        q_in, k_out, w_in, carry = q, k, beta[..., None] * k, None
        scores.tril_()
    else:
        gcum = time_major(g, n, c).cumsum(-1)  # G_i, [N, B, H, C]
        decay = scalar_decay_matrix(gcum)  # D_ij = exp(G_i - G_j), j <= i
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
    return from_time_major(o, b, h, t), s.view(b, h, dk, dv)


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
    """Both public delta rules: check the arguments once, then run the kernel or a form."""
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    if g is not None:
        check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    check_like("beta", beta, (b, t, h), "[B, T, H]", q)
    if mode == "parallel":
        raise ValueError(
            "mode must be one of ['recurrent', 'chunk'] for a delta rule, got 'parallel': its "
            "state is not a plain sum of outer products, so there is no quadratic masked form"
        )
    check_choice("mode", mode, MODES)
    check_positive_int("chunk_size", chunk_size)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    s0 = load_state(initial_state, b, h, dk, dv, q, dtype)
    limit = chunk_kernel_limit(mode, chunk_size, dk)
    inputs = (q, k, v, beta, g, initial_state)
    if use_triton(backend, q, limit=limit, forward_only=inputs):
        return launch_chunk_delta_rule(
            q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size
        )
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    bh = heads(beta, dtype)
    gh = None if g is None else heads(g, dtype)
    if mode == "recurrent":
        o, s = _delta_recurrent(qh, kh, vh, bh, gh, s0)
    else:
        o, s = _delta_chunk(qh, kh, vh, bh, gh, s0, chunk_size)
    return from_heads(o, q), (s if output_final_state else None)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


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
        backend: ``"torch"``, ``"triton"`` or ``"auto"``, the rule of
            :mod:`effarch._kernels`. ``"triton"`` runs the same chunk form in the Triton
            kernel :func:`~effarch.linear.delta_kernel.chunk_delta_rule` (on a GPU, or on
            the CPU under ``TRITON_INTERPRET=1``) or says why it cannot; it is forward only,
            so it refuses inputs that require grad while grad mode is on. ``"auto"`` picks
            the kernel for CUDA tensors in chunk mode when nothing requires grad, PyTorch
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
