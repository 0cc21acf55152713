r"""Feature maps for linear attention: ``exp(q . k) ~ phi(q) . phi(k)`` or a positive substitute.

Linear attention replaces the softmax kernel ``exp(q . k)`` by an inner product of features,
``phi(q) . phi(k)``, so that ``sum_s (phi(q_t) . phi(k_s)) v_s = phi(q_t)^T S_t`` with the
state ``S_t = sum_s phi(k_s) v_s^T`` of fixed size. The ops in :mod:`effarch.linear.ops` take
``q`` and ``k`` as given; a layer applies one of these maps to both first (and then usually
``normalize=True`` in :func:`~effarch.linear.ops.linear_attention`, which needs positive
features). All maps act on the last dimension and keep the leading ones, so they apply to
``[B, T, H, D]`` directly.

* :func:`elu_plus_one` (Katharopoulos et al., 2020) and :func:`relu`: cheap, positive,
  no attempt to approximate ``exp``; feature dim ``D``.
* :class:`PerformerFeatureMap` (Choromanski et al., 2021, FAVOR+): positive random features,
  an unbiased estimate of ``exp(q . k)``; feature dim ``num_features``.
* :func:`taylor_feature_map` (Based, Arora et al., 2024): the second-order Taylor expansion
  ``exp(x) ~ 1 + x + x^2 / 2``, exact as an inner product; feature dim ``1 + D + D^2``.
* :class:`HedgehogFeatureMap` (Zhang et al., 2024): a learned linear map followed by a softmax
  over features, for both signs, trained to mimic softmax attention; feature dim ``2 F``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_tensor

__all__ = [
    "HedgehogFeatureMap",
    "PerformerFeatureMap",
    "elu_plus_one",
    "relu",
    "taylor_feature_map",
]


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``, elementwise: ``x + 1`` for ``x > 0``, ``e^x`` otherwise.

    Computed branch by branch rather than as ``elu(x) + 1``, whose ``(e^x - 1) + 1`` rounds to
    zero in float32 once ``x < -17``; this way the features stay positive down to ``exp``'s
    own underflow (``x < -103`` in float32).
    """
    check_tensor("x", x, floating=True)
    # clamp the unused branch so that exp cannot overflow and poison the gradient with nan
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))


