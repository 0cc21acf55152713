"""Efficient mixers on raw audio (survey section 8.2): waveform models that stream.

* :mod:`~effarch.audio.model`: :class:`WaveformModel`, a causal stack over 16 kHz samples
  whose mixer is S4D (fixed state), attention (a cache that grows) or a sliding window
  (a cache of fixed length), with the state it carries from chunk to chunk;
* :mod:`~effarch.audio.streaming`: :func:`stream` (chunk by chunk, equal to one pass) and
  :func:`streaming_cost` (bytes held and time per second of audio at any point of a stream);
* :mod:`~effarch.audio.goertzel`: the classical touch-tone receiver, Goertzel's recurrence,
  which is a diagonal SSM with fixed poles.

The task they are trained on is :func:`effarch.tasks.touch_tones`.
"""

from .goertzel import dtmf_receiver, goertzel_power
from .model import AUDIO_MIXERS, WaveformModel
from .streaming import StreamCost, stream, streaming_cost

__all__ = [
    "AUDIO_MIXERS",
    "StreamCost",
    "WaveformModel",
    "dtmf_receiver",
    "goertzel_power",
    "stream",
    "streaming_cost",
]
