r"""A synthetic task whose samples can be checked exactly: a permutation, then its copy.

A sample is ``[pi_1 .. pi_n, pi_1 .. pi_n]`` for a uniformly random permutation ``pi`` of
the symbols ``0 .. n-1`` (``2 n`` tokens). It is valid when its first half uses every
symbol once and its second half repeats the first. Two kinds of dependence live in it, and
parallel decoding can break both (chapter 7.1):

* the first half's symbols exclude one another: two masked positions each sampled from
  their own (correct) marginal collide with probability about ``1 / (symbols left)``;
* a position and its twin ``i +- n`` are equal: once one is known the other is certain,
  and a rule that commits confident tokens first uses that.

The data's likelihood is known exactly: ``log p(x) = -log n!`` for every valid ``x``, and
:func:`perm_copy_oracle` gives the exact conditional of every masked position, the best
possible denoiser, so a sampler can be measured apart from any model's error.
"""

from __future__ import annotations

import torch

from .._checks import check_positive_int, check_tensor

__all__ = ["perm_copy", "perm_copy_oracle", "perm_copy_valid"]


def perm_copy(n_samples: int, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n_samples, 2 n]`` int64 samples: a random permutation of ``0..n-1``, then the same."""
    check_positive_int("n_samples", n_samples)
    check_positive_int("n", n)
    perm = torch.rand(n_samples, n, generator=generator).argsort(dim=1)
    return torch.cat([perm, perm], dim=1)


def perm_copy_valid(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[N]`` bool: row ``x [N, 2 n]`` is a permutation of ``0..n-1`` followed by itself."""
    check_tensor("x", x, ndim=2, dtypes=(torch.long,))
    check_positive_int("n", n)
    if x.shape[1] != 2 * n:
        raise ValueError(f"x must have 2 n = {2 * n} columns, got {x.shape[1]}")
    first, second = x[:, :n], x[:, n:]
    is_perm = (first.sort(dim=1).values == torch.arange(n, device=x.device)).all(dim=1)
    return is_perm & (first == second).all(dim=1)


def perm_copy_oracle(x: torch.Tensor, n: int, mask_id: int) -> torch.Tensor:
    """The exact denoiser of the task: ``log p(x_0^i | x_t)`` for every position, ``[B, 2 n, V]``.

    ``V = mask_id + 1``. A masked position whose twin is known takes the twin's
    symbol; otherwise it is uniform over the symbols the sequence does not show yet (over all
    ``n`` if it already shows an impossible state). An unmasked position is certain. Entries
    of impossible symbols are ``-inf``.

    ``n`` must be a positive int and ``mask_id >= n``: a mask id among the symbols
    ``0 .. n-1`` would make clean tokens look masked (``ValueError`` otherwise).
    """
    check_tensor("x", x, ndim=2, dtypes=(torch.long,))
    check_positive_int("n", n)
    check_positive_int("mask_id", mask_id, allow_zero=True)
    if mask_id < n:
        raise ValueError(
            f"mask_id must not be one of the symbols 0 .. n-1 (mask_id >= n = {n}), got {mask_id}"
        )
    b, length = x.shape
    if length != 2 * n:
        raise ValueError(f"x must have 2 n = {2 * n} columns, got {length}")
    vocab = max(n, mask_id + 1)
    known = x != mask_id
    twin = torch.cat([x[:, n:], x[:, :n]], dim=1)
    twin_known = twin != mask_id
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=x.device)
    seen.scatter_(1, torch.where(known, x, torch.full_like(x, mask_id)), True)
    free = ~seen[:, :n]
    free[free.sum(1) == 0] = True
    uniform = torch.where(free, 0.0, -torch.inf).double()
    uniform = torch.cat([uniform, torch.full((b, vocab - n), -torch.inf, dtype=torch.float64,
                                              device=x.device)], dim=1)  # fmt: skip
    uniform = uniform.log_softmax(-1)
    out = uniform[:, None, :].repeat(1, length, 1)
    certain = torch.where(known, x, twin)
    onehot = torch.full((b, length, vocab), -torch.inf, dtype=torch.float64, device=x.device)
    onehot.scatter_(2, certain[..., None].clamp(max=vocab - 1), 0.0)
    return torch.where((known | twin_known)[..., None], onehot, out)
