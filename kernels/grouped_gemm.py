"""Grouped matrix multiplication (forward and backward) in Triton: the MoE expert product.

The rows of ``x [M, K]`` are sorted by group (expert) and ``offs [G]`` int32 holds each
group's end row (``torch.nn.functional.grouped_mm``'s convention: group ``g`` owns rows
``offs[g-1] .. offs[g]``, ``offs[-1] <= M``, rows past ``offs[-1]`` belong to no group):

* forward ``y[rows_g] = x[rows_g] @ w[g]`` with ``w [G, K, N]``;
* backward ``dx[rows_g] = dy[rows_g] @ w[g]^T`` (the forward kernel on a transposed view of
  ``w``: its strides are arguments) and ``dw[g] = x[rows_g]^T @ dy[rows_g]`` (a second
  kernel that walks one group's rows in blocks and accumulates a ``K x N`` tile).

A group's rows are not a multiple of the row block, so the forward grid is a list of row
tiles, given by the caller (``effarch.moe.row_tiles`` builds it on the device without a host
sync): ``tile_group[t]`` and ``tile_start[t]`` are the group and first row of program ``t``'s
tile, ``-1`` for programs past the last tile, which return at once. Rows of no group come
out 0, as in ``grouped_mm``. Products accumulate in float32; the output has the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, check_interpreter_state, interpreter_cast

__all__ = ["grouped_gemm_backward", "grouped_gemm_forward"]


@triton.jit
def _rows_kernel(
    X, W, Y, TILE_GROUP, TILE_START, OFFS,
    sxm, sxk, swg, swk, swn, sym, syn,
    K, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # Addresses: the group, first-row, first-column and k-step terms in int64 (x and y pass
    # 2^31 elements past 2^20 rows of 2048, w at 64 experts of 4096 x 16384); offsets inside a
    # tile int32.
    t = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.load(TILE_GROUP + t)
    if g < 0:
        return
    start = tl.load(TILE_START + t)
    end = tl.load(OFFS + g)
    offs_r = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = start + offs_r
    cols = pn * BLOCK_N + offs_c
    r_ok = rows < end
    c_ok = cols < N
    m0 = start.to(tl.int64)
    n0 = (pn * BLOCK_N).to(tl.int64)
    x_base = X + m0 * sxm
    w_base = W + g.to(tl.int64) * swg + n0 * swn
    x_tile = offs_r[:, None] * sxm + offs_k[None, :] * sxk
    w_tile = offs_k[:, None] * swk + offs_c[None, :] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        kk = tl.cast(k0, tl.int64)
        a = tl.load(x_base + kk * sxk + x_tile,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_base + kk * swk + w_tile,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(Y + m0 * sym + n0 * syn + offs_r[:, None] * sym + offs_c[None, :] * syn,
             acc.to(Y.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])  # fmt: skip


@triton.jit
def _weight_grad_kernel(
    X, DY, DW, OFFS,
    sxm, sxk, sdym, sdyn, sdwg, sdwk, sdwn,
    K, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # Addresses as in _rows_kernel: the group, first-row, first-k and first-column terms
    # int64, offsets inside a tile int32.
    g = tl.program_id(0)
    pk = tl.program_id(1)
    pn = tl.program_id(2)
    end = tl.load(OFFS + g)
    start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    offs_r = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_N)
    ks = pk * BLOCK_K + offs_k
    cols = pn * BLOCK_N + offs_c
    k_ok = ks < K
    c_ok = cols < N
    k0 = (pk * BLOCK_K).to(tl.int64)
    n0 = (pn * BLOCK_N).to(tl.int64)
    x_base = X + k0 * sxk
    dy_base = DY + n0 * sdyn
    x_tile = offs_r[:, None] * sxm + offs_k[None, :] * sxk
    dy_tile = offs_r[:, None] * sdym + offs_c[None, :] * sdyn
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_r
        r_ok = rows < end
        mm = tl.cast(m0, tl.int64)
        a = tl.load(x_base + mm * sxm + x_tile,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(dy_base + mm * sdym + dy_tile,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    tl.store(DW + g.to(tl.int64) * sdwg + k0 * sdwk + n0 * sdwn + offs_k[:, None] * sdwk
             + offs_c[None, :] * sdwn, acc.to(DW.dtype.element_ty),
             mask=k_ok[:, None] & c_ok[None, :])  # fmt: skip


def _sizes(dtype: torch.dtype, block_m: int, block_n: int, block_k: int) -> dict:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision)


def _rows(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, tiles: tuple[torch.Tensor, ...],
          block: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
    """``y[rows_g] = x[rows_g] @ w[g]`` for any strides of ``x [M, K]`` and ``w [G, K, N]``."""
    m, kdim = x.shape
    n = w.shape[2]
    block_m, block_n, block_k = block
    y = torch.zeros((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    tile_group, tile_start = tiles
    grid = (tile_group.shape[0], triton.cdiv(n, block_n))
    _rows_kernel[grid](
        x, w, y, tile_group, tile_start, offs,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        kdim, n, **_sizes(x.dtype, block_m, block_n, block_k), enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return y


def grouped_gemm_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    tile_group: torch.Tensor,
    tile_start: torch.Tensor,
    block_m: int = 32,
    block_n: int = 32,
    block_k: int = 32,
) -> torch.Tensor:
    """``y [M, N]``: ``x[rows_g] @ w[g]`` for every group (module docstring); ``x [M, K]``,
    ``w [G, K, N]`` of one dtype, ``offs [G]`` int32 end rows, the row tiles of ``block_m``
    rows (module docstring; all checked by the caller)."""
    check_interpreter_state()
    dtype = x.dtype
    x, w = interpreter_cast(x, w)
    tiles = (tile_group, tile_start)
    return _rows(x, w, offs, tiles, (block_m, block_n, block_k)).to(dtype)


def grouped_gemm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    tile_group: torch.Tensor,
    tile_start: torch.Tensor,
    block_m: int = 32,
    block_n: int = 32,
    block_k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dx [M, K] = dy[rows_g] @ w[g]^T`` and ``dw [G, K, N] = x[rows_g]^T dy[rows_g]``
    (zero for a group without rows), in the dtypes of ``x`` and ``w``; the row tiles are the
    forward pass's."""
    check_interpreter_state()
    dtypes = x.dtype, w.dtype
    dy, x, w = interpreter_cast(dy, x, w)
    dx = _rows(dy, w.transpose(1, 2), offs, (tile_group, tile_start), (block_m, block_k, block_n))
    g, kdim, n = w.shape
    dw = torch.zeros((g, kdim, n), device=x.device, dtype=torch.float32)
    if x.shape[0] > 0:
        grid = (g, triton.cdiv(kdim, block_k), triton.cdiv(n, block_n))
        _weight_grad_kernel[grid](
            x, dy, dw, offs,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2),
            kdim, n, **_sizes(x.dtype, block_m, block_n, block_k), enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return dx.to(dtypes[0]), dw.to(dtypes[1])
