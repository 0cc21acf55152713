"""Scaling out on ``torch.distributed`` (written for gloo on a CPU and NCCL on GPUs alike;
tested on gloo).

- :class:`ExpertParallelMoE`: an :class:`~effarch.moe.MoELayer`'s experts sharded over the
  ranks, tokens dispatched and combined by differentiable all-to-all exchanges (chapter 5).
- :func:`ring_attention` and :func:`lasp`: one sequence sharded over the ranks (context
  parallelism, chapter 9.2): key/value blocks passed around a ring with a zig-zag layout for
  softmax attention; states all-gathered and folded for the linear ops.

Workers that :func:`spawn` starts live here (:func:`check_expert_parallel`,
:func:`time_expert_parallel`, :func:`check_context_parallel`), since spawned processes
import them by name and cannot import a notebook's functions.
"""

from .context_parallel import (
    check_context_parallel,
    context_parallel_errors,
    lasp,
    lasp_bytes,
    ring_attention,
    ring_attention_bytes,
    ring_chunk_products,
    shard_chunks,
    shard_sequence,
    unshard_sequence,
)
from .expert_parallel import (
    ExpertParallelMoE,
    check_expert_parallel,
    dispatch_bytes,
    time_expert_parallel,
)
from .launch import process_group, spawn

__all__ = [
    "ExpertParallelMoE",
    "check_context_parallel",
    "check_expert_parallel",
    "context_parallel_errors",
    "dispatch_bytes",
    "lasp",
    "lasp_bytes",
    "process_group",
    "ring_attention",
    "ring_attention_bytes",
    "ring_chunk_products",
    "shard_chunks",
    "shard_sequence",
    "spawn",
    "time_expert_parallel",
    "unshard_sequence",
]
