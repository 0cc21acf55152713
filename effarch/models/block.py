r"""The pre-norm residual layer that :class:`~effarch.models.TinyLM` and
:class:`~effarch.models.HybridLM` stack, around any token mixer and an optional FFN.

:class:`PreNormBlock` computes, for ``h [B, T, d]``::

    u   = Conv(RMSNorm_1(h))         # Conv: an optional short causal convolution
    h'  = h + Mixer(u)               # token mixing
    out = h' + FFN(RMSNorm_2(h'))    # channel mixing, when there is an FFN

:class:`RecurrentState` is the decode cache of a mixer that carries a state from call to
call (linear attention, SSMs), as opposed to a mixer with a cache object of its own (a
:class:`~effarch.attention.KVCache`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int, check_positive_number
from ..bench import tensor_bytes
from ..nn import ShortConvolution

__all__ = ["PreNormBlock", "RecurrentState"]


class RecurrentState:
    """The state a recurrent mixer carries from call to call (``None`` before the first)."""

    def __init__(self) -> None:
        self.state: Any = None
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of the tensors held (recurrent and convolution states, and the key/value
        buffers of mixers that carry one in their state)."""
        return tensor_bytes(self.state)


class PreNormBlock(nn.Module):
    r"""One pre-norm residual layer (module docstring): ``h + Mixer(Conv(RMSNorm(h)))``, then
    ``+ FFN(RMSNorm(.))`` when ``ffn`` is given.

    Args:
        d_model: width ``d``.
        mixer: maps ``u [B, T, d]`` to ``[B, T, d]``, or to a tuple whose first item is that
            (the layers of :mod:`effarch.linear` and :mod:`effarch.ssm` return
            ``(y, state)``). The same module may sit in several blocks (a tied mixer).
        ffn: ``[B, T, d] -> [B, T, d]`` (a :class:`~effarch.nn.SwiGLU`, an
            :class:`~effarch.moe.MoELayer`), or ``None`` for a block without one.
        conv: a :class:`~effarch.nn.ShortConvolution` over ``d`` channels applied before the
            mixer, or ``None``.
        eps: the RMSNorms' epsilon.

    The submodules are ``mixer_norm``, ``conv``, ``mixer``, ``mlp_norm``, ``mlp``. In
    transformers' decoder layers (``LlamaDecoderLayer``, ``JambaMambaDecoderLayer``, ...)
    they are ``input_layernorm``, the mixer (``self_attn`` / ``mamba``),
    ``post_attention_layernorm`` (Jamba: ``pre_ff_layernorm``) and ``mlp``
    (Jamba: ``feed_forward``).
    """

    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        ffn: nn.Module | None = None,
        *,
        conv: ShortConvolution | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be an nn.Module, got {type(mixer).__name__}")
        if ffn is not None and not isinstance(ffn, nn.Module):
            raise TypeError(f"ffn must be an nn.Module or None, got {type(ffn).__name__}")
        if conv is not None and not isinstance(conv, ShortConvolution):
            raise TypeError(f"conv must be a ShortConvolution or None, got {type(conv).__name__}")
        check_positive_int("d_model", d_model)
        if conv is not None and conv.channels != d_model:
            raise ValueError(f"conv must have d_model={d_model} channels, got {conv.channels}")
        check_positive_number("eps", eps)
        self.mixer_norm = nn.RMSNorm(d_model, eps=eps)
        self.conv = conv
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=eps) if ffn is not None else None
        self.mlp = ffn

    def forward(
        self, h: torch.Tensor, cache: Any = None, conv_cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h [B, T, d] -> (h_out [B, T, d], conv_cache)``.

        ``cache``: ``None`` for a whole sequence; a :class:`RecurrentState` (the mixer is
        called with ``state=cache.state``, and the cache updated in place); or the mixer's
        own cache object (a KV cache), passed as its second argument. ``conv_cache``: the
        convolution's last inputs from the previous call (``None`` at the start), returned
        updated (``None`` when the block has no convolution).
        """
        u = self.mixer_norm(h)
        if self.conv is not None:
            u, conv_cache = self.conv(u, conv_cache)
        if isinstance(cache, RecurrentState):
            y, cache.state = self.mixer(u, state=cache.state)
            cache.length += u.shape[1]
        elif cache is not None:
            y = self.mixer(u, cache)
        else:
            y = self.mixer(u)
            y = y[0] if isinstance(y, tuple) else y
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h, conv_cache
