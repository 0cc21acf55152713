"""FlashAttention (forward and backward) in Triton, with its launchers.

Layout ``[batch, seq, heads, head_dim]``; grouped-query attention by index (query head
``h`` reads key/value head ``h // (Hq // Hkv)``); causal masks aligned bottom-right as in
flash-attn. The forward pass keeps, per query row, a running max ``m``, a running sum
``l`` and an unnormalised output ``acc`` (the online softmax), and writes the output and
the log-sum-exp ``lse``. The backward pass recomputes the probabilities from ``lse``
tile by tile instead of storing them (FlashAttention-2's scheme):

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
    dQ = scale * dS K,  dK = scale * dS^T Q,      with delta = rowsum(dO * O).

At float32 the forward's products are IEEE float32 FMAs in tiles chosen so that none spills
registers; the backward's are three TF32 products each on the tensor cores ("3xTF32",
``input_precision="tf32x3"``, as in ``chunk_delta_rule``), in tiles of their own
(``_DKDV_TILES_FP32``): as FMAs, every dK/dV tiling spilled tens of KB per thread.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on
the CPU through Triton's interpreter, which is how the tests check them without a GPU
(bfloat16 inputs are computed in float32 there, see ``effarch_kernels.common``).
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
from .limits import MAX_HEAD_DIM, check, head_dim_reason

__all__ = [
    "MAX_HEAD_DIM",
    "check_head_dim",
    "check_interpreter_state",
    "flash_attention_backward",
    "flash_attention_forward",
    "interpreting",
    "tune_bucket",
]


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
    n_heads, group, seq_q, seq_k, head_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program computes BLOCK_M query rows of one (batch, head).
    # Addresses in int64 where they can pass 2^31 (in a tensor of more than 2^31 elements):
    # the (batch, head) terms, the first row of the program's own tile (m0) and the rows of
    # the tiles a loop walks (cols64). Offsets inside a tile and the masks stay int32. (The
    # compiled kernels keep their registers this way: int32 offsets of a loop's tiles held
    # apart from an int64 first row are hoisted out of the loop and held in registers.)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offset = seq_k - seq_q  # bottom-right alignment: row i sees keys j <= i + offset

    q = tl.load(
        Q + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
        mask=(offs_m[:, None] < seq_q) & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the fast instruction

    hi = seq_k
    if CAUSAL:  # key blocks past the last visible key of this query block are skipped
        hi = tl.maximum(tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        kt = tl.load(
            K + b * skb + hk * skh + cols64[None, :] * skt + offs_d[:, None],
            mask=(cols[None, :] < seq_k) & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]: K^T
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        valid = (cols[None, :] < seq_k) & (offs_m[:, None] >= 0)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + offset)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + b * svb + hk * svh + cols64[:, None] * svt + offs_d[None, :],
            mask=(cols[:, None] < seq_k) & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(
        Out + b * sob + h * soh + m0 * sot + offs_i[:, None] * sot + offs_d[None, :],
        o.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < seq_q) & d_ok[None, :],
    )
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))  # fmt: skip
    tl.store(LSE + pid_bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit(do_not_specialize=["tune_q", "tune_k"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    sdkb, sdkt, sdkh,
    n_heads, group, seq_q, seq_k, head_dim, scale, tune_q, tune_k,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns BLOCK_N keys of one (batch, query head) and loops over queries.
    # (tune_q, tune_k: only the autotuning key, see _TUNE_KEY.) Addresses as in _fwd_kernel.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    offs_c = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_c
    n0 = (pid_n * BLOCK_N).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offset = seq_k - seq_q
    kv_mask = (offs_n[:, None] < seq_k) & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + n0 * skt + offs_c[:, None] * skt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + n0 * svt + offs_c[:, None] * svt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if CAUSAL:  # queries before the first one that sees this key block contribute nothing
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for start_m in range(lo, seq_q, BLOCK_M):
        rows = start_m + offs_m
        rows64 = rows.to(tl.int64)
        r_ok = rows < seq_q
        q = tl.load(Q + b * sqb + h * sqh + rows64[:, None] * sqt + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        do = tl.load(DO + b * sdob + h * sdoh + rows64[:, None] * sdot + offs_d[None, :],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        lse = tl.load(LSE + pid_bh * seq_q + rows, mask=r_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=r_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        valid = r_ok[:, None] & (offs_n[None, :] < seq_k) & (lse[:, None] > float("-inf"))
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= rows[:, None] + offset)
        p = tl.where(valid, tl.exp(s - tl.where(valid, lse[:, None], 0.0)), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)

    out = b * sdkb + h * sdkh + n0 * sdkt + offs_c[:, None] * sdkt + offs_d[None, :]
    tl.store(DK + out, dk * scale, mask=kv_mask)
    tl.store(DV + out, dv, mask=kv_mask)


@triton.jit(do_not_specialize=["tune_q", "tune_k"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
    n_heads, group, seq_q, seq_k, head_dim, scale, tune_q, tune_k,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One program owns BLOCK_M queries of one (batch, head) and loops over keys.
    # (tune_q, tune_k: only the autotuning key.) Addresses as in _fwd_kernel.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_i
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    r_ok = offs_m < seq_q
    offset = seq_k - seq_q
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    do = tl.load(DO + b * sdob + h * sdoh + m0 * sdot + offs_i[:, None] * sdot + offs_d[None, :],
                 mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    lse = tl.load(LSE + pid_bh * seq_q + offs_m, mask=r_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * seq_q + offs_m, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seq_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        c_ok = cols < seq_k
        k = tl.load(K + b * skb + hk * skh + cols64[:, None] * skt + offs_d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        v = tl.load(V + b * svb + hk * svh + cols64[:, None] * svt + offs_d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        valid = r_ok[:, None] & c_ok[None, :] & (lse[:, None] > float("-inf"))
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + offset)
        p = tl.where(valid, tl.exp(s - tl.where(valid, lse[:, None], 0.0)), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, str]:
    """Tile sizes, head-dim padding and dot precision for one call."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpreting():
        return 64, 64, block_d, precision  # large tiles keep the interpreter fast
    if dtype == torch.float32:
        # IEEE float32 products run on the FMA units, unrolled over the whole tile: about
        # 2^17 products per step (BLOCK_M x BLOCK_N x BLOCK_D) compile for sm_90 without
        # spilling registers (40 bytes at head_dim 32), where the 16-bit tiles below spill
        # 20-29 KB per thread at float32 from head_dim 64 on
        block_n = 64 if block_d <= 128 else 32
        return max(16, min(128, 2**17 // (block_n * block_d))), block_n, block_d, precision
    if block_d <= 64:
        return 128, 64, block_d, precision
    # the forward's shared memory (Q tile, then K and V tiles over 3 stages), compiled for
    # sm_90: 64 x 64 tiles need 224 KiB at 16 bits and head_dim 256 (64 x 32: 128 KiB, which
    # an A100's 164 KiB also holds)
    if block_d >= 256:
        return 64, 32, block_d, precision
    return 64, 64, block_d, precision


# On a GPU the backward kernels pick their tiles by timing (triton.autotune): the best tiles
# differ from the forward's (dK/dV wants many keys per program and few queries per step,
# FlashAttention-2's choice) and from one head_dim to the next. (BLOCK_M, BLOCK_N, warps,
# stages); configurations that do not fit a card's shared memory are skipped by the tuner.
# Compiled for sm_80 at head_dim 256, each of the first five dK/dV tilings asks an A100 for
# more than its 163 KiB (164.8-273 KiB, with 13-27 KB of spills): 32 x 64 and 16 x 64 in 8
# warps take 100 and 82 KiB and spill at most 252 bytes (sm_80 and sm_90); dQ's 32 x 32
# (98 KiB) is the one dQ tiling that fits there. A T4 (sm_75) has 64 KiB per block: at
# head_dim 128 the one dK/dV tiling it holds is 16 x 32 (48 KiB, no spills;
# compiled for sm_75 the stages make no difference to shared memory), and dQ's 32 x 32. At
# head_dim 256 a T4 holds dK/dV only at 16 x 16 and dQ at 16 x 32 (64 KiB each; every other
# tiling 96-384 KiB), the last of each list.
_DKDV_TILES = [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (128, 64, 8, 2),
               (32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]  # fmt: skip
_DQ_TILES = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 3),
             (16, 32, 4, 2)]  # fmt: skip
# The key holds the sequence lengths rounded up to a power of two (tune_bucket), not the
# lengths themselves: with the exact lengths every new length re-ran the tuner (slow with
# variable-length batches and in tests of many shapes), while the best tiles change with the
# scale of the lengths, not with each value.
_TUNE_KEY = ["head_dim", "tune_q", "tune_k", "CAUSAL"]


def tune_bucket(seq_len: int) -> int:
    """What the backward kernels' autotuning key holds for a sequence length: the next power
    of two (lengths 100 and 120 share 128, so they share one tuning)."""
    return triton.next_power_of_2(seq_len)


def _tuned(kernel: triton.JITFunction, tiles: list[tuple[int, int, int, int]]):
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n, w, st in tiles
    ]
    return triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)


