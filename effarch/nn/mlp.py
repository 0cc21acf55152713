"""The gated feed-forward block of Llama-family models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    r"""``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Shazeer, 2020), bias-free.

    The module names are ``transformers``' ``LlamaMLP`` (and of the shared experts of
    ``Qwen2MoeSparseMoeBlock`` and ``DeepseekV3MoE``), so their weights load by name.
    ``x [..., d_model] -> [..., d_model]``; ``3 d_model d_ff`` parameters.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
