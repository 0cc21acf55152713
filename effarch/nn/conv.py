"""The short causal convolution that linear-attention and state space layers put before
their token mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._checks import check_positive_int, check_tensor


class ShortConvolution(nn.Module):
    r"""Causal depthwise 1-D convolution over time, channels last, with a decode cache.

    For each channel ``c`` with taps ``w_c: [W]`` (``W = kernel_size``)::

        y_t[c] = act( sum_{i=0}^{W-1} w_c[i] x_{t-W+1+i}[c] + bias[c] ),   act = SiLU or identity

    with ``x_s = 0`` for ``s < 0`` at the start of a sequence. ``forward(x [B, T, C], cache)``
    returns ``(y [B, T, C], new_cache [B, W-1, C])``; the cache holds the last ``W - 1``
    inputs, so consecutive calls equal one call on the concatenation. The weight is stored as
    an ``nn.Conv1d(C, C, W, groups=C)`` (``self.conv``), the layout of fla's
    ``ShortConvolution`` and of the ``conv1d`` of mamba_ssm's ``Mamba``. The cache differs
    from fla's: fla keeps ``[B, C, W]`` (channels first, the last ``W`` inputs) and updates
    it in place, here it is ``[B, W-1, C]`` and returned new (fla's ``cache[..., 1:]
    .transpose(1, 2)`` is this one).
    """

    def __init__(
        self, channels: int, kernel_size: int, *, bias: bool = False, activation: bool = True
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("kernel_size", kernel_size)
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("x", x, ndim=3, floating=True)
        b, _, c = x.shape
        if c != self.channels:
            raise ValueError(
                f"x must be [B, T, C] with C = {self.channels}, got shape {tuple(x.shape)}"
            )
        keep = self.kernel_size - 1
        if cache is None:
            cache = x.new_zeros(b, keep, c)
        else:
            check_tensor("cache", cache, floating=True)
            if tuple(cache.shape) != (b, keep, c):
                raise ValueError(
                    f"cache must have shape [B, W-1, C] = {(b, keep, c)}, got {tuple(cache.shape)}"
                )
            if cache.device != x.device:
                raise ValueError(
                    f"cache must be on the device of x ({x.device}), got {cache.device}"
                )
        full = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
        # no padding: W-1+T inputs give exactly T outputs
        y = rearrange(self.conv(rearrange(full, "b t c -> b c t")), "b c t -> b t c")
        if self.activation:
            y = F.silu(y)
        return y, full[:, full.shape[1] - keep :]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
