"""The tensor moves of every multi-head layer: split channels into heads, merge them back,
and normalise along the head dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .._checks import check_divides, check_positive_int, check_tensor


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, H * D] -> [B, T, H, D]``."""
    check_positive_int("n_heads", n_heads)
    check_divides("the last dim of x", x.shape[-1], "n_heads", n_heads)
    return rearrange(x, "b t (h d) -> b t h d", h=n_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D] -> [B, T, H * D]``."""
    check_tensor("x", x, ndim=4)
    return rearrange(x, "b t h d -> b t (h d)")


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` along the last dim (``F.normalize``), for queries and keys.

    fla's ``l2_norm`` (and ``use_qk_l2norm_in_kernel``) computes ``x / sqrt(||x||^2 + eps)``
    instead: the two agree to within ``eps / (2 ||x||^2)`` relative for vectors of norm well
    above ``sqrt(eps)``, and differ only for vectors near zero, where ours scales to unit
    norm and fla's shrinks towards zero.
    """
    return F.normalize(x, dim=-1, eps=eps)


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, G, D] -> [B, T, H, D]``: each of the ``G`` key/value heads repeated for its
    ``H / G`` query heads (grouped-query attention), so query head ``h`` reads key/value head
    ``h // (H / G)``. transformers' ``repeat_kv(x, n_rep)`` does the same on ``[B, G, T, D]``
    with ``n_rep = H / G``."""
    check_tensor("x", x, ndim=4)
    check_positive_int("n_heads", n_heads)
    r = check_divides("n_heads", n_heads, "the key/value heads of x", x.shape[2])
    return repeat(x, "b t g d -> b t (g r) d", r=r)
