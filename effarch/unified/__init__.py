r"""The unified view (survey section 2.5): every token mixer is a memory with an update rule.

Linear attention, its gated and delta-rule descendants, state space models and test-time
training all keep a memory ``S`` per head, *write* each token into it and *read* it with the
query. In this package's convention (``S: [K, V]``, the transpose of the survey's
``d_v x d_k``)::

    S_t = update(S_{t-1}; k_t, v_t, gates_t)        o_t = read(S_t; scale q_t)

They differ only in ``update``. The survey sorts the rules into three classes:

* **linear**: ``S_t = a_t * S_{t-1} + b_t k_t v_t^T`` with a decay ``a_t`` that does not look
  at the memory (linear attention, RetNet, GLA, Mamba-2, HGRN2);
* **bilinear**: ``S_t = (a_t I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``: the transition
  depends on the key, so the memory is corrected rather than accumulated (DeltaNet, Gated
  DeltaNet, RWKV-7, TTT-Linear);
* **nonlinear**: the memory is a nonlinear model trained online (TTT-MLP, Titans' deep memory);

and softmax attention is the **unbounded** baseline, a memory that keeps every ``(k, v)``;
its sliding-window variant is **windowed**: a bounded cache of the last ``w`` pairs.

:func:`memory_scan` is one readable loop that runs any rule of :data:`RULES`, the registry. Each
:class:`UpdateRule` carries its update equation, class, the objective its update is a
gradient step on, its state size and costs, and the specialised implementation elsewhere in
the package that it must agree with (the tests check every row). :func:`registry_table`
renders the chapter's table from it.
"""

from .memory import memory_scan
from .rule import CLASSES, UpdateRule
from .rules import RULES
from .table import RETENTION_RULES, registry_table, retention_curve

__all__ = [
    "CLASSES",
    "RETENTION_RULES",
    "RULES",
    "UpdateRule",
    "memory_scan",
    "registry_table",
    "retention_curve",
]
