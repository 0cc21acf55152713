r"""Streaming a waveform model chunk by chunk, and what a stream costs as it grows.

A stream of audio arrives a chunk at a time (a 10 ms frame is 160 samples at 16 kHz). A
causal model answers each chunk from the chunk and the memory it carried from the ones
before: :func:`stream` feeds it so, and equals one pass over the whole recording. What
that memory costs depends on the mixer (:class:`~effarch.audio.WaveformModel`): S4D's state
is the same size after one second or one hour, attention's cache grows by ``2 G dh``
numbers per layer and sample, a sliding window's stops at the window.
:func:`streaming_cost` measures, at chosen points of a stream, the bytes held and the time
the next chunk takes; the *real-time factor* is that time over the chunk's duration (below
1: the model keeps up with the microphone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_callable, check_positive_int, check_positive_number, check_tensor
from ..bench import best_of_rounds, tensor_bytes

__all__ = ["StreamCost", "stream", "streaming_cost"]


def stream(
    model: nn.Module, audio: torch.Tensor, *, chunk: int, state: Any = None
) -> tuple[torch.Tensor, Any]:
    """Run ``model`` over ``audio [B, T]`` in consecutive chunks of ``chunk`` samples,
    carrying its state: ``y, state = model(audio[:, s:s + chunk], state)``.

    Returns ``(outputs concatenated along time, the final state)``, equal to
    ``model(audio, state)`` up to rounding (tested for every mixer, chunks of 1 sample up).
    """
    check_callable("model", model)
    check_tensor("audio", audio, ndim=2, floating=True)
    check_positive_int("chunk", chunk)
    outs = []
    for start in range(0, audio.shape[1], chunk):
        y, state = model(audio[:, start : start + chunk], state)
        outs.append(y)
    if not outs:
        raise ValueError(f"audio must hold at least one sample, got {tuple(audio.shape)}")
    return torch.cat(outs, dim=1), state


@dataclass(frozen=True)
class StreamCost:
    """What one chunk costs at points of a stream (:func:`streaming_cost`).

    Attributes:
        seconds: position in the stream (audio already heard), in seconds.
        held_bytes: bytes of memory the model holds there (its state or caches).
        chunk_seconds: best wall time of the next chunk there.
        chunk: samples per chunk.
        sample_rate: samples per second.
    """

    seconds: list[float]
    held_bytes: list[int]
    chunk_seconds: list[float]
    chunk: int
    sample_rate: int

    @property
    def real_time_factor(self) -> list[float]:
        """Compute time over audio time, per chunk: ``chunk_seconds / (chunk / f_s)``."""
        duration = self.chunk / self.sample_rate
        return [t / duration for t in self.chunk_seconds]


def streaming_cost(
    model: nn.Module,
    seconds: Sequence[float],
    *,
    chunk: int,
    sample_rate: int = 16_000,
    batch: int = 1,
    repeats: int = 3,
) -> StreamCost:
    """Bytes held and time of the next chunk after ``seconds`` of audio, for each position.

    The state at each position comes from ``model.state_at(batch, samples)`` (shapes as
    after that many samples, contents random; see
    :meth:`~effarch.audio.WaveformModel.state_at`), so an hour-long position costs no hour
    of compute. Times are the best of ``repeats`` interleaved rounds
    (:func:`~effarch.bench.best_of_rounds`) of one ``model(chunk, state)`` call under
    ``torch.no_grad()``, each round on a fresh state; bytes are
    :func:`~effarch.bench.tensor_bytes` of that state.
    """
    if not hasattr(model, "state_at"):
        raise TypeError(
            f"model must have state_at(batch, length), as WaveformModel does; got "
            f"{type(model).__name__}"
        )
    if isinstance(seconds, (str, bytes)) or not isinstance(seconds, Sequence) or not seconds:
        raise ValueError(f"seconds must be a non-empty sequence of positions, got {seconds!r}")
    for i, s in enumerate(seconds):
        check_positive_number(f"seconds[{i}]", s, allow_zero=True)
    check_positive_int("chunk", chunk)
    check_positive_int("sample_rate", sample_rate)
    check_positive_int("batch", batch)
    w = next(model.parameters())
    x = torch.randn(batch, chunk, dtype=w.dtype, device=w.device)
    lengths = [int(round(s * sample_rate)) for s in seconds]

    def prepare(length: int) -> Any:
        def setup() -> Any:
            state = model.state_at(batch, length)

            def run() -> None:
                with torch.no_grad():
                    model(x, state)

            return run

        return setup

    best = best_of_rounds({n: prepare(n) for n in lengths}, repeats=repeats, device=w.device)
    return StreamCost(
        seconds=[float(s) for s in seconds],
        held_bytes=[tensor_bytes(model.state_at(batch, n)) for n in lengths],
        chunk_seconds=[best[n] for n in lengths],
        chunk=chunk,
        sample_rate=sample_rate,
    )