def relu(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = max(x, 0)``, elementwise: non-negative (a row of zeros is possible)."""
    check_tensor("x", x, floating=True)
    return F.relu(x)


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    r"""Based's second-order Taylor features: ``[1, x, vec(x x^T) / sqrt(2)]``.

    ``[..., D] -> [..., 1 + D + D^2]``, built so that, exactly,

        phi(x) . phi(y) = 1 + x . y + (x . y)^2 / 2

    (since ``vec(x x^T) . vec(y y^T) = (x . y)^2``), the Taylor polynomial of ``exp(x . y)``.
    It is positive for every pair (``1 + s + s^2 / 2 > 0``), though the features themselves
    are not. Scale the inputs first to approximate ``exp(q . k / sqrt(D))`` (Based divides each
    of ``q`` and ``k`` by ``D ** 0.25``). Based stores only the ``D (D + 1) / 2`` distinct
    products of the symmetric ``x x^T``; the full outer product used here is simpler and gives
    the same inner products.
    """
    check_tensor("x", x, floating=True)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def _chi_norms(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Norms of ``n`` independent ``d``-dimensional standard Gaussian vectors."""
    return torch.randn(n, d, generator=gen, dtype=torch.float64).norm(dim=-1)


class PerformerFeatureMap(nn.Module):
    r"""FAVOR+ positive random features (Performer): an unbiased estimate of ``exp(q . k)``.

    With a fixed projection ``W: [M, D]`` whose rows are standard Gaussian (marginally),

        phi(x) = exp(W x - ||x||^2 / 2) / sqrt(M)          # [..., D] -> [..., M], all > 0

    and ``E_W[phi(q) . phi(k)] = exp(q . k)`` because
    ``E_w[exp(w . (q + k))] = exp(||q + k||^2 / 2)``. With independent rows the relative
    variance is ``(exp(||q + k||^2) - 1) / M``: the typical error falls as ``1 / sqrt(M)`` only
    once ``M`` is large against ``exp(||q + k||^2)`` (chapter 2.1 measures slower rates). With
    ``orthogonal=True`` the rows come in blocks of ``D`` mutually orthogonal directions with
    Gaussian-like (chi-distributed) norms, which keeps the estimate unbiased and lowers its
    variance.

    The projection is drawn once from ``seed`` and stored as a buffer (not a parameter), so
    ``q`` and ``k`` see the same ``W``. To approximate the softmax kernel
    ``exp(q . k / sqrt(D))`` pass ``q`` and ``k`` divided by ``D ** 0.25``. Large norms make
    ``exp`` overflow; Performer subtracts a running maximum, which cancels after
    normalisation, and is left out here to keep the estimate exactly unbiased.

    Args:
        dim: input dimension ``D``.
        num_features: number of random features ``M``.
        orthogonal: draw orthogonal blocks (default) or independent Gaussian rows.
        seed: seed of the projection.
    """

    projection: torch.Tensor

    def __init__(
        self, dim: int, num_features: int, *, orthogonal: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_features", num_features)
        check_positive_int("seed", seed, allow_zero=True)
        gen = torch.Generator().manual_seed(seed)
        if orthogonal:
            blocks = []
            for _ in range(math.ceil(num_features / dim)):
                gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
                qmat, rmat = torch.linalg.qr(gauss)
                # fixing the signs by diag(R) makes Q uniformly (Haar) distributed; without it
                # the directions are biased and so is the estimate
                qmat = qmat * torch.sign(torch.diagonal(rmat))[None, :]
                blocks.append(qmat.T * _chi_norms(dim, dim, gen)[:, None])
            w = torch.cat(blocks, dim=0)[:num_features]
        else:
            w = torch.randn(num_features, dim, generator=gen, dtype=torch.float64)
        self.dim, self.num_features = dim, num_features
        self.register_buffer("projection", w.to(torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., M]`` positive features."""
        check_tensor("x", x, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        w = self.projection.to(dtype=x.dtype, device=x.device)
        sq = 0.5 * (x * x).sum(dim=-1, keepdim=True)
        return torch.exp(x @ w.T - sq) / math.sqrt(self.num_features)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.num_features}"


class HedgehogFeatureMap(nn.Module):
    r"""Hedgehog's learnable feature map: a softmax over learned features, for both signs.

    Per head ``h`` with weights ``W_h: [D, F]`` and bias ``b_h: [F]``::

        z = x W_h + b_h
        phi(x) = [softmax(z), softmax(-z)]                 # [..., H, D] -> [..., H, 2F]

    Every feature is positive, each half sums to one, and ``phi(q) . phi(k)`` is a sum of
    exponentials of ``+-(z_q)_i`` and ``+-(z_k)_j``, which can be trained to be "spiky" and
    monotone in ``q . k`` like softmax attention (Zhang et al., 2024 train it by distilling the
    softmax attention weights). ``W_h`` starts as the identity when ``F = D`` (a small random
    matrix otherwise) and ``b_h`` at zero.

    This is LoLCATs' form (its ``FeatureMapMLP`` with the ``softmax_dim`` activation): a map
    per head and two separate softmaxes. fla's ``fla.modules.feature_map.HedgehogFeatureMap``
    differs: one ``nn.Linear(D, D)`` shared by all heads (identity at init), then a single
    softmax over ``cat([2 z, -2 z])``, so its ``2 D`` features sum to one together, not per
    half.

    Args:
        num_heads: ``H``; the input's second-to-last dimension.
        head_dim: ``D``; the input's last dimension.
        feature_dim: ``F`` (default ``D``); the output has ``2 F`` features.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", head_dim)
        feature_dim = head_dim if feature_dim is None else feature_dim
        check_positive_int("feature_dim", feature_dim)
        if feature_dim == head_dim:
            w = torch.eye(head_dim).expand(num_heads, head_dim, head_dim).clone()
        else:
            w = torch.randn(num_heads, head_dim, feature_dim) * head_dim**-0.5
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(num_heads, feature_dim))
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H, D] -> [..., H, 2F]`` positive features."""
        check_tensor("x", x, floating=True)
        if x.ndim < 2 or tuple(x.shape[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"x must be [..., H, D] = [..., {self.num_heads}, {self.head_dim}], "
                f"got shape {tuple(x.shape)}"
            )
        z = torch.einsum("...hd,hdf->...hf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"
        )
