"""Block-sparse FlashAttention (forward and backward) in Triton, driven by a tile layout.

The mask is given as tiles of ``BLOCK_M`` queries by ``BLOCK_N`` keys (chapter 3's block
layout, FlexAttention's ``BlockMask``):

* ``tile_id [B', H', nq, nk]`` int32: ``-2`` empty (never visited), ``-1`` full (computed
  without a mask), ``p >= 0`` partial, its boolean mask stored in ``tile_masks[p]``
  (``[n_partial, BLOCK_M, BLOCK_N]`` int8, positions past the sequence ends already 0);
* ``kv_count [B', H', nq]`` and ``kv_list [B', H', nq, nk]``: for each query block, its
  non-empty key blocks (the forward pass and dQ loop over them);
* ``q_count [B', H', nk]`` and ``q_list [B', H', nk, nq]``: for each key block, the query
  blocks that see it (dK and dV loop over them).

``B'`` and ``H'`` are the batch and query heads, or 1 when the mask is the same for all
(broadcast by a zero stride). FlexAttention evaluates its ``mask_mod`` inside the compiled
kernel; here the partial tiles' masks are evaluated once in PyTorch and loaded, which keeps
the kernel independent of the pattern at the cost of ``BLOCK_M * BLOCK_N`` bytes per partial
tile. Everything else is FlashAttention-2 (see ``flash_attention.py``): online softmax in
the forward pass, probabilities recomputed from the log-sum-exp in the backward pass. Layout
``[batch, seq, heads, head_dim]``, grouped-query heads by index; a query that sees no key
gets output 0 and log-sum-exp ``-inf``. A kernel computes a tile in pieces of ``TILE_M x
TILE_N`` when the whole of it would not fit in shared memory (``_tiles``); the tiles, the
layout and the masks stay those of the caller.
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
    strides_bth,
)

__all__ = ["block_sparse_backward", "block_sparse_forward"]


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, TID, CNT, LST, TM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    s_tid_b, s_tid_h, s_tid_i, s_cnt_b, s_cnt_h, s_lst_b, s_lst_h, s_lst_i,
    n_heads, group, seq_q, seq_k, head_dim, head_dim_v, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program: TILE_M query rows (of query block qb) of one (batch, head); loops over the
    # block's listed key blocks, each in TILE_N-key steps (see _tiles).
    # Addresses in int64 where they can pass 2^31 (in a tensor of more than 2^31 elements):
    # the (batch, head) and block terms, the program's first row (m0) and the rows of the
    # tiles the loop walks (cols64); offsets inside a tile and the masks stay int32 (as in
    # flash_attention._fwd_kernel, which says why).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    qb = pid_m // (BLOCK_M // TILE_M)
    r0 = pid_m * TILE_M - qb * BLOCK_M  # the tile's first row inside its query block
    offs_i = tl.arange(0, TILE_M)
    offs_m = pid_m * TILE_M + offs_i
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    m0 = (pid_m * TILE_M).to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < seq_q) & d_ok[None, :], other=0.0)  # fmt: skip
    m_i = tl.full([TILE_M], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, BLOCK_DV], tl.float32)
    qk_scale = scale * 1.4426950408889634  # base 2
    qb64 = qb.to(tl.int64)
    count = tl.load(CNT + b * s_cnt_b + h * s_cnt_h + qb)
    for n in range(0, count):
        j = tl.load(LST + b * s_lst_b + h * s_lst_h + qb64 * s_lst_i + n)
        tid = tl.load(TID + b * s_tid_b + h * s_tid_h + qb64 * s_tid_i + j)
        for c in range(0, BLOCK_N, TILE_N):
            cols = j * BLOCK_N + c + offs_n
            cols64 = (j * BLOCK_N + c).to(tl.int64) + offs_n
            kt = tl.load(K + b * skb + hk * skh + cols64[None, :] * skt + offs_d[:, None],
                         mask=(cols[None, :] < seq_k) & d_ok[:, None], other=0.0)  # fmt: skip
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if tid >= 0:  # a partial block: its stored mask (full blocks need none)
                tm = tl.load(TM + tid.to(tl.int64) * (BLOCK_M * BLOCK_N)
                             + (r0 + offs_i)[:, None] * BLOCK_N + c + offs_n[None, :])  # fmt: skip
                s = tl.where(tm != 0, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + hk * svh + cols64[:, None] * svt + offs_dv[None, :],
                        mask=(cols[:, None] < seq_k) & dv_ok[None, :], other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_mask = (offs_m[:, None] < seq_q) & dv_ok[None, :]
    tl.store(Out + b * sob + h * soh + m0 * sot + offs_i[:, None] * sot + offs_dv[None, :],
             o.to(Out.dtype.element_ty), mask=o_mask)  # fmt: skip
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))  # fmt: skip
    tl.store(LSE + pid_bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, TID, CNT, LST, TM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh,
    s_tid_b, s_tid_h, s_tid_i, s_cnt_b, s_cnt_h, s_lst_b, s_lst_h, s_lst_i,
    n_heads, group, seq_q, seq_k, head_dim, head_dim_v, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # dQ of TILE_M query rows: P = exp(S - lse), dS = P (dO V^T - delta), dQ = scale dS K.
    # Tiles and addresses as in _fwd_kernel.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    qb = pid_m // (BLOCK_M // TILE_M)
    r0 = pid_m * TILE_M - qb * BLOCK_M
    offs_i = tl.arange(0, TILE_M)
    offs_m = pid_m * TILE_M + offs_i
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    r_ok = offs_m < seq_q
    m0 = (pid_m * TILE_M).to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    do = tl.load(DO + b * sdob + h * sdoh + m0 * sdot + offs_i[:, None] * sdot + offs_dv[None, :],
                 mask=r_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
    lse = tl.load(LSE + pid_bh * seq_q + offs_m, mask=r_ok, other=float("-inf"))
    delta = tl.load(DELTA + pid_bh * seq_q + offs_m, mask=r_ok, other=0.0)
    row_ok = lse > float("-inf")
    lse_safe = tl.where(row_ok, lse, 0.0)
    dq = tl.zeros([TILE_M, BLOCK_D], tl.float32)
    qb64 = qb.to(tl.int64)
    count = tl.load(CNT + b * s_cnt_b + h * s_cnt_h + qb)
    for n in range(0, count):
        j = tl.load(LST + b * s_lst_b + h * s_lst_h + qb64 * s_lst_i + n)
        tid = tl.load(TID + b * s_tid_b + h * s_tid_h + qb64 * s_tid_i + j)
        for c in range(0, BLOCK_N, TILE_N):
            cols = j * BLOCK_N + c + offs_n
            cols64 = (j * BLOCK_N + c).to(tl.int64) + offs_n
            c_ok = cols < seq_k
            k = tl.load(K + b * skb + hk * skh + cols64[:, None] * skt + offs_d[None, :],
                        mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            v = tl.load(V + b * svb + hk * svh + cols64[:, None] * svt + offs_dv[None, :],
                        mask=c_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            valid = row_ok[:, None] & (offs_n[None, :] >= 0)
            if tid >= 0:
                tm = tl.load(TM + tid.to(tl.int64) * (BLOCK_M * BLOCK_N)
                             + (r0 + offs_i)[:, None] * BLOCK_N + c + offs_n[None, :])  # fmt: skip
                valid = valid & (tm != 0)
            p = tl.where(valid, tl.exp(s - lse_safe[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + m0 * sdqt + offs_i[:, None] * sdqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, TID, CNT, LST, TM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
    s_tid_b, s_tid_h, s_tid_i, s_cnt_b, s_cnt_h, s_lst_b, s_lst_h, s_lst_j,
    n_heads, group, seq_q, seq_k, head_dim, head_dim_v, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # dK, dV of TILE_N keys (of key block kb) for one query head: loops over the query blocks
    # that see the block, each in TILE_M-row steps. Addresses as in _fwd_kernel.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    kb = pid_n // (BLOCK_N // TILE_N)
    c0 = pid_n * TILE_N - kb * BLOCK_N  # the tile's first key inside its key block
    offs_i = tl.arange(0, TILE_M)
    offs_c = tl.arange(0, TILE_N)
    offs_n = pid_n * TILE_N + offs_c
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    c_ok = offs_n < seq_k
    n0 = (pid_n * TILE_N).to(tl.int64)
    k = tl.load(K + b * skb + hk * skh + n0 * skt + offs_c[:, None] * skt + offs_d[None, :],
                mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + n0 * svt + offs_c[:, None] * svt + offs_dv[None, :],
                mask=c_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
    dk = tl.zeros([TILE_N, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_N, BLOCK_DV], tl.float32)
    count = tl.load(CNT + b * s_cnt_b + h * s_cnt_h + kb)
    for n in range(0, count):
        i = tl.load(LST + b * s_lst_b + h * s_lst_h + kb.to(tl.int64) * s_lst_j + n)
        tid = tl.load(TID + b * s_tid_b + h * s_tid_h + i.to(tl.int64) * s_tid_i + kb)
        for r in range(0, BLOCK_M, TILE_M):
            rows = i * BLOCK_M + r + offs_i
            rows64 = rows.to(tl.int64)
            r_ok = rows < seq_q
            q = tl.load(Q + b * sqb + h * sqh + rows64[:, None] * sqt + offs_d[None, :],
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            do = tl.load(DO + b * sdob + h * sdoh + rows64[:, None] * sdot + offs_dv[None, :],
                         mask=r_ok[:, None] & dv_ok[None, :], other=0.0)  # fmt: skip
            lse = tl.load(LSE + pid_bh * seq_q + rows, mask=r_ok, other=float("-inf"))
            delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=r_ok, other=0.0)
            row_ok = lse > float("-inf")
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            valid = row_ok[:, None] & (offs_c[None, :] >= 0)
            if tid >= 0:
                tm = tl.load(TM + tid.to(tl.int64) * (BLOCK_M * BLOCK_N)
                             + (r + offs_i)[:, None] * BLOCK_N + c0 + offs_c[None, :])  # fmt: skip
                valid = valid & (tm != 0)
            p = tl.where(valid, tl.exp(s - tl.where(row_ok, lse, 0.0)[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + b * sdkb + h * sdkh + n0 * sdkt + offs_c[:, None] * sdkt + offs_d[None, :],
             dk * scale, mask=c_ok[:, None] & d_ok[None, :])  # fmt: skip
    tl.store(DV + b * sdvb + h * sdvh + n0 * sdvt + offs_c[:, None] * sdvt + offs_dv[None, :], dv,
             mask=c_ok[:, None] & dv_ok[None, :])  # fmt: skip


def _bhstrides_bth(t: torch.Tensor, n: int) -> tuple[int, ...]:
    """Strides of a layout tensor ``[B', H', ...]``; a size-1 batch or head dim gets 0."""
    s = list(t.stride())
    for dim in (0, 1):
        if t.shape[dim] == 1:
            s[dim] = 0
    return tuple(s[:n])


# The mask's blocks (BLOCK_M x BLOCK_N, the caller's block_q x block_k) are the sparsity
# granularity; the kernels compute them in tiles of TILE_M x TILE_N that divide them: query
# rows of a block in separate programs, its key tiles (forward, dQ) or query tiles (dK, dV)
# in an inner loop. A tile is at most _TILE_SIDE on a side, by the element size and the head
# dimension padded to a power of two (max of q's and v's): the largest side at which all
# three kernels, compiled for sm_90 (4 warps, 3 stages; benchmarks/compile_report.py), fit
# an A100's shared memory (163 KiB; an H100 has 227) and spill at most about 1 KB of
# registers per thread. Spill bytes (forward / dQ / dK-dV) at that side and at twice it:
#   16-bit, head_dim 16-128: 64: 0 / 0 / 0-48 B;  128: 0.3-2.4 / 0.05-1.5 / 0.2-3.8 KB
#   16-bit, head_dim 256:    32: 0 / 0 / 0.9 KB;  64: 196-274 KiB of shared memory, 2.8 KB
#   float32, head_dim 16-32: 32: 0 / 0 / 0.06-0.7 KB;  64: 0 / 0 / 3.6-16 KB
#   float32, head_dim 64+:   16: 0 / 0 / 0.03-1 KB (10 KB at 256);  32: 0 / 0 / 9-17 KB
# (float32 products run on the FMA units, whose unrolled tiles take registers; the 16-bit
# ones on tensor cores.) Blocks no larger than that are computed whole.
_TILE_SIDE = {
    2: {16: 64, 32: 64, 64: 64, 128: 64, 256: 32},
    4: {16: 32, 32: 32, 64: 16, 128: 16, 256: 16},
}


def _tiles(block_m: int, block_n: int, block_d: int, block_dv: int, dtype: torch.dtype) -> dict:
    """``TILE_M``, ``TILE_N`` for one call: the blocks, each side capped by ``_TILE_SIDE``
    (powers of two, so a tile divides its block). Under the interpreter (no shared memory, no
    registers to spill) tiles are whole blocks."""
    if interpreting():
        return dict(TILE_M=block_m, TILE_N=block_n)
    side = _TILE_SIDE[4 if dtype.itemsize >= 4 else 2][max(block_d, block_dv)]
    return dict(TILE_M=min(block_m, side), TILE_N=min(block_n, side))


def _sizes(q: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> dict:
    d, dv = q.shape[-1], v.shape[-1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    tiles = _tiles(block_m, block_n, block_d, block_dv, q.dtype)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                PRECISION=precision, **tiles)  # fmt: skip


def _launch_fitting(name: str, q: torch.Tensor, sizes: dict, launch) -> None:
    """``launch(sizes)`` with ``_tiles``'s tiles, or on a card whose shared memory per block
    does not hold them, the first smaller tiles (or fewer stages) it does. Compiled for
    sm_86 (99 KiB: L4, RTX 30xx and 40xx), 64 x 64 tiles at 16 bits and head_dim 128 asked
    for 104-105.5 KiB in the backward, 32 x 32 at head_dim 256 for 100.8; for sm_75 (T4,
    64 KiB) they asked for 96-128 KiB."""
    key = (name, q.device, q.dtype, *sorted(sizes.items()))
    shapes = smaller_tiles(sizes["TILE_M"], sizes["TILE_N"], 3)
    first_that_fits(key, shapes, lambda s: launch({**sizes, "TILE_M": s[0], "TILE_N": s[1]}, s[2]))


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_id: torch.Tensor,
    kv_count: torch.Tensor,
    kv_list: torch.Tensor,
    tile_masks: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``o [B, Tq, Hq, Dv]`` like ``q`` and ``lse [B, Hq, Tq]``
    float32. Inputs as the module docstring says (checked by the caller)."""
    check_interpreter_state()
    dtype = q.dtype
    q, k, v = contiguous(*interpreter_cast(q, k, v))
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    o = torch.empty((b, tq, hq, dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)

    def launch(sizes: dict, stages: int) -> None:
        _fwd_kernel[(tile_id.shape[2] * (block_m // sizes["TILE_M"]), b * hq)](
            q, k, v, o, lse, tile_id, kv_count, kv_list, tile_masks,
            *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(o),
            *_bhstrides_bth(tile_id, 3), *_bhstrides_bth(kv_count, 2),
            *_bhstrides_bth(kv_list, 3),
            hq, hq // hkv, tq, tk, d, dv, scale, **sizes, num_stages=stages,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    _launch_fitting("block_sparse_forward", q, _sizes(q, v, block_m, block_n), launch)
    return o.to(dtype), lse


def block_sparse_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    tile_id: torch.Tensor,
    kv_count: torch.Tensor,
    kv_list: torch.Tensor,
    q_count: torch.Tensor,
    q_list: torch.Tensor,
    tile_masks: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; ``dq, dk, dv`` shaped like ``q, k, v``. dK and dV are
    accumulated per query head in float32, then summed over each key/value head's group."""
    check_interpreter_state()
    dtypes = q.dtype, k.dtype, v.dtype
    do, q, k, v, o = contiguous(*interpreter_cast(do, q, k, v, o))
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Tq]
    dq = torch.empty_like(q)
    dk_h = torch.empty((b, tk, hq, d), device=q.device, dtype=torch.float32)
    dv_h = torch.empty((b, tk, hq, dv), device=q.device, dtype=torch.float32)
    sizes = _sizes(q, v, block_m, block_n)
    nq, nk = tile_id.shape[2], tile_id.shape[3]

    def launch_dq(sizes: dict, stages: int) -> None:
        _bwd_dq_kernel[(nq * (block_m // sizes["TILE_M"]), b * hq)](
            q, k, v, do, lse, delta, dq, tile_id, kv_count, kv_list, tile_masks,
            *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(do),
            *strides_bth(dq),
            *_bhstrides_bth(tile_id, 3), *_bhstrides_bth(kv_count, 2),
            *_bhstrides_bth(kv_list, 3),
            hq, hq // hkv, tq, tk, d, dv, scale, **sizes, num_stages=stages,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    def launch_dkdv(sizes: dict, stages: int) -> None:
        _bwd_dkdv_kernel[(nk * (block_n // sizes["TILE_N"]), b * hq)](
            q, k, v, do, lse, delta, dk_h, dv_h, tile_id, q_count, q_list, tile_masks,
            *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(do),
            *strides_bth(dk_h), *strides_bth(dv_h),
            *_bhstrides_bth(tile_id, 3), *_bhstrides_bth(q_count, 2),
            *_bhstrides_bth(q_list, 3),
            hq, hq // hkv, tq, tk, d, dv, scale, **sizes, num_stages=stages,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    _launch_fitting("block_sparse_dq", q, sizes, launch_dq)
    _launch_fitting("block_sparse_dkdv", q, sizes, launch_dkdv)
    g = hq // hkv
    dk = dk_h.view(b, tk, hkv, g, d).sum(3)
    dvv = dv_h.view(b, tk, hkv, g, dv).sum(3)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dvv.to(dtypes[2])
