r"""A causal model over raw waveform samples, whose mixer is an SSM, attention or a window.

:class:`WaveformModel` reads one sample per step (``x_t``, a float) and emits one vector of
class logits per step: a scalar lifted to ``d_model`` channels, ``n_layers`` pre-norm
residual blocks around a token mixer, a final norm and a linear head::

    h_t = W_in x_t + b_in                                   # [d]
    h   = h + mixer(RMSNorm(h))                             # n_layers times
    logits_t = W_head RMSNorm(h_t)                          # [n_classes]

It is SaShiMi's setting (Goel et al., 2022: S4 on raw audio samples) at toy size, without
its pooling. The mixer decides what the model must hold while it streams:

* ``"s4d"``: :class:`~effarch.ssm.S4D` (chapter 2.3), a fixed ``d_model x d_state`` state;
* ``"attention"``: causal :class:`~effarch.attention.MultiHeadAttention` with RoPE, whose
  key/value cache grows by one entry per sample;
* ``"window"``: the same attention restricted to the last ``window`` samples (Mistral's
  sliding window), a cache of ``window - 1`` entries. It runs PyTorch's fused attention
  with a window mask (:func:`~effarch.attention.sdpa_attention`): a chunk of samples scores
  every key it holds, then masks those outside the window.

``forward(audio [B, T], state=None) -> (logits [B, T, C], state)``: ``state`` is the list of
per-layer memories (``None`` before the first call); feeding a stream in consecutive chunks
with the returned state equals one call on the whole of it (:func:`~effarch.audio.stream`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_positive_int, check_positive_number, check_tensor
from ..attention import MultiHeadAttention, WindowKVCache, sdpa_attention
from ..ssm import S4D

__all__ = ["AUDIO_MIXERS", "WaveformModel"]

AUDIO_MIXERS = ("s4d", "attention", "window")
"""The mixers :class:`WaveformModel` can be built with."""


class WaveformModel(nn.Module):
    r"""A causal classifier of every sample of a waveform (module docstring).

    Args:
        n_classes: ``C``, logits per step.
        d_model: channels ``d``.
        n_layers: residual blocks.
        mixer: one of :data:`AUDIO_MIXERS`.
        d_state: S4D's ``N`` per channel (``"s4d"`` only).
        dt_min, dt_max: range of S4D's initial steps, in samples (``"s4d"`` only). The
            defaults put the poles' frequencies over the whole band of 16 kHz audio.
        n_heads: attention heads (``"attention"``, ``"window"``).
        window: samples each step sees, itself included (``"window"`` only).

    ``state`` (a list with one entry per layer): S4D's ``{"s": [B, d, N/2]}`` complex, or a
    :class:`~effarch.attention.WindowKVCache` (``window=None`` for full attention). Caches
    are updated in place, as transformers' caches are; S4D states are replaced.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        d_model: int = 16,
        n_layers: int = 2,
        mixer: str = "s4d",
        d_state: int = 16,
        dt_min: float = 0.01,
        dt_max: float = 0.2,
        n_heads: int = 2,
        window: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("n_classes", n_classes)
        check_positive_int("d_model", d_model)
        check_positive_int("n_layers", n_layers)
        check_choice("mixer", mixer, AUDIO_MIXERS)
        if mixer == "window":
            if window is None:
                raise ValueError('mixer="window" needs window=<samples seen per step>')
            check_positive_int("window", window)
        elif window is not None:
            raise ValueError(
                f'window is for mixer="window" only, got window={window} with {mixer=}'
            )
        self.mixer, self.window, self.d_model = mixer, window, d_model
        self.in_proj = nn.Linear(1, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(n_layers))
        if mixer == "s4d":
            check_positive_number("dt_min", dt_min)
            check_positive_number("dt_max", dt_max)
            layers = [S4D(d_model, d_state, dt_min=dt_min, dt_max=dt_max) for _ in range(n_layers)]
        else:
            attn: Any = sdpa_attention
            if window is not None:
                attn = functools.partial(sdpa_attention, window=(window - 1, 0))
            layers = [MultiHeadAttention(d_model, n_heads, attention=attn) for _ in range(n_layers)]
        self.mixers = nn.ModuleList(layers)
        self.out_norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def new_state(self, batch: int) -> list[Any]:
        """The memory before the first sample: ``None`` per S4D layer (zeros), an empty
        cache per attention layer."""
        check_positive_int("batch", batch)
        if self.mixer == "s4d":
            return [None] * len(self.mixers)
        w = self.in_proj.weight
        return [
            WindowKVCache(
                batch, self.window, m.n_kv_heads, m.head_dim, dtype=w.dtype, device=w.device
            )
            for m in self.mixers
        ]

    def state_at(self, batch: int, length: int) -> list[Any]:
        """A state shaped as after ``length`` samples, with random contents.

        The cost of the next chunk depends on the shapes only, so this measures a stream
        hours long without computing it (:func:`~effarch.audio.streaming_cost`). S4D:
        ``[B, d, N/2]`` complex whatever ``length``; attention: ``length`` keys and values
        per layer; window: ``min(length, window - 1)``. Cache positions count ``length``.
        """
        check_positive_int("length", length, allow_zero=True)
        state = self.new_state(batch)
        w = self.in_proj.weight
        if self.mixer == "s4d":
            half = self.mixers[0].d_state // 2
            shape = (batch, self.d_model, half)
            ctype = torch.promote_types(w.dtype, torch.complex64)
            return [{"s": torch.randn(shape, dtype=ctype, device=w.device)} for _ in state]
        held = length if self.window is None else min(length, self.window - 1)
        for cache in state:
            shape = (batch, held, *cache.k.shape[2:])
            cache.k = torch.randn(shape, dtype=w.dtype, device=w.device)
            cache.v = torch.randn(shape, dtype=w.dtype, device=w.device)
            cache.length = length
        return state

    def state_size(self, seq_len: int) -> int:
        """Elements of memory one stream holds after ``seq_len`` samples, all layers:
        ``L d N`` (S4D), ``2 L T G dh`` (attention), ``2 L min(T, window - 1) G dh``
        (window)."""
        check_positive_int("seq_len", seq_len, allow_zero=True)
        n = len(self.mixers)
        if self.mixer == "s4d":
            return n * self.d_model * self.mixers[0].d_state
        m = self.mixers[0]
        held = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * n * held * m.n_kv_heads * m.head_dim

    def forward(
        self, audio: torch.Tensor, state: list[Any] | None = None
    ) -> tuple[torch.Tensor, list[Any]]:
        check_tensor("audio", audio, ndim=2, floating=True)
        if audio.shape[1] == 0:
            raise ValueError(f"audio must hold at least one sample, got {tuple(audio.shape)}")
        state = self.new_state(audio.shape[0]) if state is None else list(state)
        if len(state) != len(self.mixers):
            raise ValueError(
                f"state must hold one entry per layer ({len(self.mixers)}), got {len(state)}"
            )
        h = self.in_proj(audio[..., None].to(self.in_proj.weight.dtype))
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers, strict=True)):
            if self.mixer == "s4d":
                y, state[i] = mixer(norm(h), state[i])
            else:
                y = mixer(norm(h), state[i])
            h = h + y
        return self.head(self.out_norm(h)), state

    def extra_repr(self) -> str:
        extra = f", window={self.window}" if self.window is not None else ""
        return f"mixer={self.mixer!r}{extra}"
