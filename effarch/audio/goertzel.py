r"""The classical touch-tone receiver: Goertzel's algorithm, a diagonal SSM with fixed poles.

Goertzel (1958) computes one DFT bin with a two-term real recurrence. For a frequency
``f`` at sample rate ``f_s``, ``w = 2 pi f / f_s``::

    s_n = x_n + 2 cos(w) s_{n-1} - s_{n-2},       s_{-1} = s_{-2} = 0
    P   = s_{N-1}^2 + s_{N-2}^2 - 2 cos(w) s_{N-1} s_{N-2}  =  |sum_n x_n e^{-i w n}|^2

The same number comes from the complex one-pole recurrence ``z_n = e^{i w} z_{n-1} + x_n``
(``P = |z_{N-1}|^2``): a diagonal linear state space model with ``A_bar = e^{i w}`` and
``B_bar = 1``, the recurrence of S4D (chapter 2.3) with its decay set to zero and its
frequency fixed. A receiver runs eight of them (the DTMF frequencies) over blocks of ``N``
samples and picks the strongest row and column; chapter 8.2 sets this beside an S4D model
that learns its own poles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import check_positive_int, check_positive_number, check_tensor
from ..tasks.tones import DTMF_COLS, DTMF_ROWS, SAMPLE_RATE

__all__ = ["dtmf_receiver", "goertzel_power"]


def goertzel_power(
    audio: torch.Tensor, freqs: Sequence[float], *, sample_rate: int, block: int
) -> torch.Tensor:
    r"""Power of each frequency in each block of ``block`` samples, by Goertzel's recurrence.

    Args:
        audio: ``[B, T]`` waveform; the ``T % block`` samples after the last full block are
            left out.
        freqs: frequencies in Hz (need not be DFT bin centres).
        sample_rate: samples per second ``f_s``.
        block: ``N``, samples per block.

    Returns:
        ``[B, T // block, F]``: ``P = |sum_n x_n e^{-i 2 pi f n / f_s}|^2`` over each block,
        computed in float64 (equals the DFT bin's squared magnitude when ``f N / f_s`` is
        an integer).
    """
    check_tensor("audio", audio, ndim=2, floating=True)
    check_positive_int("sample_rate", sample_rate)
    check_positive_int("block", block)
    if isinstance(freqs, (str, bytes)) or not isinstance(freqs, Sequence) or not freqs:
        raise ValueError(f"freqs must be a non-empty sequence of frequencies, got {freqs!r}")
    for i, f in enumerate(freqs):
        check_positive_number(f"freqs[{i}]", f)
    n_blocks = audio.shape[1] // block
    if n_blocks == 0:
        raise ValueError(f"audio must hold at least block={block} samples, got {audio.shape[1]}")
    x = audio[:, : n_blocks * block].double().reshape(audio.shape[0], n_blocks, block)
    w = 2 * math.pi * torch.tensor(freqs, dtype=torch.float64) / sample_rate  # [F]
    coef = 2 * torch.cos(w)
    s1 = torch.zeros(*x.shape[:2], len(freqs), dtype=torch.float64)  # s_{n-1}
    s2 = torch.zeros_like(s1)  # s_{n-2}
    for n in range(block):
        s1, s2 = x[:, :, n, None] + coef * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coef * s1 * s2


def dtmf_receiver(
    audio: torch.Tensor,
    *,
    sample_rate: int = SAMPLE_RATE,
    block: int = 320,
    threshold: float = 0.5,
) -> torch.Tensor:
    r"""Per-sample key labels (``0`` silence, ``1..16`` as :func:`~effarch.tasks.touch_tones`)
    from a block-wise Goertzel receiver.

    In each block of ``M = block`` samples, the strongest row frequency ``r`` and column
    frequency ``c`` are kept when they carry at least ``threshold`` of the block's energy,
    ``2 (P_r + P_c) / (M sum_n x_n^2) >= threshold`` (a pure pair of tones gives about 1,
    white noise about ``4 / M``); every sample of the block gets key ``4 r + c + 1``, or 0.
    Samples after the last full block get 0. The labels are not causal: each sample gets
    the decision over its whole block, which is known only at the block's end (up to
    ``M - 1`` samples of look-ahead; a live receiver would emit it up to ``M`` samples
    late), which :func:`~effarch.tasks.tone_accuracy`'s majority vote forgives.
    """
    check_positive_number("threshold", threshold)
    p = goertzel_power(audio, DTMF_ROWS + DTMF_COLS, sample_rate=sample_rate, block=block)
    rows, cols = p[..., :4].max(-1), p[..., 4:].max(-1)
    x = audio[:, : p.shape[1] * block].double().reshape(audio.shape[0], p.shape[1], block)
    energy = x.pow(2).sum(-1).clamp_min(1e-12)
    share = 2 * (rows.values + cols.values) / (block * energy)
    key = torch.where(share >= threshold, 4 * rows.indices + cols.indices + 1, 0)
    out = torch.zeros(audio.shape, dtype=torch.long)
    out[:, : p.shape[1] * block] = key.repeat_interleave(block, dim=1)
    return out
