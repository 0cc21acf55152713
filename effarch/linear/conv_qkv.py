"""Query, key and value projections each followed by a short causal convolution.

The input side of the delta-rule layers (:class:`~effarch.linear.DeltaNet`,
:class:`~effarch.linear.GatedDeltaNet`, :class:`~effarch.linear.TTTLinear`), as in fla's
layers: ``q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))``, with the
convolutions' caches carried in the layer's state for decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import State, check_positive_int
from ..nn import ShortConvolution

__all__ = ["ConvQKV"]


class ConvQKV(nn.Module):
    """Projections to ``q, k, v`` followed by a short causal conv + SiLU on each.

    ``forward(x [B, T, d_model], state) -> (q [B, T, key_dim], k [B, T, key_dim],
    v [B, T, value_dim], new_conv_state)``; ``state`` holds the convolution caches
    ``conv_q``, ``conv_k``, ``conv_v`` (``[B, conv_size - 1, channels]``, shapes from
    :meth:`state_shapes`) or is empty at the start of a sequence.
    """

    def __init__(self, d_model: int, key_dim: int, value_dim: int, conv_size: int) -> None:
        super().__init__()
        check_positive_int("conv_size", conv_size)
        self.conv_size = conv_size
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.q_conv = ShortConvolution(key_dim, conv_size)
        self.k_conv = ShortConvolution(key_dim, conv_size)
        self.v_conv = ShortConvolution(value_dim, conv_size)

    def state_shapes(self, b: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the three convolution caches for a batch of ``b`` sequences."""
        w = self.conv_size - 1
        return {
            "conv_q": (b, w, self.q_conv.channels),
            "conv_k": (b, w, self.k_conv.channels),
            "conv_v": (b, w, self.v_conv.channels),
        }

    def forward(
        self, x: torch.Tensor, st: State
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
        q, cq = self.q_conv(self.q_proj(x), st.get("conv_q"))
        k, ck = self.k_conv(self.k_proj(x), st.get("conv_k"))
        v, cv = self.v_conv(self.v_proj(x), st.get("conv_v"))
        return q, k, v, {"conv_q": cq, "conv_k": ck, "conv_v": cv}
