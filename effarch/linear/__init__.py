"""Linear sequence models (survey section 2): linear attention, its decays, gates and
delta rules, and linear RNNs, each with its recurrent, parallel and chunkwise forms.

Every op takes ``[batch, seq, heads, dim]`` tensors and returns ``(o, final_state)``
with a state ``[batch, heads, K, V]``, following flash-linear-attention's conventions.
"""

from .chunk_kernel import chunk_scalar_decay, fused_recurrent
from .costs import linear_attention_costs
from .delta_kernel import chunk_delta_rule
from .feature_maps import (
    HedgehogFeatureMap,
    PerformerFeatureMap,
    elu_plus_one,
    relu,
    taylor_feature_map,
)
from .hgrn import hgrn
from .layers import (
    GLA,
    HGRN,
    RWKV7,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    RetNet,
    ShortConvolution,
    TTTLinear,
)
from .linearize import (
    LinearizationTask,
    LinearizedAttention,
    LoRALinear,
    TransferResult,
    add_lora,
    attention_transfer,
    linearization_error,
    linearization_sweep,
    linearization_task,
    low_rank_finetune,
    softmax_attention_weights,
)
from .ops import (
    delta_rule,
    dplr_delta_rule,
    gated_delta_rule,
    gla,
    linear_attention,
    retention,
    retention_log_decays,
    simple_gla,
)
from .ttt import titans, ttt_linear, ttt_linear_resume, ttt_mlp

__all__ = [
    "GLA",
    "HGRN",
    "RWKV7",
    "DeltaNet",
    "GatedDeltaNet",
    "LinearAttention",
    "RetNet",
    "ShortConvolution",
    "TTTLinear",
    "HedgehogFeatureMap",
    "PerformerFeatureMap",
    "chunk_delta_rule",
    "chunk_scalar_decay",
    "delta_rule",
    "dplr_delta_rule",
    "elu_plus_one",
    "fused_recurrent",
    "gated_delta_rule",
    "gla",
    "hgrn",
    "linear_attention_costs",
    "linear_attention",
    "relu",
    "retention",
    "retention_log_decays",
    "simple_gla",
    "taylor_feature_map",
    "titans",
    "LinearizationTask",
    "LinearizedAttention",
    "LoRALinear",
    "TransferResult",
    "add_lora",
    "attention_transfer",
    "linearization_error",
    "linearization_sweep",
    "linearization_task",
    "low_rank_finetune",
    "softmax_attention_weights",
    "ttt_linear",
    "ttt_linear_resume",
    "ttt_mlp",
]
