"""Floating-point operations: measured and analytic, side by side.

Convention (the one used by ``torch.utils.flop_counter`` and by FLOP counts in papers):
a multiply-add is 2 FLOPs, so ``A @ B`` with ``A: [m, k]`` and ``B: [k, n]`` costs
``2 m k n``. ``FlopCounterMode`` counts the matrix products (mm, bmm, addmm, convolution,
``scaled_dot_product_attention``, forward and backward, on the CPU too); softmax,
normalisation and elementwise work are not counted. The analytic formulas below follow the
same convention, so the two agree exactly on the matmuls and a reader can see what each
leaves out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._checks import check_callable, check_positive_int


@dataclass(frozen=True)
class FlopCount:
    """Total FLOPs of one call and the share of each aten operator."""

    total: int
    by_operator: dict[str, int]

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {format_flops(v)}" for k, v in self.by_operator.items())
        return f"{format_flops(self.total)} ({parts})"


def format_flops(n: float) -> str:
    """Format a FLOP count with an SI prefix: ``2.5e12 -> '2.50 TFLOP'``."""
    for unit, factor in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """Forward FLOPs of softmax attention from the shapes ``[B, H, Tq, D]``, ``[B, Hkv, Tk, D]``
    and ``[B, Hkv, Tk, Dv]``: ``2 B H Tq Tk (D + Dv)`` (the causal mask not discounted, as
    PyTorch counts its GPU kernels)."""
    b, h, tq, d = query
    tk, dv = key[-2], value[-1]
    return 2 * b * h * tq * tk * (d + dv)


def _sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
) -> int:
    """Backward FLOPs of softmax attention: twice the forward's, PyTorch's convention for its
    own SDPA backward kernels (``dQ, dK, dV`` and the recomputed scores)."""
    return 2 * _sdpa_flops(query, key, value)


def measure_flops(fn: Callable[[], Any]) -> FlopCount:
    """Count the FLOPs of ``fn()`` with ``torch.utils.flop_counter.FlopCounterMode``.

    The call runs once, for real, with the counter active. Only matrix products are
    counted (see the module docstring).
    """
    check_callable("fn", fn)
    # imported here: torch.utils.flop_counter imports triton, and Triton must see
    # TRITON_INTERPRET before its first import (effarch.notebook.setup sets it on a CPU)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # PyTorch counts SDPA's GPU kernels but not the CPU ones; the same formulas cover them
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    cpu_sdpa_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    mapping = {cpu_sdpa: _sdpa_flops, cpu_sdpa_bwd: _sdpa_backward_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    whole_call = counter.get_flop_counts().get("Global", {})
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in whole_call.items()}
    return FlopCount(total=int(counter.get_total_flops()), by_operator=by_op)


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of ``[m, k] @ [k, n]``: ``2 m k n``."""
    for name, v in (("m", m), ("k", k), ("n", n)):
        check_positive_int(name, v)
    return 2 * m * k * n


def attention_flops(
    batch: int,
    seq_q: int,
    heads: int,
    head_dim: int,
    *,
    seq_k: int | None = None,
    causal: bool = False,
    head_dim_v: int | None = None,
) -> int:
    """Matmul FLOPs of softmax attention ``softmax(Q K^T) V`` per call.

    ``S = Q K^T`` costs ``2 Tq Tk d`` per head and ``O = P V`` costs ``2 Tq Tk d_v``:

        FLOPs = 2 B H Tq Tk (d + d_v)           (non-causal)

    With ``causal=True`` only the unmasked entries are useful work, ``Tq (Tq + 1) / 2``
    of the square when ``Tq == Tk``; this is what an ideal causal kernel performs (a naive
    implementation still computes the full square). For ``Tq != Tk`` the mask is aligned to
    the bottom right, as in flash-attn.
    """
    for name, v in (("batch", batch), ("seq_q", seq_q), ("heads", heads), ("head_dim", head_dim)):
        check_positive_int(name, v)
    tk = seq_q if seq_k is None else check_positive_int("seq_k", seq_k)
    dv = head_dim if head_dim_v is None else check_positive_int("head_dim_v", head_dim_v)
    if causal:
        # query i sees keys j <= i + tk - tq: sum over i of clamp(i + tk - tq + 1, 0, tk)
        # query i sees c_i = i + (tk - seq_q) + 1 keys, clamped at 0; c runs up to tk, so
        # the total is the sum of the integers max(first, 1) .. tk.
        first = max(tk - seq_q + 1, 1)
        pairs = (tk * (tk + 1) - (first - 1) * first) // 2
    else:
        pairs = seq_q * tk
    return 2 * batch * heads * pairs * (head_dim + dv)
