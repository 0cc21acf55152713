"""A fused recurrent kernel for linear attention and its gated and delta-rule variants.

One program keeps a ``[K, BLOCK_V]`` slice of the state ``S`` of one (batch, head) in
registers and walks the sequence, so the state never goes to main memory between steps:
the fastest form for decoding, where tokens arrive one at a time. For each step ``t``
(state ``S`` is ``[K, V]``, as in flash-linear-attention's ``fused_recurrent_*`` ops):

    S <- exp(g_t) S                    scalar decay per head   (simple GLA, RetNet, gated delta)
    S <- diag(exp(gk_t)) S             per-key decay           (GLA)
    u_t = v_t                          plain write             (linear attention, GLA)
    u_t = beta_t (v_t - S^T k_t)       delta-rule write        (DeltaNet, gated DeltaNet)
    S <- S + k_t u_t^T
    o_t = S^T (scale * q_t)

Columns of ``S`` update independently (even for the delta rule, column ``j`` needs only
``(S^T k)_j``), so the value dimension is split across programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, check_interpreter_state, contiguous, interpreter_cast


@triton.jit
def _fused_recurrent_kernel(
    Q, K, V, G, GK, BETA, H0, Out, HT,
    seq_len, n_heads, dim_k, dim_v, scale,
    USE_G: tl.constexpr, USE_GK: tl.constexpr, DELTA: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # Addresses: the (batch, head) and row terms in int64 (row * dim_k passes 2^31 once a
    # tensor has more than 2^31 elements), offsets inside a row or state tile int32.
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    s_mask = k_ok[:, None] & v_ok[None, :]
    s_base = pid_bh * dim_k * dim_v
    s_offs = offs_k[:, None] * dim_v + offs_v[None, :]
    state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    if USE_H0:
        state += tl.load(H0 + s_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)

    # q, k, gk: [B, T, H, K]; v, o: [B, T, H, V]; g, beta: [B, T, H] (all contiguous)
    for t in range(0, seq_len):
        row = (b * seq_len + t) * n_heads + h  # int64, as b is
        q = tl.load(Q + row * dim_k + offs_k, mask=k_ok, other=0.0).to(tl.float32) * scale
        k = tl.load(K + row * dim_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + row * dim_v + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        if USE_G:
            state = state * tl.exp(tl.load(G + row).to(tl.float32))
        if USE_GK:
            gk = tl.load(GK + row * dim_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            state = state * tl.exp(gk)[:, None]
        if DELTA:
            beta = tl.load(BETA + row).to(tl.float32)
            v = beta * (v - tl.sum(state * k[:, None], axis=0))
        state += k[:, None] * v[None, :]
        o = tl.sum(state * q[:, None], axis=0)
        tl.store(Out + row * dim_v + offs_v, o.to(Out.dtype.element_ty), mask=v_ok)

    if STORE_HT:
        tl.store(HT + s_base + s_offs, state, mask=s_mask)


def fused_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: ``o [B, T, H, V]`` (dtype of ``v``) and the float32 final state
    ``[B, H, K, V]`` (or None). ``beta`` given selects the delta rule; ``g`` ``[B, T, H]``
    and ``gk`` ``[B, T, H, K]`` are log decays. Shapes are checked by the caller."""
    check_interpreter_state()
    dtype = v.dtype
    q, k, v, g, gk, beta = contiguous(*interpreter_cast(q, k, v, g, gk, beta))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty_like(v)
    ht = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(max(16, triton.next_power_of_2(dv)), 64)
    dummy = q  # a valid pointer for the arguments a variant does not read
    h0 = initial_state.float().contiguous() if initial_state is not None else dummy
    grid = (triton.cdiv(dv, block_v), b * h)
    _fused_recurrent_kernel[grid](
        q, k, v,
        g if g is not None else dummy,
        gk if gk is not None else dummy,
        beta if beta is not None else dummy,
        h0, o, ht,
        t, h, dk, dv, scale,
        USE_G=g is not None, USE_GK=gk is not None, DELTA=beta is not None,
        USE_H0=initial_state is not None, STORE_HT=output_final_state,
        BLOCK_K=block_k, BLOCK_V=block_v, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return o.to(dtype), (ht if output_final_state else None)
