"""What every launcher shares: the interpreter check and the interpreter's bfloat16 cast.

Under ``TRITON_INTERPRET=1`` Triton runs kernels on the CPU through NumPy, which has no
bfloat16: loads and stores of bfloat16 tensors come out wrong. Each launcher therefore
passes its inputs through :func:`interpreter_cast` (bfloat16 becomes float32 there, and only
there) and returns its outputs in the dtypes it was given, so that callers never see the
difference. On a GPU nothing is converted.
"""

from __future__ import annotations

import torch
import triton.language as tl

from .limits import interpreting

__all__ = [
    "FP_FUSION",
    "check_interpreter_state",
    "contiguous",
    "interpreter_cast",
    "interpreting",
    "strides_bth",
]

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
