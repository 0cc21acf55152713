"""Reference models: the transformer baseline and its analytic cost model, and the tiny
language model with a pluggable token mixer (:mod:`effarch.models.tinylm`) and its mixer
registry (:mod:`effarch.models.mixers`), hybrids of several mixers by a layer pattern
(:mod:`effarch.models.hybrid`), both stacking one pre-norm layer
(:class:`~effarch.models.block.PreNormBlock`), one measuring function for them all
(:mod:`effarch.models.profile`), and the small trained byte-level language model
(:mod:`effarch.models.bytelm`) that chapters 3, 6 and 7 stand on.

``train``, ``evaluate`` and ``TrainResult`` are re-exported from :mod:`effarch.train`, their
home, for the code that imported them from here; the recall experiment lives in
:mod:`effarch.experiments.recall`.
"""

from ..train import TrainResult, evaluate, train
from .block import PreNormBlock, RecurrentState
from .bytelm import ByteLM, ByteLMConfig, load_bytelm
from .hybrid import (
    HYBRIDS,
    YOCOLM,
    HybridCache,
    HybridLM,
    cache_bytes,
    decode_memory,
    decode_step_time,
)
from .mixers import (
    MIXERS,
    LinearizedMixer,
    ParallelHybrid,
    SlidingWindowAttention,
    carries_state,
    mixer_state_size,
    mixes_neighbours,
)
from .profile import body_parameters, profile_models
from .tinylm import TinyLM, TokenMixer, upcycle_tinylm
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
    "ByteLM",
    "ByteLMConfig",
    "HYBRIDS",
    "HybridCache",
    "HybridLM",
    "RecurrentState",
    "cache_bytes",
    "carries_state",
    "mixes_neighbours",
    "decode_memory",
    "decode_step_time",
    "load_bytelm",
    "LinearizedMixer",
    "PreNormBlock",
    "LLAMA2_7B",
    "MISTRAL_7B",
    "MIXERS",
    "ParallelHybrid",
    "SlidingWindowAttention",
    "TinyLM",
    "upcycle_tinylm",
    "TokenMixer",
    "YOCOLM",
    "TrainResult",
    "TransformerBlock",
    "TransformerConfig",
    "attention_crossover",
    "attention_share",
    "body_parameters",
    "block_flops",
    "block_memory",
    "evaluate",
    "mixer_state_size",
    "profile_models",
    "train",
]
