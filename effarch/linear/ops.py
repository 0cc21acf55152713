r"""Linear attention and its gated and delta-rule variants, as recurrences over a matrix state.

Every op here keeps, per batch element and head, a state ``S`` of shape ``[K, V]`` and writes
``o_t = S_t^T (scale * q_t)``. They differ only in how ``S`` is updated:

* ``linear_attention``: ``S_t = S_{t-1} + k_t v_t^T`` (``k v^T`` is the outer product).
* ``retention``: ``S_t = gamma_h S_{t-1} + k_t v_t^T`` with RetNet's ``gamma_h = 1 - 2^(-5-h)``.
* ``simple_gla``: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, one data-dependent gate per head.
* ``gla``: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, a gate for each key row of ``S``.
* ``delta_rule``: ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``.
* ``gated_delta_rule``: the delta rule applied to the decayed ``exp(g_t) S_{t-1}``.
* ``dplr_delta_rule``: ``S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``.

Each docstring names the flash-linear-attention op it matches
(``fla.ops.linear_attn``, ``retention``, ``simple_gla``, ``gla``, ``delta_rule``,
``gated_delta_rule`` and ``generalized_delta_rule``). The ops live in one module per family,
and this module gathers them under one name:

* :mod:`effarch.linear.gated`: ``linear_attention``, ``retention``, ``simple_gla``, ``gla``;
* :mod:`effarch.linear.delta`: ``delta_rule``, ``gated_delta_rule``;
* :mod:`effarch.linear.dplr`: ``dplr_delta_rule``;

with what they share (layout moves, dtypes, the chunk layout) in
:mod:`effarch.linear.common` and their Triton kernels behind
:mod:`effarch.linear.chunk_kernel` and :mod:`effarch.linear.delta_kernel`.

The layout follows flash-linear-attention (fla): ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``,
states ``[B, H, K, V]``, gates in log space (``g <= 0``, decay ``exp(g)`` in ``(0, 1]``), and
``scale`` defaulting to ``K ** -0.5``. Each op returns ``(o, final_state)`` with
``final_state`` ``None`` unless ``output_final_state=True``. The ops never normalise ``q`` or
``k``; feature maps (:mod:`effarch.linear.feature_maps`) and key normalisation belong to the
layers that call them.

Three ways to compute the same thing (``mode``):

``"recurrent"``
    One step at a time, the definition above: ``O(T K V)`` work, ``T`` sequential steps. It is
    the reference the other modes are tested against.
``"parallel"``
    The quadratic form ``O = (Q K^T * D) V`` with ``D_ij`` the product of the decays between
    ``j`` and ``i`` (``j <= i``, zero above the diagonal), as in attention: ``O(T^2 K)`` work, no
    sequential steps. Only for the ops without a delta rule, whose state is a plain sum.
``"chunk"``
    Chunkwise parallel: split the sequence into chunks of ``C`` steps; inside a chunk use the
    parallel form, across chunks carry the state with the recurrence. ``O(T C K + T K V)`` work
    and ``T / C`` sequential steps, all of them matrix products. This is the form fla's
    ``chunk_*`` kernels compute.

Backends: the ops with a Triton kernel (``linear_attention``, ``retention``, ``simple_gla``
and the two delta rules, in ``"chunk"`` mode) take ``backend``: ``"torch"`` never runs the
kernel, ``"triton"`` runs it or raises ``ValueError("backend='triton' cannot run: ...")``
saying why, ``"auto"`` runs it on CUDA tensors when it can and PyTorch otherwise (the one
rule of :mod:`effarch._kernels`).

Precision: half-precision inputs are accumulated in float32 and ``o`` is returned in the input
dtype; the final state is returned in the accumulation dtype (float32 for half inputs, as fla
does, so that states passed between calls lose nothing). float64 stays float64 throughout.

Numerical safety of the gated chunk forms: decays enter only as ``exp`` of a sum of log gates
over a stretch ``s < r <= t`` *inside* a chunk, which is ``<= 0``; a pairwise factor
``exp(G_i - G_j)`` is only ever evaluated for ``j <= i`` (the rest is masked to ``-inf``
*before* ``exp``), except inside a sub-chunk whose decays span at most ``SAFE_LOG_RANGE``
(30), where one product covers the whole sub-chunk with exponents bounded by that range and
is masked after it. Products of decays therefore underflow to zero, as they should, and
never overflow, however strong the decay or long the sequence.
"""

from __future__ import annotations

from .._kernels import BACKENDS
from .delta import delta_rule, gated_delta_rule
from .dplr import dplr_delta_rule
from .gated import State, gla, linear_attention, retention, retention_log_decays, simple_gla

__all__ = [
    "BACKENDS",
    "State",
    "delta_rule",
    "dplr_delta_rule",
    "gated_delta_rule",
    "gla",
    "linear_attention",
    "retention",
    "retention_log_decays",
    "simple_gla",
]