_bwd_dkdv_tuned = _tuned(_bwd_dkdv_kernel, _DKDV_TILES)
_bwd_dq_tuned = _tuned(_bwd_dq_kernel, _DQ_TILES)
# The backward at float32 takes 3xTF32 products (BACKWARD_FP32_PRECISION): each float32
# operand x is split into x_hi = tf32(x) and x_lo = tf32(x - x_hi), and a b is taken as
# a_hi b_hi + a_hi b_lo + a_lo b_hi on the tensor cores, as accurate as float32 FMAs
# (tests/test_attention_tiled_flash.py emulates it). As FMAs, unrolled over the tile, every
# dK/dV tiling above compiled for sm_90 to 42-78 KB of spills per thread at head_dim 128.
# The split operands take registers too, so the tiles are smaller than at 16 bits: 16
# queries per step, 16-64 keys. Compiled for sm_90 and sm_80, dK/dV at 16 x 32 in 8 warps
# and dQ at 16 x 32 in 4 spill nothing up to head_dim 128; at 256 the least is under 1 KB
# (dK/dV 16 x 32 in 1 stage: 160 KiB of shared memory, which an A100 holds; dQ 16 x 32 in 8
# warps). Compiled for sm_86 (99 KiB per block: L4, RTX 30xx and 40xx), at head_dim 256 only
# the 16 x 16 tilings fit (96 KiB; the others 128-288).
BACKWARD_FP32_PRECISION = "tf32x3"
_DKDV_TILES_FP32 = [(16, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 2), (16, 32, 8, 1)]
_DQ_TILES_FP32 = [(16, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2)]
_bwd_dkdv_tuned_fp32 = _tuned(_bwd_dkdv_kernel, _DKDV_TILES_FP32)
_bwd_dq_tuned_fp32 = _tuned(_bwd_dq_kernel, _DQ_TILES_FP32)


