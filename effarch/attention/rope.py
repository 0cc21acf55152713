"""Rotary position embeddings (RoPE, Su et al., 2021), in the "rotate half" layout of
LLaMA and Hugging Face ``transformers``.

Channel pairs ``(x_i, x_{i + D/2})`` of a head vector at position ``p`` are rotated by the
angle ``p * theta_i`` with ``theta_i = base^(-2i / D)``:

    rope(x, p) = x * cos(p theta) + rotate_half(x) * sin(p theta),
    rotate_half([x1, x2]) = [-x2, x1].

Because rotations compose, ``rope(q, p) . rope(k, s)`` depends on ``p - s`` only.
"""

from __future__ import annotations

import torch

from .._checks import check_tensor


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    *,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotation angles, each ``[T, head_dim]``, computed in
    ``dtype`` (float32, or float64 for float64 inputs)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim
    )
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by the positions ``[T]`` (integers, e.g. ``L + arange(T)``
    when decoding after ``L`` cached tokens). Returns a tensor like ``x``."""
    check_tensor("x", x, ndim=4, floating=True)
    check_tensor("positions", positions, ndim=1)
    if positions.shape[0] != x.shape[1]:
        raise ValueError(
            f"positions must have one entry per token ({x.shape[1]}), got {positions.shape[0]}"
        )
    cos, sin = rope_angles(
        positions, x.shape[-1], base=base, dtype=torch.promote_types(x.dtype, torch.float32)
    )
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
