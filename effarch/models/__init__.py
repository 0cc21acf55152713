"""Reference models: the transformer baseline and its analytic cost model."""

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
    "TransformerBlock",
    "TransformerConfig",
    "attention_crossover",
    "attention_share",
    "block_flops",
    "block_memory",
]
