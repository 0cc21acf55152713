"""What each form of (scalar-decay) linear attention costs: FLOPs, sequential steps and
the working set of one step, per batch element and head.

With ``T`` tokens, key and value widths ``K`` and ``V``, chunk size ``C`` and 2 FLOPs per
multiply-add:

=========  ========================================  ================  =======================
form       FLOPs                                     sequential steps  working set of one step
=========  ========================================  ================  =======================
recurrent  ``4 T K V`` (write and read the state)    ``T``             ``K V`` (the state)
parallel   ``2 T^2 (K + V)`` (masked QK^T, then PV)  ``1``             ``T^2`` (the scores)
chunk      ``2 T C (K + V) + 4 T K V``               ``T / C``         ``C^2 + K V``
=========  ========================================  ================  =======================

The chunkwise form interpolates: ``C = 1`` is the recurrence (plus a negligible intra term),
``C = T`` the parallel form (plus one state product). Its FLOPs are all matrix products
with one side of length ``C`` (``C x K x C`` for ``QK^T``, ``C x C x V`` for the scores
times ``V``, ``C x K x V`` for the state reads and writes), which is what makes it fast in
practice. The working set is what one step holds; a two-pass chunk kernel also writes the
state entering every chunk to memory, ``(T / C) K V`` elements, which is not counted here.
"""

from __future__ import annotations

from .._checks import check_choice, check_positive_int

FORMS = ("recurrent", "parallel", "chunk")


def linear_attention_costs(
    seq_len: int, dim_k: int, dim_v: int, *, form: str = "chunk", chunk_size: int = 64
) -> dict[str, int]:
    """``{"flops", "sequential_steps", "intermediate"}`` of one form (see the module
    docstring). ``intermediate`` is the working set of one step, in elements (the state,
    the score matrix, or one chunk's scores and the state); it leaves out the per-chunk
    states that a two-pass chunk kernel stores, ``(T / C) K V``. The chunk form also
    reports its two parts, ``intra_flops = 2 T C (K + V)`` and ``state_flops = 4 T K V``."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("dim_k", dim_k)
    check_positive_int("dim_v", dim_v)
    check_positive_int("chunk_size", chunk_size)
    check_choice("form", form, FORMS)
    t, k, v = seq_len, dim_k, dim_v
    if form == "recurrent":
        return {"flops": 4 * t * k * v, "sequential_steps": t, "intermediate": k * v}
    if form == "parallel":
        return {"flops": 2 * t * t * (k + v), "sequential_steps": 1, "intermediate": t * t}
    c = min(chunk_size, t)
    n_chunks = -(-t // c)
    intra, state = 2 * t * c * (k + v), 4 * t * k * v
    return {
        "flops": intra + state,
        "sequential_steps": n_chunks,
        "intermediate": c * c + k * v,
        "intra_flops": intra,
        "state_flops": state,
    }
