"""RMSNorm with an optional SiLU gate, the output norm of gated linear layers and Mamba-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_positive_number, check_tensor


class GatedRMSNorm(nn.Module):
    r"""RMSNorm over the last dim (or over groups of it), optionally gated by ``silu(gate)``.

    With ``rms(x) = x / sqrt(mean(x^2) + eps)`` taken over each group of ``group_size``
    channels (all ``dim`` channels by default) and a learned ``weight: [dim]``::

        norm_before_gate=True:   y = rms(x) * weight * silu(gate)     # fla FusedRMSNormGated
        norm_before_gate=False:  y = rms(x * silu(gate)) * weight     # mamba_ssm RMSNormGated

    and ``y = rms(x) * weight`` when ``gate`` is None. ``forward(x [..., dim], gate [..., dim]
    or None) -> [..., dim]``. The norm itself is ``torch.nn.functional.rms_norm``.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        *,
        group_size: int | None = None,
        norm_before_gate: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.eps = check_positive_number("eps", eps)
        group_size = dim if group_size is None else check_positive_int("group_size", group_size)
        if dim % group_size:
            raise ValueError(f"group_size must divide dim ({dim}), got {group_size}")
        self.dim, self.group_size, self.norm_before_gate = dim, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, floating=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., {self.dim}], got shape {tuple(x.shape)}")
        if gate is not None:
            check_tensor("gate", gate, floating=True)
            if gate.shape != x.shape:
                raise ValueError(
                    f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}"
                )
            if gate.device != x.device:
                raise ValueError(f"gate must be on the device of x ({x.device}), got {gate.device}")
        if gate is not None and not self.norm_before_gate:
            x = x * F.silu(gate)
        g = self.group_size
        y = F.rms_norm(x.unflatten(-1, (self.dim // g, g)), (g,), eps=self.eps).flatten(-2)
        y = y * self.weight
        if gate is not None and self.norm_before_gate:
            y = y * F.silu(gate)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.dim}, eps={self.eps:g}, group_size={self.group_size}, "
            f"norm_before_gate={self.norm_before_gate}"
        )
