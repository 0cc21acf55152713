r"""Touch tones on raw 16 kHz audio: a streaming task for sequence models on waveforms.

A telephone keypad sends each key as the sum of two sine waves (dual-tone multi-frequency,
DTMF; ITU-T Recommendation Q.23): one of four *row* frequencies and one of four *column*
frequencies::

              1209 Hz  1336 Hz  1477 Hz  1633 Hz
    697 Hz       1        2        3        A
    770 Hz       4        5        6        B
    852 Hz       7        8        9        C
    941 Hz       *        0        #        D

:func:`touch_tones` draws clips of key presses separated by silence, with random amplitudes,
phases and durations and white noise on top, and labels every sample with the key being
pressed (``1 .. 16``, the index into :data:`DTMF_KEYS` plus one) or silence (``0``). A
causal model cannot know the key at the very first sample of a tone, so the first
``guard`` seconds after every change of label are marked ``-100`` (ignored by
``cross_entropy``) and scored by nobody. :func:`tone_accuracy` scores a model the way a
receiver is judged: one decision per key press, the majority of its scored samples.

At 16 kHz a one-second clip is 16,000 steps: long enough that a model whose memory grows
with the sequence (attention's KV cache) pays for it, and cheap for one whose state is fixed
(chapter 8.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_positive_number, check_tensor
from .mqar import IGNORE_INDEX

__all__ = [
    "DTMF_COLS",
    "DTMF_KEYS",
    "DTMF_ROWS",
    "SAMPLE_RATE",
    "ToneBatch",
    "dtmf_frequencies",
    "keys_from_labels",
    "tone_accuracy",
    "touch_tones",
]

SAMPLE_RATE = 16_000
"""Samples per second of every clip (the rate of wideband speech)."""
DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
"""The four low (row) frequencies in Hz."""
DTMF_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
"""The four high (column) frequencies in Hz."""
DTMF_KEYS = "123A456B789C*0#D"
"""The 16 keys, row by row; label ``k`` (1..16) is ``DTMF_KEYS[k - 1]``, label 0 silence."""


def dtmf_frequencies(key: str) -> tuple[float, float]:
    """The (row, column) frequencies in Hz of one key of :data:`DTMF_KEYS`:
    ``dtmf_frequencies("5") == (770.0, 1336.0)``."""
    if not isinstance(key, str) or len(key) != 1 or key not in DTMF_KEYS:
        raise ValueError(f"key must be one character of {DTMF_KEYS!r}, got {key!r}")
    i = DTMF_KEYS.index(key)
    return DTMF_ROWS[i // 4], DTMF_COLS[i % 4]


@dataclass(frozen=True)
class ToneBatch:
    """Clips of key presses.

    Attributes:
        audio: ``[B, T]`` float32 waveform (peak amplitude about 2).
        labels: ``[B, T]`` int64: ``0`` silence, ``k`` key ``DTMF_KEYS[k - 1]``, ``-100``
            during the ``guard`` after every change of label.
        presses: per clip, the ``(start, end, label)`` of every key press, in samples
            (``end`` exclusive).
        sample_rate: samples per second.
    """

    audio: torch.Tensor
    labels: torch.Tensor
    presses: list[list[tuple[int, int, int]]]
    sample_rate: int

    @property
    def seconds(self) -> float:
        """Duration of each clip in seconds."""
        return self.audio.shape[1] / self.sample_rate

    def keys(self, i: int) -> str:
        """The keys pressed in clip ``i``, in order, as a string."""
        return "".join(DTMF_KEYS[label - 1] for _, _, label in self.presses[i])


def touch_tones(
    n: int,
    seconds: float,
    *,
    sample_rate: int = SAMPLE_RATE,
    tone_ms: tuple[float, float] = (40.0, 100.0),
    gap_ms: tuple[float, float] = (30.0, 80.0),
    noise: float = 0.1,
    guard_ms: float = 10.0,
    seed: int = 0,
) -> ToneBatch:
    r"""``n`` seeded clips of ``seconds`` each, with key presses and their per-sample labels.

    Each clip opens with a silence of up to ``gap_ms[1]``, then alternates a key press (a
    uniform key, a duration uniform in ``tone_ms``) and a silence (uniform in ``gap_ms``)
    until the next press would not fit. A press of key ``(f_r, f_c)`` is

    .. math:: x_t = a_r \sin(2\pi f_r t / f_s + \phi_r) + a_c \sin(2\pi f_c t / f_s + \phi_c)

    with amplitudes uniform in [0.3, 1] and uniform phases; Gaussian noise of standard
    deviation ``noise`` covers the whole clip. By default tones last 40-100 ms (a receiver
    is expected to recognise tones of 40 ms) and pauses 30-80 ms.

    Returns:
        A :class:`ToneBatch`.
    """
    check_positive_int("n", n)
    check_positive_number("seconds", seconds)
    check_positive_int("sample_rate", sample_rate)
    for name, span in (("tone_ms", tone_ms), ("gap_ms", gap_ms)):
        if (
            not isinstance(span, tuple)
            or len(span) != 2
            or not all(isinstance(v, (int, float)) for v in span)
            or not 0 < span[0] <= span[1]
        ):
            raise ValueError(
                f"{name} must be a pair (low, high) with 0 < low <= high, got {span!r}"
            )
    check_positive_number("noise", noise, allow_zero=True)
    check_positive_number("guard_ms", guard_ms, allow_zero=True)
    length = int(round(seconds * sample_rate))
    to_samples = sample_rate / 1000
    lo_tone, hi_tone = (max(1, int(v * to_samples)) for v in tone_ms)
    lo_gap, hi_gap = (max(1, int(v * to_samples)) for v in gap_ms)
    if lo_tone > length:
        raise ValueError(f"seconds={seconds} is shorter than the shortest tone ({tone_ms[0]} ms)")
    g = torch.Generator().manual_seed(seed)
    audio = torch.zeros(n, length)
    labels = torch.zeros(n, length, dtype=torch.long)
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    presses: list[list[tuple[int, int, int]]] = []
    for b in range(n):
        clip: list[tuple[int, int, int]] = []
        pos = int(torch.randint(0, hi_gap + 1, (1,), generator=g))
        while True:
            dur = int(torch.randint(lo_tone, hi_tone + 1, (1,), generator=g))
            if pos + dur > length:
                break
            key = int(torch.randint(0, 16, (1,), generator=g))
            amp = 0.3 + 0.7 * torch.rand(2, generator=g, dtype=torch.float64)
            phase = 2 * math.pi * torch.rand(2, generator=g, dtype=torch.float64)
            tt = t[pos : pos + dur]
            f_r, f_c = DTMF_ROWS[key // 4], DTMF_COLS[key % 4]
            wave = amp[0] * torch.sin(2 * math.pi * f_r * tt + phase[0])
            wave = wave + amp[1] * torch.sin(2 * math.pi * f_c * tt + phase[1])
            audio[b, pos : pos + dur] = wave.float()
            labels[b, pos : pos + dur] = key + 1
            clip.append((pos, pos + dur, key + 1))
            pos += dur + int(torch.randint(lo_gap, hi_gap + 1, (1,), generator=g))
        presses.append(clip)
    audio = audio + noise * torch.randn(n, length, generator=g)
    guard = int(round(guard_ms * to_samples))
    if guard:
        changes = torch.zeros_like(labels, dtype=torch.bool)
        changes[:, 1:] = labels[:, 1:] != labels[:, :-1]
        # a sample is guarded when a change happened within the last `guard` samples
        recent = torch.zeros_like(changes)
        for lag in range(guard):
            recent[:, lag:] |= changes[:, : length - lag]
        labels = labels.masked_fill(recent, IGNORE_INDEX)
    return ToneBatch(audio, labels, presses, sample_rate)


def tone_accuracy(predictions: torch.Tensor, batch: ToneBatch) -> float:
    """Fraction of key presses decoded right: for each press, the most frequent predicted
    label over its scored samples (those not guarded) must be the key pressed.

    Args:
        predictions: ``[B, T]`` int64 predicted labels (``logits.argmax(-1)``).
        batch: the clips they were predicted on.
    """
    check_tensor("predictions", predictions, ndim=2)
    if predictions.shape != batch.labels.shape:
        raise ValueError(
            f"predictions must have the labels' shape {tuple(batch.labels.shape)}, got "
            f"{tuple(predictions.shape)}"
        )
    right = total = 0
    for b, clip in enumerate(batch.presses):
        for start, end, label in clip:
            scored = batch.labels[b, start:end] != IGNORE_INDEX
            votes = predictions[b, start:end][scored]
            if votes.numel() == 0:
                continue
            total += 1
            right += int(torch.mode(votes).values.item() == label)
    if total == 0:
        raise ValueError("batch holds no scored key press")
    return right / total


def keys_from_labels(labels: torch.Tensor, *, min_run: int = 160) -> str:
    """The keys a per-sample label track spells: every run of at least ``min_run`` equal
    non-zero labels (10 ms at 16 kHz by default) is one press; shorter runs (a decoder's
    flicker) and silence are dropped, and consecutive runs of one key separated only by
    flicker count once.

    Args:
        labels: ``[T]`` int64 (``0`` silence, ``k`` key ``DTMF_KEYS[k - 1]``; negative
            values are treated as silence).
        min_run: samples a run needs to count.

    >>> keys_from_labels(torch.tensor([0] * 5 + [6] * 200 + [0] * 9 + [16] * 300), min_run=100)
    '5D'
    """
    check_tensor("labels", labels, ndim=1)
    check_positive_int("min_run", min_run)
    values, counts = torch.unique_consecutive(labels.clamp_min(0), return_counts=True)
    keys, last = [], 0
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        if c < min_run:
            continue  # flicker: neither a press nor a pause
        if v != 0 and v != last:
            keys.append(DTMF_KEYS[v - 1])
        last = v
    return "".join(keys)
