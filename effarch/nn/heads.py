"""The tensor moves of every multi-head layer: split channels into heads, merge them back,
and normalise along the head dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, H * D] -> [B, T, H, D]``."""
    return rearrange(x, "b t (h d) -> b t h d", h=n_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D] -> [B, T, H * D]``."""
    return rearrange(x, "b t h d -> b t (h d)")


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` along the last dim (fla's ``l2_norm`` of queries and keys)."""
    return F.normalize(x, dim=-1, eps=eps)
