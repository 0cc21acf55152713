"""Reference models: the transformer baseline and its analytic cost model, and the tiny
language model with a pluggable token mixer that the recall experiment trains."""

from .tinylm import (
    MIXERS,
    RECALL_CPU,
    RECALL_GPU,
    RecallConfig,
    SlidingWindowAttention,
    TinyLM,
    TokenMixer,
    TrainResult,
    evaluate,
    mixer_state_size,
    recall_experiment,
    train,
)
from .transformer import (
    LLAMA2_7B,
    MISTRAL_7B,
    TransformerBlock,
    TransformerConfig,
    attention_crossover,
    attention_share,
    block_flops,
    block_memory,
)

__all__ = [
    "LLAMA2_7B",
    "MISTRAL_7B",
    "MIXERS",
    "RECALL_CPU",
    "RECALL_GPU",
    "RecallConfig",
    "SlidingWindowAttention",
    "TinyLM",
    "TokenMixer",
    "TrainResult",
    "TransformerBlock",
    "TransformerConfig",
    "attention_crossover",
    "attention_share",
    "block_flops",
    "block_memory",
    "evaluate",
    "mixer_state_size",
    "recall_experiment",
    "train",
]
