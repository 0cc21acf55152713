"""Chunkwise linear attention with one scalar decay per head and step, forward and backward.

Layout as in flash-linear-attention: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, log decays
``g [B, T, H]`` (``g <= 0``; None for plain linear attention), states ``[B, H, K, V]``::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale q_t).

The sequence is cut into chunks of ``BT`` steps. With ``G_i`` the cumulative log decay from
the start of a chunk to its step ``i`` (so ``G_i <= 0`` and ``G_i - G_j <= 0`` for ``j <= i``),
``h`` the state entering the chunk and ``L`` its last step, each chunk obeys

    o_i   = scale (exp(G_i) q_i^T h + sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j)
    h_out = exp(G_L) h + sum_j exp(G_L - G_j) k_j v_j^T.

The forward pass runs two kernels: ``_fwd_states_kernel`` walks the chunks in order and
writes the state entering each (the only sequential part, ``T / BT`` steps of matrix
products), then ``chunk_output_kernel`` computes every chunk's outputs in parallel.

The backward pass mirrors it. With ``dh`` the gradient of the state leaving a chunk, the
gradient of the state entering it is ``exp(G_L) dh + scale sum_i exp(G_i) q_i do_i^T``
(``_bwd_states_kernel`` walks the chunks in reverse). Per chunk, with the masked matrices
``A_ij = scale exp(G_i - G_j) q_i . k_j`` and ``P_ij = exp(G_i - G_j) do_i . v_j`` (``j <= i``):

    dq = scale (exp(G) * (dO h^T) + P K),          dv = A^T dO + exp(G_L - G) * (K dh),
    dk = scale P^T Q + exp(G_L - G) * (V dh^T)                     (``_bwd_dqkv_kernel``).

The decays: every term of ``o_t`` carries ``exp(C_t)`` and every term that uses ``k_s``
carries ``exp(-C_s)``, with ``C`` the cumulative log decay over the whole sequence, so the
gradient with respect to ``C_t`` is ``q_t . dq_t - k_t . dk_t`` (plus ``<dS_T, S_T>`` at the
last step when the final state has a gradient), and since ``g_t`` enters every ``C_u`` with
``u >= t``, ``dg`` is the reverse cumulative sum of that (``_bwd_dg_kernel``).

Everything is computed in float32; on a GPU, half-precision inputs use TF32 matrix products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    FP_FUSION,
    check_interpreter_state,
    contiguous,
    first_that_fits,
    interpreter_cast,
    interpreting,
    smaller_tiles,
)
from .limits import MAX_KEY_DIM, MIN_CHUNK_SIZE, check, chunk_size_reason, key_dim_reason

__all__ = [
    "MAX_KEY_DIM",
    "OUTPUT_BLOCK_K",
    "STATES_BLOCK_V",
    "check_key_dim",
    "chunk_lengths",
    "chunk_log_decay",
    "chunk_output_kernel",
    "chunk_scalar_decay_bwd",
    "chunk_scalar_decay_fwd",
    "narrower_blocks",
    "states_launch",
    "states_shapes",
    "token_row",
]


@triton.jit
def token_row(b, h, t, seq_len, n_heads):
    """Row of step ``t`` of (batch ``b``, head ``h``) in a contiguous ``[B, T, H, ...]`` tensor,
    in int64 when ``b`` is (every kernel here makes ``b`` int64 from its program id): that row
    times the row length passes 2^31 once the tensor has more than 2^31 elements.

    ``t`` is one step or a vector of steps. A kernel addresses a chunk's rows in one of two
    ways: the first row (one ``t``) in int64 and the steps after it as int32 offsets
    (``n_heads`` rows apart), or every row (a vector ``t``) in int64. Each kernel uses the one
    that compiled (sm_90) to fewer registers and spills: the first for most, the second for
    the loops of _fwd_states_kernel and _bwd_states_kernel (their int32 offsets, the same in
    every step, were hoisted out of the loop and held in registers)."""
    return (b * seq_len + t) * n_heads + h


@triton.jit
def chunk_log_decay(G, b, h, t0, seq_len, n_heads, USE_G: tl.constexpr, BT: tl.constexpr):
    """Cumulative log decay ``[BT]`` inside the chunk starting at ``t0`` and its last value.

    Steps past the sequence end read ``g = 0``, so the last entry is the chunk's total. ``b``
    is int64 (see ``token_row``)."""
    offs_t = t0 + tl.arange(0, BT)
    if USE_G:
        g_ptr = G + token_row(b, h, t0, seq_len, n_heads)
        g = tl.load(g_ptr + tl.arange(0, BT) * n_heads, mask=offs_t < seq_len, other=0.0)
        gc = tl.cumsum(g.to(tl.float32), axis=0)
    else:
        gc = tl.zeros([BT], tl.float32)
    g_last = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, gc, 0.0), axis=0)
    return gc, g_last


@triton.jit
def _fwd_states_kernel(
    Kp, Vp, G, H0, HS, HT,
    seq_len, n_heads, dim_k, dim_v, n_chunks,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program carries a [K, BV] slice of one (batch, head)'s state across the chunks.
    # Addresses: b, so the rows of each chunk, and the states' offsets in int64 (see
    # token_row); offsets inside a row stay int32.
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    s_mask = k_ok[:, None] & v_ok[None, :]
    s_offs = offs_k[:, None] * dim_v + offs_v[None, :]
    state = tl.zeros([BK, BV], tl.float32)
    if USE_H0:
        state += tl.load(H0 + pid_bh * dim_k * dim_v + s_offs, mask=s_mask, other=0.0)

    for n in range(0, n_chunks):
        tl.store(HS + (pid_bh * n_chunks + n) * dim_k * dim_v + s_offs, state, mask=s_mask)
        offs_t = n * BT + tl.arange(0, BT)
        t_ok = offs_t < seq_len
        rows = token_row(b, h, offs_t, seq_len, n_heads)  # every row of the chunk
        k = tl.load(Kp + rows[:, None] * dim_k + offs_k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        v = tl.load(Vp + rows[:, None] * dim_v + offs_v[None, :],
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        gc, g_last = chunk_log_decay(G, b, h, n * BT, seq_len, n_heads, USE_G, BT)
        k = k * tl.exp(g_last - gc)[:, None]  # decay from each step to the chunk's end, <= 1
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k), v, input_precision=PRECISION)

    if STORE_HT:
        tl.store(HT + pid_bh * dim_k * dim_v + s_offs, state, mask=s_mask)


@triton.jit
def chunk_output_kernel(
    Q, Kp, Vp, G, HS, Out,
    seq_len, n_heads, dim_k, dim_v, n_chunks, scale,
    USE_G: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # One program computes the outputs of one chunk for BV value columns, reading K in
    # blocks of BK (both products below sum over K, so a block's share is added and the
    # block dropped: registers hold a [BT, BK] slice of q and k, not all of K). Addresses:
    # the chunk's first row in int64, the steps after it int32 (see token_row).
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_i = tl.arange(0, BT)
    offs_t = pid_n * BT + offs_i
    offs_v = pid_v * BV + tl.arange(0, BV)
    t_ok = offs_t < seq_len
    v_ok = offs_v < dim_v
    row0 = token_row(b, h, pid_n * BT, seq_len, n_heads)
    tv_offs = (offs_i * n_heads)[:, None] * dim_v + offs_v[None, :]
    gc, _ = chunk_log_decay(G, b, h, pid_n * BT, seq_len, n_heads, USE_G, BT)
    hs_base = (pid_bh * n_chunks + pid_n) * dim_k * dim_v

    # Q K^T and (exp(G) * Q) h, one block of K at a time.
    scores = tl.zeros([BT, BT], tl.float32)
    o = tl.zeros([BT, BV], tl.float32)
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < dim_k
        qk_offs = (offs_i * n_heads)[:, None] * dim_k + offs_k[None, :]
        qk_mask = t_ok[:, None] & k_ok[None, :]
        q = tl.load(Q + row0 * dim_k + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(Kp + row0 * dim_k + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
        hs = tl.load(HS + hs_base + offs_k[:, None] * dim_v + offs_v[None, :],
                     mask=k_ok[:, None] & v_ok[None, :], other=0.0)  # fmt: skip
        scores += tl.dot(q, tl.trans(k), input_precision=PRECISION)
        o += tl.dot(q * tl.exp(gc)[:, None], hs, input_precision=PRECISION)

    # exp is taken only on the causal triangle, where G_i - G_j <= 0; the rest is exp(-inf) = 0.
    causal = offs_i[:, None] >= offs_i[None, :]
    decay = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    v = tl.load(Vp + row0 * dim_v + tv_offs,
                mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    o += tl.dot(scores * decay, v, input_precision=PRECISION)
    tl.store(Out + row0 * dim_v + tv_offs, (o * scale).to(Out.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])  # fmt: skip


@triton.jit
def _bwd_states_kernel(
    Q, DO, G, DHT, DHS, DH0,
    seq_len, n_heads, dim_k, dim_v, n_chunks, scale,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # The forward recurrence run backwards: DHS[n] is the gradient of the state leaving
    # chunk n; after the loop the carried value is the gradient of the initial state.
    # Addresses as in _fwd_states_kernel.
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < dim_k
    v_ok = offs_v < dim_v
    s_mask = k_ok[:, None] & v_ok[None, :]
    s_offs = offs_k[:, None] * dim_v + offs_v[None, :]
    dstate = tl.zeros([BK, BV], tl.float32)
    if USE_DHT:
        dstate += tl.load(DHT + pid_bh * dim_k * dim_v + s_offs, mask=s_mask, other=0.0)

    for i in range(0, n_chunks):
        n = n_chunks - 1 - i
        tl.store(DHS + (pid_bh * n_chunks + n) * dim_k * dim_v + s_offs, dstate, mask=s_mask)
        offs_t = n * BT + tl.arange(0, BT)
        t_ok = offs_t < seq_len
        rows = token_row(b, h, offs_t, seq_len, n_heads)  # every row of the chunk
        q = tl.load(Q + rows[:, None] * dim_k + offs_k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        do = tl.load(DO + rows[:, None] * dim_v + offs_v[None, :],
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        gc, g_last = chunk_log_decay(G, b, h, n * BT, seq_len, n_heads, USE_G, BT)
        q = q * (tl.exp(gc) * scale)[:, None]
        dstate = dstate * tl.exp(g_last) + tl.dot(tl.trans(q), do, input_precision=PRECISION)

    if STORE_DH0:
        tl.store(DH0 + pid_bh * dim_k * dim_v + s_offs, dstate, mask=s_mask)


@triton.jit
def _bwd_dqkv_kernel(
    Q, Kp, Vp, G, HS, DO, DHS, DQ, DK, DV, DGC,
    seq_len, n_heads, dim_k, dim_v, n_chunks, scale,
    USE_G: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns one chunk of one (batch, head): all of K, and loops over V blocks
    # (dq and dk contract over V, dv over K). Addresses as in chunk_output_kernel: the
    # chunk's first row in int64, the steps after it int32 (see token_row).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_i = tl.arange(0, BT)
    offs_t = pid_n * BT + offs_i
    offs_k = tl.arange(0, BK)
    t_ok = offs_t < seq_len
    k_ok = offs_k < dim_k
    row0 = token_row(b, h, pid_n * BT, seq_len, n_heads)
    step = offs_i * n_heads
    qk_base = row0 * dim_k
    qk_offs = step[:, None] * dim_k + offs_k[None, :]
    qk_mask = t_ok[:, None] & k_ok[None, :]
    q = tl.load(Q + qk_base + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
    k = tl.load(Kp + qk_base + qk_offs, mask=qk_mask, other=0.0).to(tl.float32)
    gc, g_last = chunk_log_decay(G, b, h, pid_n * BT, seq_len, n_heads, USE_G, BT)
    causal = offs_i[:, None] >= offs_i[None, :]
    decay = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    to_end = tl.exp(g_last - gc)  # decay from each step to the chunk's end
    a = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay * scale  # A_ij, [BT, BT]

    dp = tl.zeros([BT, BT], tl.float32)  # do_i . v_j
    dq_state = tl.zeros([BT, BK], tl.float32)  # dO h^T
    dk_state = tl.zeros([BT, BK], tl.float32)  # V dh^T
    state_base = (pid_bh * n_chunks + pid_n) * dim_k * dim_v
    tv_base = row0 * dim_v
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_ok = offs_v < dim_v
        tv_offs = step[:, None] * dim_v + offs_v[None, :]
        tv_mask = t_ok[:, None] & v_ok[None, :]
        v = tl.load(Vp + tv_base + tv_offs, mask=tv_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + tv_base + tv_offs, mask=tv_mask, other=0.0).to(tl.float32)
        s_offs = offs_k[:, None] * dim_v + offs_v[None, :]
        s_mask = k_ok[:, None] & v_ok[None, :]
        # the state entering the chunk and the gradient of the state leaving it
        hs = tl.load(HS + state_base + s_offs, mask=s_mask, other=0.0)
        dh = tl.load(DHS + state_base + s_offs, mask=s_mask, other=0.0)
        dp += tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq_state += tl.dot(do, tl.trans(hs), input_precision=PRECISION)
        dk_state += tl.dot(v, tl.trans(dh), input_precision=PRECISION)
        dv = tl.dot(tl.trans(a), do, input_precision=PRECISION)
        dv += tl.dot(k, dh, input_precision=PRECISION) * to_end[:, None]
        tl.store(DV + tv_base + tv_offs, dv.to(DV.dtype.element_ty), mask=tv_mask)

    p = dp * decay
    dq = (dq_state * tl.exp(gc)[:, None] + tl.dot(p, k, input_precision=PRECISION)) * scale
    dk = tl.dot(tl.trans(p), q, input_precision=PRECISION) * scale + dk_state * to_end[:, None]
    tl.store(DQ + qk_base + qk_offs, dq.to(DQ.dtype.element_ty), mask=qk_mask)
    tl.store(DK + qk_base + qk_offs, dk.to(DK.dtype.element_ty), mask=qk_mask)
    if USE_G:  # gradient of the cumulative log decay at each step: q . dq - k . dk
        tl.store(DGC + row0 + step, tl.sum(q * dq - k * dk, axis=1), mask=t_ok)


@triton.jit
def _bwd_dg_kernel(
    DGC, HT, DHT, DG,
    seq_len, n_heads, dim_k, dim_v, n_chunks,
    USE_DHT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    # dg_t = sum_{u >= t} dC_u: a reverse cumulative sum over the sequence, chunk by chunk.
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    step = tl.arange(0, BT) * n_heads
    carry = tl.sum(tl.zeros([BT], tl.float32), axis=0)
    if USE_DHT:  # the final state S_T = exp(C_T) (...) adds <dS_T, S_T> to dC at the last step
        offs_k = tl.arange(0, BK)
        for v0 in range(0, dim_v, BV):
            offs_v = v0 + tl.arange(0, BV)
            s_base = pid_bh * dim_k * dim_v
            s_offs = offs_k[:, None] * dim_v + offs_v[None, :]
            s_mask = (offs_k[:, None] < dim_k) & (offs_v[None, :] < dim_v)
            ht = tl.load(HT + s_base + s_offs, mask=s_mask, other=0.0)
            dht = tl.load(DHT + s_base + s_offs, mask=s_mask, other=0.0)
            carry += tl.sum(tl.sum(ht * dht, axis=1), axis=0)
    for i in range(0, n_chunks):
        n = n_chunks - 1 - i
        offs_t = n * BT + tl.arange(0, BT)
        t_ok = offs_t < seq_len
        row0 = token_row(b, h, n * BT, seq_len, n_heads)
        dgc = tl.load(DGC + row0 + step, mask=t_ok, other=0.0)
        suffix = tl.cumsum(dgc, axis=0, reverse=True) + carry
        tl.store(DG + row0 + step, suffix.to(DG.dtype.element_ty), mask=t_ok)
        carry += tl.sum(dgc, axis=0)


def check_key_dim(dim_k: int) -> None:
    """Each program holds all of K (padded to a power of two), up to ``MAX_KEY_DIM``."""
    check(key_dim_reason(dim_k))


# The kernels that hold a chunk's [BT, BT] scores beside [BT, K] and [BT, V] tiles (the
# outputs, the backward's dq, dk, dv) run 8 warps: compiled for sm_90
# (benchmarks/compile_report.py) they spill fewer registers than at 4, e.g. the backward at
# 16 bits and K = 128 0.4 KB instead of 1 KB, at float32 26-33 KB instead of 58-66 KB; never
# more.
_WARPS = 8
# chunk_output_kernel reads K in blocks of this many columns (fewer when K is smaller). Holding
# all of K it spilled 17 KB per thread at float32 and K = 128 (sm_90); in blocks of 32 it
# spills at most 244 bytes (float32, K = 64 or 128) and nothing at 16 bits.
OUTPUT_BLOCK_K = 32
# The states kernels (forward and backward) carry all of K for this many value columns, in 8
# warps: at float32 they spilled 10-17 KB per thread at 64 columns and 4 warps compiled for
# sm_80 (0-432 bytes for sm_90), now 0 at K = 64 and under 4 KB at K = 128 (sm_90: 8 bytes at
# most); at 16 bits none spills, with fewer registers than before.
STATES_BLOCK_V = 32


def states_launch(block_k: int, block_v: int, stages: int) -> tuple[int, int]:
    """Value columns and pipeline stages of a states kernel, which carries all of K (padded
    to ``block_k``) for its value columns: ``STATES_BLOCK_V`` columns in ``stages`` stages,
    or from K = 256 on 16 columns in 1 stage. (At K = 256 and float32, 32 columns in 3 stages
    asked for 208.5 KiB of shared memory, more than an A100 has, and spilled 10-13 KB compiled
    for sm_80; 16 in 1 stage asks for 64-68 KiB and spills at most 4.3 KB.)"""
    if block_k >= 256:
        return min(block_v, 16), 1
    return min(block_v, STATES_BLOCK_V), stages


def states_shapes(block_k: int, block_v: int, stages: int) -> list[tuple[int, int]]:
    """``states_launch``'s value columns and stages, then narrower columns and fewer stages
    (``narrower_blocks``) for a card whose shared memory per block does not hold them:
    compiled for sm_86 (99 KiB: L4, RTX 30xx and 40xx), the states kernels at float32 and
    K = 128 asked for 104-112.5 KiB in 2-3 stages."""
    return narrower_blocks(*states_launch(block_k, block_v, stages))


def narrower_blocks(block_v: int, stages: int) -> list[tuple[int, int]]:
    """``(block_v, stages)``, then the value block in fewer stages and halved down to 16
    columns (``smaller_tiles`` along one side): the shapes a chunked kernel falls back on.

    ``narrower_blocks(64, 3) == [(64, 3), (64, 2), (32, 2), (16, 2), (16, 1)]``."""
    # the other side starts at smaller_tiles' least (16), so only the value block narrows
    return [(n, s) for n, _, s in smaller_tiles(block_v, 16, stages)]


def chunk_lengths(chunk: int) -> list[int]:
    """``chunk`` and each half of it down to ``MIN_CHUNK_SIZE``: the chunk lengths a launcher
    falls back on when a card holds no launch shape of a kernel at ``chunk`` (a blocking
    only: the outputs and gradients do not change). Compiled for sm_75 (T4, 64 KiB), the
    states kernels at 16 bits and K = 256 asked for 68 KiB in chunks of 64, 34 in chunks of
    32; the backward's dq/dk/dv kernel at K = 128 for 72 KiB in chunks of 32 and 32 value
    columns."""
    out = [chunk]
    while out[-1] // 2 >= MIN_CHUNK_SIZE:
        out.append(out[-1] // 2)
    return out


def _dqkv_launch(
    chunk: int, block_k: int, block_v: int, dtype: torch.dtype
) -> tuple[int, int, int]:
    """Chunk length, value columns and pipeline stages of the backward's dq/dk/dv kernel on a
    GPU (under the interpreter: those of ``_config``, in 3 stages).

    The kernel holds all of K for a chunk and pipelines two float32 ``[BK, BV]`` state tiles,
    so it takes narrower value blocks than the forward, and fewer stages from K = 128 on, to
    fit in shared memory. Compiled (benchmarks/compile_report.py): K = 128, 64 columns in 3
    stages asks for 304 KiB (an H100 has 227 per block); at float32 and K = 64, 64 columns
    ask for 176 KiB (an A100 has 163) and spill 26-28 KB per thread, 32 columns 112 KiB and
    about 2 KB (sm_80 and sm_90; 16-bit inputs: 64-120 KiB instead of 112-192, at most 1.1 KB
    of spills); at float32 and K = 128, 32 columns spill 33 KB, 16 columns 6-8 KB. At float32
    and K = 256, [64, 256] tiles of q, k, dq and dk ask for 168 KiB and spill 45 KB, chunks of
    32 100 KiB and under 0.5 KB: the backward then cuts chunks of 32 (a blocking only: the
    gradients do not change)."""
    if interpreting():
        return chunk, block_v, 3
    full = dtype == torch.float32
    wide = block_k <= 64 or (block_k <= 128 and not full)
    stages = 3 if block_k < 128 else 2 if block_k <= 128 else 1
    if full and block_k >= 256:
        chunk = min(chunk, 32)
    return chunk, min(block_v, 32 if wide else 16), stages


def _config(
    dim_k: int, dim_v: int, chunk_size: int, dtype: torch.dtype
) -> tuple[int, int, int, str]:
    """Chunk length, key and value block sizes, and dot precision for one call."""
    check_key_dim(dim_k)
    check(chunk_size_reason(chunk_size))
    block_k = max(16, triton.next_power_of_2(dim_k))
    block_v = max(16, triton.next_power_of_2(dim_v))
    if not interpreting():  # on a GPU, more programs over V; the interpreter prefers few
        block_v = min(block_v, 64 if block_k <= 128 else 32)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return chunk_size, block_k, block_v, precision


def _chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cfg: tuple[int, int, int, str],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float32 state entering every chunk, ``[B, H, N, K, V]``, and the final state."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    bt, bk, bv, precision = cfg
    n_chunks = triton.cdiv(t, bt)
    hs = torch.empty(b, h, n_chunks, dk, dv, device=k.device, dtype=torch.float32)
    ht = torch.empty(b, h, dk, dv, device=k.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else hs
    flags = dict(USE_G=g is not None, USE_H0=initial_state is not None,
                 STORE_HT=output_final_state)  # fmt: skip

    def launch(shape: tuple[int, int]) -> None:
        bv_states, stages = shape
        _fwd_states_kernel[(triton.cdiv(dv, bv_states), b * h)](
            k, v, g if g is not None else k, h0, hs, ht,
            t, h, dk, dv, n_chunks, **flags,
            BT=bt, BK=bk, BV=bv_states, PRECISION=precision, num_warps=_WARPS,
            num_stages=stages, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    key = ("_fwd_states_kernel", k.device, k.dtype, cfg, *flags.values())
    first_that_fits(key, states_shapes(bk, bv, 3), launch)
    return hs, (ht if output_final_state else None)


def chunk_scalar_decay_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernels: ``o [B, T, H, V]`` (dtype of ``v``) and the float32 final
    state ``[B, H, K, V]`` (or None). ``g [B, T, H]`` holds log decays (None: no decay);
    ``chunk_size`` is a power of two >= 16. Shapes are checked by the caller."""
    check_interpreter_state()
    dtype = v.dtype
    q, k, v, g = contiguous(*interpreter_cast(q, k, v, g))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    chunk, bk, bv, precision = _config(dk, dv, chunk_size, q.dtype)
    o = torch.empty_like(v)

    def forward(bt: int) -> torch.Tensor | None:
        cfg = (bt, bk, bv, precision)
        hs, ht = _chunk_states(k, v, g, initial_state, output_final_state, cfg)

        def launch(shape: tuple[int, int]) -> None:
            bv_out, stages = shape
            chunk_output_kernel[(triton.cdiv(dv, bv_out), triton.cdiv(t, bt), b * h)](
                q, k, v, g if g is not None else q, hs, o,
                t, h, dk, dv, hs.shape[2], scale,
                USE_G=g is not None, BT=bt, BK=min(bk, OUTPUT_BLOCK_K), BV=bv_out,
                PRECISION=precision, num_warps=_WARPS, num_stages=stages,
                enable_fp_fusion=FP_FUSION,
            )  # fmt: skip

        key = ("chunk_output_kernel", q.device, q.dtype, cfg, g is not None)
        first_that_fits(key, narrower_blocks(bv, 3), launch)
        return ht

    # chunks of chunk_size, or shorter on a card that holds no shape of a kernel at that
    # length (chunk_lengths)
    key = ("chunk_scalar_decay_fwd", q.device, q.dtype, chunk, bk, bv, g is not None,
           initial_state is not None, output_final_state)  # fmt: skip
    ht = first_that_fits(key, chunk_lengths(chunk), forward)
    return o.to(dtype), ht