def check_head_dim(head_dim: int) -> None:
    """The kernels pad the head dimension to a power of two, up to ``MAX_HEAD_DIM``."""
    check(head_dim_reason(head_dim))


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``o`` like ``q`` and ``lse`` float32 ``[B, Hq, Tq]``.

    Expects ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` of one dtype on one device
    (shapes are checked by the caller).
    """
    check_interpreter_state()
    dtype = q.dtype
    q, k, v = contiguous(*interpreter_cast(q, k, v))
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    check_head_dim(d)
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)
    block_m, block_n, block_d, precision = _config(d, q.dtype)

    def launch(shape: tuple[int, int, int]) -> None:
        m, n, stages = shape
        _fwd_kernel[(triton.cdiv(tq, m), b * hq)](
            q, k, v, o, lse,
            *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(o),
            hq, hq // hkv, tq, tk, d, scale,
            CAUSAL=causal, BLOCK_M=m, BLOCK_N=n, BLOCK_D=block_d,
            PRECISION=precision, num_stages=stages, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    # _config's tiles fit an H100 and an A100; a card with less shared memory per block
    # takes the first smaller shape it holds. Compiled for sm_86 (99 KiB: L4, RTX 30xx and
    # 40xx), the float32 tiles at head_dim 128 and 256 asked for 140-146 KiB in 3 stages and
    # the 16-bit ones at 256 for 100 KiB; for sm_75 (T4, 64 KiB) the 16-bit ones at 256 for
    # 96 KiB.
    key = ("flash_attention_forward", q.device, q.dtype, block_d, causal)
    first_that_fits(key, smaller_tiles(block_m, block_n, 3), launch)
    return o.to(dtype), lse


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; returns ``dq, dk, dv`` shaped like ``q, k, v``.

    ``dlse`` ``[B, Hq, Tq]``: the gradient reaching the log-sum-exp output, if any. Since
    ``d lse_i / d S_ij = P_ij``, it enters as ``dS = P * (dP - (delta - dlse))``: the kernels
    read ``delta - dlse`` where they read ``delta``.

    ``dk`` and ``dv`` are accumulated per query head in float32 and then summed over the
    query heads that share a key/value head (grouped-query attention).
    """
    check_interpreter_state()
    dtypes = q.dtype, k.dtype, v.dtype
    do, q, k, v, o = contiguous(*interpreter_cast(do, q, k, v, o))
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Tq]
    if dlse is not None:
        delta = (delta - dlse.float()).contiguous()
    dq = torch.empty_like(q)
    dk_h = torch.empty((b, tk, hq, d), device=q.device, dtype=torch.float32)
    dv_h = torch.empty_like(dk_h)
    block_m, block_n, block_d, precision = _config(d, q.dtype)
    dkdv, dq_kernel = _bwd_dkdv_tuned, _bwd_dq_tuned
    if q.dtype == torch.float32:  # 3xTF32, in tilings of its own (_DKDV_TILES_FP32)
        precision, dkdv, dq_kernel = (
            BACKWARD_FP32_PRECISION,
            _bwd_dkdv_tuned_fp32,
            _bwd_dq_tuned_fp32,
        )
    common = dict(CAUSAL=causal, BLOCK_D=block_d, PRECISION=precision)
    if interpreting():  # one fixed tiling: the interpreter cannot time configurations
        dkdv, dq_kernel = _bwd_dkdv_kernel, _bwd_dq_kernel
        common.update(BLOCK_M=block_m, BLOCK_N=block_n)
    dkdv[lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]), b * hq)](
        q, k, v, do, lse, delta, dk_h, dv_h,
        *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(do), *strides_bth(dk_h),
        hq, hq // hkv, tq, tk, d, scale, tune_bucket(tq), tune_bucket(tk), **common,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    dq_kernel[lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * hq)](
        q, k, v, do, lse, delta, dq,
        *strides_bth(q), *strides_bth(k), *strides_bth(v), *strides_bth(do),
        hq, hq // hkv, tq, tk, d, scale, tune_bucket(tq), tune_bucket(tk), **common,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    g = hq // hkv
    dk = dk_h.view(b, tk, hkv, g, d).sum(3)
    dv = dv_h.view(b, tk, hkv, g, d).sum(3)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])
