r"""Turning a 2-D grid of patch tokens into the 1-D sequences a recurrent mixer reads (8.1).

A causal scan (Mamba, a linear-attention recurrence) reads its input in one order. An
image has none, so vision models choose one, or several, and merge the results. All orders
here are index permutations of the raster (row-major) flattening of an ``h x w`` grid::

    raster         0 1 2 / 3 4 5 / 6 7 8        rows left to right, top to bottom
    snake          0 1 2 / 5 4 3 / 6 7 8        odd rows reversed (boustrophedon, PlainMamba)
    column         0 3 6 / 1 4 7 / 2 5 8        columns top to bottom, left to right
    column_snake   0 3 6 / 7 4 1 / 2 5 8        odd columns reversed

* Vision Mamba (Vim) reads the raster order forwards and backwards and adds the two.
* VMamba's SS2D *cross-scan* reads four: raster, column, and both reversed; *cross-merge*
  maps each output back to its grid position and sums the four (:func:`cross_scan`,
  :func:`cross_merge`; ``cross_merge(cross_scan(x)) = 4 x``).
* Vision-RWKV's *Q-Shift* (:func:`q_shift`) mixes each token with its four grid neighbours
  before the recurrence, so a 1-D scan still sees the pixel above and below.

Layout: grids ``[B, h, w, D]`` (channels last, like the book's ``[batch, seq, ...]``),
sequences ``[B, N, D]`` with ``N = h w``.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_positive_int, check_tensor

__all__ = ["SCAN_ORDERS", "cross_merge", "cross_scan", "from_sequence", "q_shift", "scan_order",
           "to_sequence"]  # fmt: skip

SCAN_ORDERS = ("raster", "snake", "column", "column_snake")
"""The single-direction orders of :func:`scan_order`."""


def scan_order(h: int, w: int, order: str = "raster") -> torch.Tensor:
    """The visiting order of an ``h x w`` grid: ``idx [h w]`` int64, ``idx[s]`` the raster
    index (``r w + c``) of the token read at step ``s`` (see the module docstring)."""
    check_positive_int("h", h)
    check_positive_int("w", w)
    check_choice("order", order, SCAN_ORDERS)
    grid = torch.arange(h * w).reshape(h, w)
    if order in ("column", "column_snake"):
        grid = grid.T.contiguous()  # [w, h]: a column per row
    if order.endswith("snake"):
        grid[1::2] = grid[1::2].flip(-1)
    return grid.flatten()


def _check_grid(x: torch.Tensor) -> tuple[int, int, int, int]:
    check_tensor("x", x, ndim=4)
    b, h, w, d = x.shape
    return b, h, w, d


def to_sequence(x: torch.Tensor, order: str = "raster") -> torch.Tensor:
    """``x [B, h, w, D] -> [B, h w, D]`` read in ``order``."""
    b, h, w, d = _check_grid(x)
    return x.reshape(b, h * w, d)[:, scan_order(h, w, order).to(x.device)]


def from_sequence(seq: torch.Tensor, h: int, w: int, order: str = "raster") -> torch.Tensor:
    """The inverse of :func:`to_sequence`: ``seq [B, h w, D]`` read in ``order`` back to
    ``[B, h, w, D]``."""
    check_tensor("seq", seq, ndim=3)
    if seq.shape[1] != h * w:
        raise ValueError(f"seq must hold h * w = {h * w} tokens, got {seq.shape[1]}")
    idx = scan_order(h, w, order).to(seq.device)
    out = torch.empty_like(seq)
    out[:, idx] = seq
    return out.reshape(seq.shape[0], h, w, seq.shape[2])


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """VMamba's CrossScan: ``x [B, h, w, D] -> [B, 4, h w, D]``, the grid read row-major,
    column-major, and both reversed (the order of VMamba's ``CrossScan``)."""
    rows, cols = to_sequence(x, "raster"), to_sequence(x, "column")
    return torch.stack([rows, cols, rows.flip(1), cols.flip(1)], 1)


def cross_merge(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """VMamba's CrossMerge: ``y [B, 4, h w, D]`` (outputs in :func:`cross_scan`'s four
    orders) mapped back to the grid and summed, ``[B, h, w, D]``."""
    check_tensor("y", y, ndim=4)
    if y.shape[1] != 4:
        raise ValueError(f"y must hold the 4 directions of cross_scan, got {y.shape[1]}")
    return (from_sequence(y[:, 0], h, w, "raster") + from_sequence(y[:, 1], h, w, "column")
            + from_sequence(y[:, 2].flip(1), h, w, "raster")
            + from_sequence(y[:, 3].flip(1), h, w, "column"))  # fmt: skip


def q_shift(x: torch.Tensor, mu: torch.Tensor | None = None, *, shift: int = 1) -> torch.Tensor:
    """Vision-RWKV's Q-Shift: each quarter of the channels takes its value from the token
    ``shift`` pixels to the left, right, above and below (zero past the border), then is
    interpolated with the token itself: ``x + mu (x_shifted - x)``.

    Args:
        x: ``[B, h, w, D]``, ``D`` divisible by 4.
        mu: ``[D]`` interpolation weights (a learned parameter; default 1: the shift alone).
        shift: the distance in pixels.
    """
    b, h, w, d = _check_grid(x)
    check_positive_int("shift", shift)
    if d % 4:
        raise ValueError(f"q_shift splits the channels in four: D must be divisible by 4, got {d}")
    q, s = d // 4, shift
    out = torch.zeros_like(x)
    out[:, :, s:, :q] = x[:, :, :-s, :q]  # from the left
    out[:, :, :-s, q : 2 * q] = x[:, :, s:, q : 2 * q]  # from the right
    out[:, s:, :, 2 * q : 3 * q] = x[:, :-s, :, 2 * q : 3 * q]  # from above
    out[:, :-s, :, 3 * q :] = x[:, s:, :, 3 * q :]  # from below
    return out if mu is None else x + mu * (out - x)
