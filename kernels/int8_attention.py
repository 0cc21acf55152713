"""INT8 attention scores in Triton: ``S = dequant(Q_int8 K_int8^T)`` with per-block scales.

The first matrix product of SageAttention (Zhang et al., 2024). Queries and keys arrive
already quantized to symmetric INT8 with one float32 scale per block of tokens and per
(batch, head); the kernel multiplies the INT8 tiles with ``tl.dot`` (INT8 x INT8 products
accumulated in INT32, exact) and only then turns the integers into real scores:

    S[i, j] = (sum_d Qi[i, d] * Ki[j, d]) * q_scale[i // block_q] * k_scale[j // block_k]

Layout ``[batch, seq, heads, head_dim]`` for the INT8 inputs and ``[batch, blocks, heads]``
for the scales; grouped-query attention by index (query head ``h`` reads key head
``h // (Hq // Hkv)``). The output is the full float32 score matrix ``[B, Hq, Tq, Tk]``:
softmax and the product with ``V`` are left to the caller.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on the
CPU through Triton's interpreter, which computes INT8 dots exactly, as a GPU does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, check_interpreter_state, interpreting
from .limits import check, head_dim_reason

# An INT8 dot on NVIDIA tensor cores needs an inner dimension of at least 32.
MIN_INT8_DOT_K = 32


@triton.jit
def _int8_qk_kernel(
    Q, K, QS, KS, S,
    sqb, sqt, sqh, skb, skt, skh,
    sqsb, sqsn, sqsh, sksb, sksn, sksh,
    ssb, ssh, sst,
    n_heads, group, seq_q, seq_k, head_dim, quant_q, quant_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program computes BLOCK_M rows of the score matrix of one (batch, query head).
    # Addresses: the (batch, head) and first-row terms are int64 (h * ssh and row * sst pass
    # 2^31 once the scores have more than 2^31 elements); offsets inside a tile stay int32.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < head_dim  # padded channels load as 0 and add nothing to the dot
    m0 = start_m.to(tl.int64)

    q = tl.load(
        Q + b * sqb + h * sqh + m0 * sqt + offs_i[:, None] * sqt + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0,
    )  # [BLOCK_M, BLOCK_D] int8
    # Each row reads the scale of its quantization block, which need not match BLOCK_M.
    qs = tl.load(
        QS + b * sqsb + h * sqsh + (offs_m // quant_q) * sqsn,
        mask=m_ok,
        other=0.0,
    )

    k_base = K + b * skb + hk * skh
    s_base = S + b * ssb + h * ssh + m0 * sst
    for start_n in range(0, seq_k, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seq_k
        kt = tl.load(
            k_base + tl.cast(start_n, tl.int64) * skt + offs_n[None, :] * skt + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0,
        )  # [BLOCK_D, BLOCK_N] int8: K^T
        ks = tl.load(
            KS + b * sksb + hk * sksh + (cols // quant_k) * sksn,
            mask=n_ok,
            other=0.0,
        )
        # exact: |acc| <= 127^2 * BLOCK_D < 2^31
        acc = tl.dot(q, kt, out_dtype=tl.int32)
        s = acc.to(tl.float32) * qs[:, None] * ks[None, :]
        tl.store(
            s_base + offs_i[:, None] * sst + cols[None, :],
            s,
            mask=m_ok[:, None] & n_ok[None, :],
        )


def _config(head_dim: int) -> tuple[int, int, int]:
    """Tile sizes and the padded head dimension for one call."""
    block_d = max(MIN_INT8_DOT_K, triton.next_power_of_2(head_dim))
    if interpreting():
        return 64, 64, block_d  # large tiles keep the interpreter fast
    if block_d <= 64:
        return 128, 64, block_d
    return 64, 64, block_d


def int8_qk(
    q_int8: torch.Tensor,
    k_int8: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    block_q: int,
    block_k: int,
) -> torch.Tensor:
    """Dequantized INT8 scores ``S [B, Hq, Tq, Tk]`` in float32.

    Args:
        q_int8: ``[B, Tq, Hq, D]`` int8 queries.
        k_int8: ``[B, Tk, Hkv, D]`` int8 keys, ``Hq % Hkv == 0``.
        q_scale: ``[B, ceil(Tq / block_q), Hq]`` float32: query row ``i`` of head ``h`` is
            ``q_int8[b, i, h] * q_scale[b, i // block_q, h]``.
        k_scale: ``[B, ceil(Tk / block_k), Hkv]`` float32, the same for keys.
        block_q, block_k: the token block sizes the scales were computed over.

    Returns:
        ``S[b, h, i, j] = (q_int8[b, i, h] . k_int8[b, j, h // g]) * q_scale[..] * k_scale[..]``
        with the integer dot product exact (INT32 accumulation) and the two scale products
        rounded in float32, in that order. A softmax scale can be folded into ``q_scale``.
    """
    check_interpreter_state()
    b, tq, hq, d = q_int8.shape
    tk, hkv = k_int8.shape[1], k_int8.shape[2]
    check(head_dim_reason(d))
    q_int8, k_int8 = q_int8.contiguous(), k_int8.contiguous()
    q_scale = q_scale.to(torch.float32).contiguous()
    k_scale = k_scale.to(torch.float32).contiguous()
    s = torch.empty((b, hq, tq, tk), device=q_int8.device, dtype=torch.float32)
    block_m, block_n, block_d = _config(d)
    grid = (triton.cdiv(tq, block_m), b * hq)
    _int8_qk_kernel[grid](
        q_int8, k_int8, q_scale, k_scale, s,
        q_int8.stride(0), q_int8.stride(1), q_int8.stride(2),
        k_int8.stride(0), k_int8.stride(1), k_int8.stride(2),
        q_scale.stride(0), q_scale.stride(1), q_scale.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        hq, hq // hkv, tq, tk, d, block_q, block_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return s
