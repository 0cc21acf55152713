"""Softmax attention and its efficient exact forms (survey section 4)."""

from .flash import flash_attention
from .io import attention_hbm_bytes
from .kv_cache import kv_cache_bytes
from .naive import attention_mask, naive_attention, sdpa_attention
from .tiled import online_softmax_steps, tiled_attention

__all__ = [
    "attention_hbm_bytes",
    "attention_mask",
    "flash_attention",
    "kv_cache_bytes",
    "naive_attention",
    "online_softmax_steps",
    "sdpa_attention",
    "tiled_attention",
]
