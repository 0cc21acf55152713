"""Chunkwise (gated) delta rule, forward pass, in the WY / UT representation.

Layout as in flash-linear-attention: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, write
strengths ``beta [B, T, H]``, log decays ``g [B, T, H]`` (``g <= 0``; None for the plain
delta rule), states ``[B, H, K, V]``::

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - (exp(g_t) S_{t-1})^T k_t)^T,
    o_t = S_t^T (scale q_t).

Cut the sequence into chunks of ``BT`` steps. Inside one chunk, let ``S`` be the state
entering it, ``G_i`` the cumulative log decay from the chunk start to its step ``i`` and
``x_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i)`` the row actually written at step ``i``, so
that ``S_i = exp(G_i) S + sum_{j <= i} exp(G_i - G_j) k_j x_j^T``. Substituting this into the
definition of ``x_i`` gives one triangular system per chunk::

    x_i + sum_{j < i} beta_i exp(G_i - G_j) (k_i . k_j) x_j = beta_i v_i - beta_i exp(G_i) S^T k_i
    (I + A) X = diag(beta) V - diag(beta exp(G)) K S,
    A_ij = beta_i exp(G_i - G_j) (k_i . k_j)  for j < i, 0 otherwise.

With ``T = (I + A)^-1`` (unit lower triangular) this is ``X = U - W S`` where

    W = T diag(beta exp(G)) K    [BT, K],        U = T diag(beta) V    [BT, V],

neither of which depends on ``S``. Three kernels follow from it:

1. ``_wy_kernel`` (all chunks in parallel): builds ``A``, inverts ``I + A`` (block forward
   substitution, doubling the block size ``log2(BT)`` times) and writes ``W`` and ``U``.
2. ``_delta_states_kernel`` (the only sequential part, ``T / BT`` steps): walks the chunks
   in order; per chunk it writes the state entering it, forms ``X = U - W S`` ("v_new") and
   moves on with ``S <- exp(G_L) S + (K * exp(G_L - G))^T X`` (``L`` the chunk's last step).
3. The outputs (all chunks in parallel) are those of scalar-decay linear attention with ``v``
   replaced by ``X``: ``O = scale ((Q * exp(G)) S + (Q K^T * D) X)`` with
   ``D_ij = exp(G_i - G_j)`` for ``j <= i``. That is ``chunk_output_kernel`` of
   ``chunk_scalar_decay``, reused as it is.

All arithmetic is float32, and so are the matrix products in effect: the intermediates
``T``, ``W``, ``U`` and the states feed each other chunk after chunk, and rounding their
products to TF32 (10-bit mantissas) would compound. Each product is taken as three on the
tensor cores ("3xTF32", Triton's ``input_precision="tf32x3"``): a float32 ``a`` is split into
``a_hi = tf32(a)`` and ``a_lo = tf32(a - a_hi)``, and ``a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi``
(only ``a_lo b_lo``, about 2^-22 of the product, is dropped). Emulated in PyTorch at
T = 512, K = V = 128, the forward stays as close to a float64 step loop as with float32
products (outputs within 1.3e-6 for both), where one TF32 product per float32 one is off by
6e-4 (tests/test_kernel_chunk_delta_rule.py). Under the interpreter every product is float32.
Forward only (no backward kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_scalar_decay import (
    OUTPUT_BLOCK_K,
    check_key_dim,
    chunk_lengths,
    chunk_log_decay,
    chunk_output_kernel,
    states_shapes,
    token_row,
)
from .common import (
    FP_FUSION,
    check_interpreter_state,
    contiguous,
    first_that_fits,
    interpreter_cast,
    interpreting,
)
from .limits import check, chunk_size_reason

PRECISION = "tf32x3"  # float32-accurate products on tensor cores, see the module docstring
# Launch shapes, compiled for sm_90 and sm_80 (benchmarks/compile_report.py). 8 warps for
# all three kernels (fewer spills than 4). The W/U kernel reads K in blocks of 32 columns
# and the outputs kernel (OUTPUT_BLOCK_K) too; the states kernel holds all of K for 32 value
# columns in 2 pipeline stages, not 3 (16 in 1 from K = 256 on: states_launch). With 3xTF32
# products instead of float32 FMAs that took the spills at K = 128 (W/U, states, outputs)
# from 1.9 / 13.1 / 18.0 KB per thread to 28 / 652 / 0 bytes (16-bit inputs, sm_90; float32
# inputs: 26.7 / 13.0 / 17.0 KB to 276 / 1032 / 0 bytes), and the states kernel's shared
# memory at float32 from 192.5 KiB, more than an A100 has (163), to 104 KiB.
_WARPS = 8
_WY_BLOCK_K = 32
_STATES_STAGES = 2


@triton.jit
def _wy_kernel(
    Kp, Vp, BETA, G, W, U,
    seq_len, n_heads, dim_k, dim_v,
    USE_G: tl.constexpr, BT: tl.constexpr, LOG2_BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # One program per chunk of one (batch, head), looping over blocks of K columns for A and
    # W and over blocks of V columns for U.
    # Addresses: the chunk's first row in int64 (token_row), offsets inside the chunk int32.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_i = tl.arange(0, BT)
    offs_t = pid_n * BT + offs_i
    t_ok = offs_t < seq_len
    row0 = token_row(b, h, pid_n * BT, seq_len, n_heads)
    step = offs_i * n_heads
    # Steps past the sequence end read k = 0 and beta = 0: their rows of A are zero, their
    # rows of T are those of the identity and they write nothing.
    beta = tl.load(BETA + row0 + step, mask=t_ok, other=0.0).to(tl.float32)
    gc, _ = chunk_log_decay(G, b, h, pid_n * BT, seq_len, n_heads, USE_G, BT)

    # A_ij = beta_i exp(G_i - G_j) (k_i . k_j) for j < i, the Gram matrix K K^T summed over
    # blocks of BK key columns. The exponent is masked to -inf above and on the diagonal
    # before exp, so every exp taken has an argument <= 0.
    gram = tl.zeros([BT, BT], tl.float32)
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        tk_offs = step[:, None] * dim_k + offs_k[None, :]
        tk_mask = t_ok[:, None] & (offs_k < dim_k)[None, :]
        k = tl.load(Kp + row0 * dim_k + tk_offs, mask=tk_mask, other=0.0).to(tl.float32)
        gram += tl.dot(k, tl.trans(k), input_precision=PREC)
    strict = offs_i[:, None] > offs_i[None, :]
    decay = tl.exp(tl.where(strict, gc[:, None] - gc[None, :], float("-inf")))
    a = gram * decay * beta[:, None]

    # T = (I + A)^-1 by recursive doubling (block forward substitution). While T holds the
    # inverses of the diagonal blocks of size s = 2^lvl, merge each pair of neighbouring
    # blocks into one of size 2s: a unit lower triangular M = [[M11, 0], [M21, M22]] has
    #     M^-1 = [[T11, 0], [-T22 M21 T11, T22]],   i.e.   T <- T - T E T,
    # with E = A restricted to the blocks M21 (rows in the second half of a 2s-block, columns
    # in its first half: exactly the pairs i > j whose highest differing bit is bit lvl).
    # log2(BT) levels of two matrix products, each an exact block inverse (no power series).
    diff = offs_i[:, None] ^ offs_i[None, :]
    t_inv = tl.where(diff == 0, 1.0, 0.0)  # the inverses of the 1 x 1 blocks
    for lvl in range(0, LOG2_BT):
        e = tl.where((diff >> lvl) == 1, a, 0.0)  # A is strictly lower: only i > j remain
        t_inv -= tl.dot(tl.dot(t_inv, e, input_precision=PREC), t_inv, input_precision=PREC)

    # W = T diag(beta exp(G)) K: what a unit of the entering state takes off each write,
    # one block of key columns at a time.
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        tk_offs = step[:, None] * dim_k + offs_k[None, :]
        tk_mask = t_ok[:, None] & (offs_k < dim_k)[None, :]
        k = tl.load(Kp + row0 * dim_k + tk_offs, mask=tk_mask, other=0.0).to(tl.float32)
        w = tl.dot(t_inv, k * (beta * tl.exp(gc))[:, None], input_precision=PREC)
        tl.store(W + row0 * dim_k + tk_offs, w, mask=tk_mask)

    # U = T diag(beta) V: the writes the chunk would make from a zero entering state.
    tv_base = row0 * dim_v
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        tv_offs = step[:, None] * dim_v + offs_v[None, :]
        tv_mask = t_ok[:, None] & (offs_v < dim_v)[None, :]
        v = tl.load(Vp + tv_base + tv_offs, mask=tv_mask, other=0.0).to(tl.float32)
        u = tl.dot(t_inv, v * beta[:, None], input_precision=PREC)
        tl.store(U + tv_base + tv_offs, u, mask=tv_mask)


@triton.jit
def _delta_states_kernel(
    Kp, W, U, G, H0, HS, VN, HT,
    seq_len, n_heads, dim_k, dim_v, n_chunks,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # One program carries a [K, BV] slice of one (batch, head)'s state across the chunks.
    # Columns of S never mix (X = U - W S and the update act column by column), so the
    # value dimension splits across programs exactly. Addresses: per-(batch, head), per-chunk
    # and per-row terms int64, offsets inside a tile int32.
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
    step = tl.arange(0, BT) * n_heads
    tk_offs = step[:, None] * dim_k + offs_k[None, :]
    tv_offs = step[:, None] * dim_v + offs_v[None, :]
    state = tl.zeros([BK, BV], tl.float32)
    if USE_H0:
        state += tl.load(H0 + pid_bh * dim_k * dim_v + s_offs, mask=s_mask, other=0.0)

    for n in range(0, n_chunks):
        tl.store(HS + (pid_bh * n_chunks + n) * dim_k * dim_v + s_offs, state, mask=s_mask)
        offs_t = n * BT + tl.arange(0, BT)
        t_ok = offs_t < seq_len
        row0 = token_row(b, h, n * BT, seq_len, n_heads)
        tk_base = row0 * dim_k
        tk_mask = t_ok[:, None] & k_ok[None, :]
        tv_base = row0 * dim_v
        tv_mask = t_ok[:, None] & v_ok[None, :]
        w = tl.load(W + tk_base + tk_offs, mask=tk_mask, other=0.0)
        u = tl.load(U + tv_base + tv_offs, mask=tv_mask, other=0.0)
        k = tl.load(Kp + tk_base + tk_offs, mask=tk_mask, other=0.0).to(tl.float32)
        gc, g_last = chunk_log_decay(G, b, h, n * BT, seq_len, n_heads, USE_G, BT)
        # X = U - W S: the rows this chunk really writes, given the state entering it.
        x = u - tl.dot(w, state, input_precision=PREC)
        tl.store(VN + tv_base + tv_offs, x, mask=tv_mask)
        # S <- exp(G_L) S + sum_j exp(G_L - G_j) k_j x_j^T (every exponent <= 0).
        k = k * tl.exp(g_last - gc)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k), x, input_precision=PREC)

    if STORE_HT:
        tl.store(HT + pid_bh * dim_k * dim_v + s_offs, state, mask=s_mask)


def _config(dim_k: int, dim_v: int, chunk_size: int) -> tuple[int, int, int]:
    """Chunk length and the key and value block sizes (powers of two, masked past K, V)."""
    check_key_dim(dim_k)
    check(chunk_size_reason(chunk_size))
    block_k = max(16, triton.next_power_of_2(dim_k))
    block_v = max(16, triton.next_power_of_2(dim_v))
    if not interpreting():  # on a GPU, more programs over V; the interpreter prefers few
        block_v = min(block_v, 64 if block_k <= 128 else 32)
    return chunk_size, block_k, block_v


def chunk_delta_rule_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the three forward kernels: ``o [B, T, H, V]`` (dtype of ``v``) and the float32
    final state ``[B, H, K, V]`` (or None). ``beta``, ``g`` are ``[B, T, H]`` (``g`` None: no
    decay); ``chunk_size`` is a power of two >= 16. Shapes are checked by the caller.
    ``beta`` and ``g`` (small) are read from float32 copies, so any floating dtype will do."""
    check_interpreter_state()
    dtype = v.dtype
    beta = beta.float()
    g = g.float() if g is not None else None
    q, k, v, beta, g = contiguous(*interpreter_cast(q, k, v, beta, g))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    chunk, bk, bv = _config(dk, dv, chunk_size)
    use_g = g is not None
    g_arg = g if use_g else beta  # a valid pointer that USE_G=False never reads
    o = torch.empty_like(v)
    ht = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)

    def forward(bt: int) -> None:
        n_chunks = triton.cdiv(t, bt)
        # 1. W [B, T, H, K] and U [B, T, H, V] for every chunk at once.
        w = torch.empty(b, t, h, dk, device=q.device, dtype=torch.float32)
        u = torch.empty(b, t, h, dv, device=q.device, dtype=torch.float32)
        _wy_kernel[(n_chunks, b * h)](
            k, v, beta, g_arg, w, u,
            t, h, dk, dv,
            USE_G=use_g, BT=bt, LOG2_BT=bt.bit_length() - 1, BK=min(bk, _WY_BLOCK_K), BV=bv,
            PREC=PRECISION, num_warps=_WARPS, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

        # 2. The state entering every chunk, the rows X each chunk writes, the final state.
        hs = torch.empty(b, h, n_chunks, dk, dv, device=q.device, dtype=torch.float32)
        x = torch.empty(b, t, h, dv, device=q.device, dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else hs

        def launch(shape: tuple[int, int]) -> None:
            bv_states, stages = shape
            _delta_states_kernel[(triton.cdiv(dv, bv_states), b * h)](
                k, w, u, g_arg, h0, hs, x, ht,
                t, h, dk, dv, n_chunks,
                USE_G=use_g, USE_H0=initial_state is not None, STORE_HT=output_final_state,
                BT=bt, BK=bk, BV=bv_states, PREC=PRECISION, num_warps=_WARPS,
                num_stages=stages, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip

        # narrower value blocks or fewer stages on a card with less shared memory per block:
        # compiled for sm_86 (99 KiB), the float32 kernel at K = 128 asked for 104 KiB
        key = ("_delta_states_kernel", q.device, q.dtype, bt, bk, bv, use_g,
               initial_state is not None, output_final_state)  # fmt: skip
        first_that_fits(key, states_shapes(bk, bv, _STATES_STAGES), launch)

        # 3. Outputs: scalar-decay linear attention on (q, k, X) from the stored states.
        chunk_output_kernel[(triton.cdiv(dv, bv), n_chunks, b * h)](
            q, k, x, g_arg, hs, o,
            t, h, dk, dv, n_chunks, scale,
            USE_G=use_g, BT=bt, BK=min(bk, OUTPUT_BLOCK_K), BV=bv, PRECISION=PRECISION,
            num_warps=_WARPS, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    # chunks of chunk_size, or shorter where a card holds no shape of the states kernel at
    # that length (chunk_lengths): compiled for sm_75 (T4, 64 KiB), it asked for 64 KiB and
    # 8 bytes at 16 bits and K = 256 in chunks of 64
    key = ("chunk_delta_rule_fwd", q.device, q.dtype, chunk, bk, bv, use_g,
           initial_state is not None, output_final_state)  # fmt: skip
    first_that_fits(key, chunk_lengths(chunk), forward)
    return o.to(dtype), (ht if output_final_state else None)
