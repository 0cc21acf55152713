"""Softmax attention and its efficient exact forms (survey section 4)."""

from .kv_cache import kv_cache_bytes
from .naive import attention_mask, naive_attention, sdpa_attention

__all__ = ["attention_mask", "kv_cache_bytes", "naive_attention", "sdpa_attention"]
