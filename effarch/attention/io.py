"""How many bytes attention moves between main memory (HBM) and the chip.

A GPU computes on data in on-chip SRAM (registers and shared memory, tens of MB in all)
and keeps tensors in HBM (tens of GB, an order of magnitude slower). For attention over
``N`` tokens with head dimension ``d``, counted per (batch, head) in elements:

* **standard** (separate kernels, as written in PyTorch): ``S = QK^T`` reads ``Q, K`` and
  writes ``S``; the softmax reads ``S`` and writes ``P``; ``O = PV`` reads ``P, V`` and
  writes ``O``:  ``4 N d + 4 N^2`` (``+ 2 N^2`` when a mask is applied in its own pass).
* **tiled** (one fused kernel, FlashAttention-2's loop order): each block of ``block_q``
  query rows is read once and its output written once, while all of ``K`` and ``V``
  stream past it: ``2 N d + 2 N^2 d / block_q``. The tile size is bounded by SRAM.

The ``N^2`` term survives in both, but the fused kernel divides it by ``2 block_q / d``
(``4 N^2`` against ``2 N^2 d / block_q``) and never writes it: the score matrix stays on
chip.
"""

from __future__ import annotations

from .._checks import check_choice, check_positive_int, check_positive_number


def attention_hbm_bytes(
    seq_len: int,
    head_dim: int,
    *,
    method: str = "standard",
    batch: int = 1,
    heads: int = 1,
    block_q: int = 128,
    bytes_per_element: float = 2,
    masked: bool = False,
) -> float:
    """HBM traffic of one attention forward pass, in bytes (see the module docstring)."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("head_dim", head_dim)
    check_positive_int("batch", batch)
    check_positive_int("heads", heads)
    check_positive_int("block_q", block_q)
    check_choice("method", method, ("standard", "tiled"))
    check_positive_number("bytes_per_element", bytes_per_element)
    n, d = seq_len, head_dim
    if method == "standard":
        elements = 4 * n * d + 4 * n * n + (2 * n * n if masked else 0)
    else:
        elements = 2 * n * d + 2 * n * n * d / block_q
    return batch * heads * elements * bytes_per_element