def chunk_scalar_decay_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    dht: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels for the gradient ``do`` of ``o`` and ``dht`` of the final
    state (None: no gradient). Returns ``dq, dk, dv`` shaped like ``q, k, v``, ``dg`` like
    ``g`` (None when ``g`` is) and the gradient of ``initial_state`` (None when it is).

    The states entering each chunk are recomputed rather than kept from the forward pass."""
    check_interpreter_state()
    dtypes = [x.dtype if x is not None else None for x in (q, k, v, g)]
    do, q, k, v, g, dht = contiguous(*interpreter_cast(do, q, k, v, g, dht))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    chunk, bk, bv, precision = _config(dk, dv, chunk_size, q.dtype)
    chunk, bv_dqkv, stages_dqkv = _dqkv_launch(chunk, bk, bv, q.dtype)
    use_g = g is not None
    need_ht = use_g and dht is not None
    dht32 = dht.float().contiguous() if dht is not None else None
    dq = torch.empty_like(q)
    dk_ = torch.empty_like(k)
    dv_ = torch.empty_like(v)
    dh0 = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    dg = torch.empty_like(g) if use_g else None

    def backward(bt: int) -> None:
        cfg = (bt, bk, bv, precision)
        hs, ht = _chunk_states(k, v, g, initial_state, need_ht, cfg)
        n_chunks = hs.shape[2]
        dht_arg = dht32 if dht32 is not None else hs
        dhs = torch.empty_like(hs)
        flags = dict(USE_G=use_g, USE_DHT=dht is not None, STORE_DH0=initial_state is not None)

        def launch_states(shape: tuple[int, int]) -> None:
            bv_states, stages = shape
            _bwd_states_kernel[(triton.cdiv(dv, bv_states), b * h)](
                q, do, g if use_g else q, dht_arg, dhs, dh0,
                t, h, dk, dv, n_chunks, scale, **flags,
                BT=bt, BK=bk, BV=bv_states, PRECISION=precision, num_warps=_WARPS,
                num_stages=stages, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip

        key = ("_bwd_states_kernel", q.device, q.dtype, cfg, *flags.values())
        first_that_fits(key, states_shapes(bk, bv, 3), launch_states)
        dgc = torch.empty(b, t, h, device=q.device, dtype=torch.float32) if use_g else hs

        def launch_dqkv(shape: tuple[int, int]) -> None:
            bv_, stages = shape
            _bwd_dqkv_kernel[(n_chunks, b * h)](
                q, k, v, g if use_g else q, hs, do, dhs, dq, dk_, dv_, dgc,
                t, h, dk, dv, n_chunks, scale,
                USE_G=use_g, BT=bt, BK=bk, BV=bv_, PRECISION=precision, num_warps=_WARPS,
                num_stages=stages, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip

        key = ("_bwd_dqkv_kernel", q.device, q.dtype, cfg, use_g)
        first_that_fits(key, narrower_blocks(bv_dqkv, stages_dqkv), launch_dqkv)
        if use_g:
            _bwd_dg_kernel[(b * h,)](
                dgc, ht if need_ht else dgc, dht_arg, dg,
                t, h, dk, dv, n_chunks,
                USE_DHT=need_ht, BT=bt, BK=bk, BV=bv_dqkv, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip

    # chunks of _dqkv_launch's length, or shorter on a card that holds no shape of a kernel
    # at that length (chunk_lengths)
    key = ("chunk_scalar_decay_bwd", q.device, q.dtype, chunk, bk, bv, use_g, need_ht,
           dht is not None, initial_state is not None)  # fmt: skip
    first_that_fits(key, chunk_lengths(chunk), backward)
    d_initial = None
    if initial_state is not None:
        d_initial = dh0.to(initial_state.dtype)
    grads = (dq, dk_, dv_, dg)
    dq, dk_, dv_, dg = (
        x.to(d) if x is not None else None for x, d in zip(grads, dtypes, strict=True)
    )
    return dq, dk_, dv_, dg, d_initial
