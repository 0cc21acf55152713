"""Sparse mixture-of-experts (chapter 5): routers, balance, the MoE layer.

============================  ==============================================================
routing (5.1)                 :func:`route` (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3, Switch
                              by its arguments), :func:`apply_capacity`, :func:`expert_choice`,
                              :func:`hash_route`, :func:`balanced_assignment` (BASE),
                              :func:`null_expert_route` (adaptive top-k)
balance (5.1)                 :func:`load_balancing_loss`, :func:`router_z_loss`,
                              :func:`sequence_balance_loss`, :func:`update_bias` (loss-free),
                              :func:`max_violation`, :func:`coefficient_of_variation`
layer (5.2)                   :class:`MoELayer`: SwiGLU experts, shared experts, capacity;
                              execution by a loop over experts, grouped products, or the
                              Triton grouped-GEMM kernel (``effarch_kernels.grouped_gemm``)
variants (5.2)                :class:`SoftMoE`, :class:`MixtureOfDepths` (with its causal
                              predictor), :class:`MoEPlusPlus` (zero, copy, constant experts)
modality (8.3)                :class:`ModalityMoE` (one expert pool for all tokens, or one per
                              modality), :func:`modality_load` (which experts each modality uses)
conversion (5.3)              :func:`upcycle` (experts copied from a dense FFN), :func:`split_ffn`
                              and :func:`neuron_groups` (MoEfication), :func:`moefied_ffn`
============================  ==============================================================

Tokens are rows ``[N, d]`` (a layer flattens ``[batch, seq, d]``); dropped or null slots
carry the expert index ``E``, as in ``transformers``.
"""

from .balance import (
    coefficient_of_variation,
    dropped_fraction,
    expert_load,
    load_balancing_loss,
    max_violation,
    router_z_loss,
    sequence_balance_loss,
    update_bias,
)
from .convert import moefied_ffn, neuron_groups, split_ffn, upcycle
from .layer import (
    Experts,
    MoELayer,
    Router,
    Routing,
    add_shared,
    experts_grouped,
    experts_loop,
    grouped_matmul,
    route_tokens,
    row_tiles,
)
from .modality import ModalityMoE, modality_load
from .routing import (
    apply_capacity,
    balanced_assignment,
    expert_capacity,
    expert_choice,
    hash_route,
    null_expert_route,
    route,
    router_scores,
)
from .variants import MixtureOfDepths, MoEPlusPlus, SoftMoE

__all__ = [
    "ModalityMoE",
    "modality_load",
    "add_shared",
    "route_tokens",
    "Experts",
    "MixtureOfDepths",
    "MoEPlusPlus",
    "SoftMoE",
    "MoELayer",
    "Router",
    "Routing",
    "apply_capacity",
    "balanced_assignment",
    "coefficient_of_variation",
    "dropped_fraction",
    "expert_capacity",
    "expert_choice",
    "expert_load",
    "experts_grouped",
    "experts_loop",
    "grouped_matmul",
    "row_tiles",
    "hash_route",
    "load_balancing_loss",
    "max_violation",
    "null_expert_route",
    "route",
    "router_scores",
    "router_z_loss",
    "sequence_balance_loss",
    "update_bias",
    "moefied_ffn",
    "neuron_groups",
    "split_ffn",
    "upcycle",
]
