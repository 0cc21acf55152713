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

from .common import check_interpreter_state, interpreter_cast

__all__ = ["grouped_gemm_backward", "grouped_gemm_forward"]


@triton.jit
def _rows_kernel(
    X, W, Y, TILE_GROUP, TILE_START, OFFS,
    sxm, sxk, swg, swk, swn, sym, syn,
    K, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.load(TILE_GROUP + t)
    if g < 0:
        return
    start = tl.load(TILE_START + t)
    end = tl.load(OFFS + g)
    rows = start + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < end
    c_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(W + g * swg + ks[:, None] * swk + cols[None, :] * swn,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(Y + rows[:, None] * sym + cols[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])  # fmt: skip


@triton.jit
def _weight_grad_kernel(
    X, DY, DW, OFFS,
    sxm, sxk, sdym, sdyn, sdwg, sdwk, sdwn,
    K, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    pk = tl.program_id(1)
    pn = tl.program_id(2)
    end = tl.load(OFFS + g)
    start = tl.load(OFFS + g - 1, mask=g > 0, other=0)
    ks = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    c_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        a = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(DY + rows[:, None] * sdym + cols[None, :] * sdyn,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    tl.store(DW + g * sdwg + ks[:, None] * sdwk + cols[None, :] * sdwn,
             acc.to(DW.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])  # fmt: skip


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
        kdim, n, **_sizes(x.dtype, block_m, block_n, block_k),
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
            kdim, n, **_sizes(x.dtype, block_m, block_n, block_k),
        )  # fmt: skip
    return dx.to(dtypes[0]), dw.to(dtypes[1])
