"""Scaling out on ``torch.distributed`` (gloo on a CPU, NCCL on GPUs, the same code).

- :class:`ExpertParallelMoE`: an :class:`~effarch.moe.MoELayer`'s experts sharded over the
  ranks, tokens dispatched and combined by differentiable all-to-all exchanges (chapter 5).

Workers that :func:`spawn` starts live here (:func:`check_expert_parallel`,
:func:`time_expert_parallel`), since spawned processes import them by name and cannot import
a notebook's functions.
"""

from .expert_parallel import (
    ExpertParallelMoE,
    check_expert_parallel,
    dispatch_bytes,
    spawn,
    time_expert_parallel,
)

__all__ = [
    "ExpertParallelMoE",
    "check_expert_parallel",
    "dispatch_bytes",
    "spawn",
    "time_expert_parallel",
]
