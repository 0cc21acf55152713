"""What every launcher shares: the interpreter check, the interpreter's bfloat16 cast, and
the fallback to smaller launch shapes on a card with less shared memory (``first_that_fits``).

Under ``TRITON_INTERPRET=1`` Triton runs kernels on the CPU through NumPy, which has no
bfloat16: loads and stores of bfloat16 tensors come out wrong. Each launcher therefore
passes its inputs through :func:`interpreter_cast` (bfloat16 becomes float32 there, and only
there) and returns its outputs in the dtypes it was given, so that callers never see the
difference. On a GPU nothing is converted.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .limits import interpreting

__all__ = [
    "FP_FUSION",
    "NoShapeFits",
    "check_interpreter_state",
    "contiguous",
    "first_that_fits",
    "interpreter_cast",
    "interpreting",
    "smaller_tiles",
    "strides_bth",
]

C = TypeVar("C")
R = TypeVar("R")

FP_FUSION = True
"""Passed to every launch as ``enable_fp_fusion``: the compiler may fuse a multiply and an
add into one FMA instruction (one instruction and one rounding instead of two), as in the
online softmax's rescaling, the decays, and float32 products taken on the FMA units rather
than the tensor cores. Triton up to 3.9 fuses unless told otherwise; 3.10 stops
by default (``TRITON_DEFAULT_FP_FUSION``), so the kernels say what they were tuned and tested
with instead of changing speed and last-bit results with the Triton version.
``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off for a bit-reproducibility check."""


def check_interpreter_state() -> None:
    """Fail early when ``TRITON_INTERPRET`` changed after Triton was imported.

    Triton decides between interpreter and compiler when ``triton`` is first imported; an
    environment variable set later is half-seen and fails deep inside the kernel.
    """
    if interpreting() != (type(tl.max).__name__ == "InterpretedFunction"):
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported; set it before importing "
            "torch.utils or effarch (effarch.notebook.setup does this on a CPU)"
        )


def interpreter_cast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors a kernel can read here: under the interpreter, bfloat16 ones as float32
    copies (its bfloat16 is broken); everything else, and everything on a GPU, unchanged.
    ``None`` entries stay ``None``."""
    if not interpreting():
        return tensors
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors)


def contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Contiguous versions of the tensors (the kernels index rows by hand); ``None`` stays."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def strides_bth(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a ``[batch, seq, heads, ...]`` tensor's first three dims (the kernels index
    rows by hand)."""
    return t.stride(0), t.stride(1), t.stride(2)


# what first_that_fits chose, by the launcher's key: the index of the first shape that fitted
_FITTED: dict[Hashable, int] = {}


def first_that_fits(key: Hashable, candidates: Sequence[C], launch: Callable[[C], R]) -> R:
    """``launch(c)`` for the first of ``candidates`` (launch shapes, the preferred first)
    that the GPU holds; the choice is remembered under ``key``, which must name everything
    that changes the compiled kernel besides the candidate (kernel, dtypes, sizes, switches,
    device).

    A GPU refuses a compiled kernel that asks for more shared memory than one block may
    have: Triton raises ``OutOfResources`` before anything runs. What a tiling asks for
    differs from card to card (64 KiB per block on a T4, 99 on an L4 or an RTX 4090, 163 on
    an A100, 227 on an H100), so a launcher with fixed tiles lists the shapes it was tuned
    with first and smaller ones after: the autotuner's rule (skip what does not fit)
    without the timing. When none fits, ``NoShapeFits`` (an ``OutOfResources``) is raised."""
    if not candidates:
        raise ValueError(f"candidates must not be empty, got {candidates!r}")
    last = len(candidates) - 1
    for i in range(_FITTED.get(key, 0), last):
        try:
            out = launch(candidates[i])
        except OutOfResources:
            continue
        _FITTED[key] = i
        return out
    try:
        out = launch(candidates[last])
    except OutOfResources as err:
        raise NoShapeFits(key, len(candidates), err) from err
    _FITTED[key] = last
    return out


class NoShapeFits(OutOfResources):
    """None of a launch's shapes fits the GPU: ``OutOfResources`` (so that a launcher one
    level up, trying shorter chunks, goes on to its next), saying which launch it was and
    that its smallest shape was tried, where Triton's own message suggests smaller blocks."""

    def __init__(self, key: Hashable, tried: int, last: OutOfResources) -> None:
        super().__init__(last.required, last.limit, last.name)
        self.key, self.tried = key, tried

    def __str__(self) -> str:
        name = self.key[0] if isinstance(self.key, tuple) and self.key else self.key
        return (
            f"no launch shape of {name} fits this GPU: the last of the {self.tried} tried "
            f"needs {self.required} bytes of {self.name} per block, the card has {self.limit}"
        )

    def __reduce__(self):
        return (
            type(self),
            (self.key, self.tried, OutOfResources(self.required, self.limit, self.name)),
        )


def smaller_tiles(
    block_m: int, block_n: int, stages: int, least_m: int = 16, least_n: int = 16
) -> list[tuple[int, int, int]]:
    """``(block_m, block_n, stages)`` and the launch shapes to fall back on, in order: the
    same tiles in 2 pipeline stages, then the larger side halved (rows first on a tie) in
    2 stages, down to ``least_m x least_n``, then that in 1 stage. Every tile side stays a
    power of two that divides the one before (blocks that divide a layout keep dividing it).

    ``smaller_tiles(64, 32, 3) == [(64, 32, 3), (64, 32, 2), (32, 32, 2), (16, 32, 2),
    (16, 16, 2), (16, 16, 1)]``."""
    out = [(block_m, block_n, stages)]
    m, n, st = block_m, block_n, min(stages, 2)
    while True:
        if (m, n, st) not in out:
            out.append((m, n, st))
        if m <= least_m and n <= least_n:
            break
        if (m >= n and m > least_m) or n <= least_n:
            m //= 2
        else:
            n //= 2
    if st > 1:
        out.append((m, n, 1))
    return out
