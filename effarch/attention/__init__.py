"""Softmax attention and its efficient exact forms (survey section 4)."""

from .flash import flash_attention
from .grouped import KVCache, MultiHeadAttention, WindowKVCache, mha_to_gqa, project_qkv
from .io import attention_hbm_bytes
from .kv_cache import kv_cache_bytes
from .mixture import (
    MixtureOfHeadsAttention,
    MoHRouting,
    moba_attention,
    moba_mask,
    moba_select_blocks,
    moh_active_fraction,
)
from .mla import MultiHeadLatentAttention
from .naive import attention_mask, naive_attention, sdpa_attention
from .quantized import (
    attention_error,
    dequantize_per_block,
    int8_kernel_reason,
    quantize_per_block,
    quantized_attention,
    smooth_k,
)
from .rope import apply_rope
from .selected import selected_blocks_attention
from .tiled import online_softmax_steps, online_softmax_update, tiled_attention

__all__ = [
    "KVCache",
    "MixtureOfHeadsAttention",
    "MoHRouting",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "WindowKVCache",
    "apply_rope",
    "attention_error",
    "attention_hbm_bytes",
    "attention_mask",
    "dequantize_per_block",
    "flash_attention",
    "int8_kernel_reason",
    "kv_cache_bytes",
    "mha_to_gqa",
    "moba_attention",
    "moba_mask",
    "moba_select_blocks",
    "moh_active_fraction",
    "naive_attention",
    "online_softmax_steps",
    "online_softmax_update",
    "project_qkv",
    "quantize_per_block",
    "quantized_attention",
    "sdpa_attention",
    "selected_blocks_attention",
    "smooth_k",
    "tiled_attention",
]
