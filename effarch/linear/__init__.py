"""Linear sequence models (survey section 2): linear attention, its decays, gates and
delta rules, and linear RNNs, each with its recurrent, parallel and chunkwise forms.

The ops follow flash-linear-attention's conventions: the attention-like ops (those of
:mod:`.ops` and :mod:`.ttt`) take ``[batch, seq, heads, dim]`` tensors and return
``(o, final_state)``, with a matrix state ``[batch, heads, K, V]`` for the ops of :mod:`.ops`
and :func:`ttt_linear` (the pair ``(S, z)`` for ``linear_attention(normalize=True)``), and a
pair of tensors for :func:`ttt_mlp` (``(W1, W2)``) and :func:`titans` (``(M, U)``).
:func:`hgrn` works per channel: ``x, g: [batch, seq, D]``, state ``[batch, D]``.

Where each method lives (reference forms, fast path, layer), one hop from here:

===========================  ========================  =======================  =================
method                       reference (PyTorch)       fast path (Triton)       layer
===========================  ========================  =======================  =================
linear attention, RetNet,    :mod:`.gated`             :mod:`.chunk_kernel`     :mod:`.layers`
simple GLA, GLA
delta rule, gated delta      :mod:`.delta`             :mod:`.delta_kernel`     :mod:`.layers`
decoding, the rows above     ``mode="recurrent"``      :func:`fused_recurrent`  ``layer(x, s)``
RWKV-7's generalised delta   :mod:`.dplr`              --                       :mod:`.layers`
HGRN                         :mod:`.hgrn`              --                       :mod:`.layers`
TTT-Linear, TTT-MLP, Titans  :mod:`.ttt`               --                       :mod:`.ttt_layer`
feature maps (Performer,     :mod:`.feature_maps`      --                       --
Hedgehog, Taylor)
linearised softmax layer     :mod:`.linearize`         --                       same
===========================  ========================  =======================  =================

:func:`fused_recurrent` runs the recurrent form of the rows above it only (linear attention
without ``normalize``, RetNet, simple GLA, GLA and the two delta rules); RWKV-7
(``dplr_delta_rule(mode="recurrent")``), HGRN and the TTT family decode in PyTorch only,
through ``layer(x, s)``.

The wrappers in ``chunk_kernel`` and ``delta_kernel`` launch ``effarch_kernels``'s
``chunk_scalar_decay``, ``chunk_delta_rule`` and ``fused_recurrent`` through the one backend
rule of :mod:`effarch._kernels`. :mod:`.ops` gathers every op under one name, :mod:`.common`
holds what the ops share (layout moves, dtypes, the chunk layout) and :mod:`.costs` the cost
model of the three forms. Building blocks shared with other families (short convolution,
gated RMSNorm, LoRA) live in :mod:`effarch.nn`; the view of every family's update rule as one
memory, in :mod:`effarch.unified`.
"""

from ..nn import LoRALinear, add_lora  # LoRA lives in effarch.nn; re-exported here
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
from .linearize import LinearizedAttention, linearization_error, softmax_attention_weights
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
    "LinearizedAttention",
    "LoRALinear",
    "add_lora",
    "linearization_error",
    "softmax_attention_weights",
    "ttt_linear",
    "ttt_linear_resume",
    "ttt_mlp",
]
