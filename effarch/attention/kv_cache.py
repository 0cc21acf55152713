"""How many bytes a key/value cache holds."""

from __future__ import annotations

from .._checks import check_positive_int


def kv_cache_bytes(
    *,
    n_layers: int,
    seq_len: int,
    batch: int = 1,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_lora_rank: int | None = None,
    rope_head_dim: int = 0,
    bytes_per_element: float = 2,
) -> int:
    """Bytes of the KV cache for ``batch`` sequences of ``seq_len`` tokens.

    * MHA / GQA / MQA (give ``n_kv_heads`` and ``head_dim``): every layer stores a key
      and a value per K/V head, ``2 * n_kv_heads * head_dim`` elements per token. MHA has
      ``n_kv_heads == n_heads``, MQA ``n_kv_heads == 1``.
    * MLA (give ``kv_lora_rank``, optionally ``rope_head_dim``, which only MLA takes): every
      layer stores the compressed latent ``c_kv`` and the shared RoPE key,
      ``kv_lora_rank + rope_head_dim`` elements per token (DeepSeek-V2/V3).

        bytes = n_layers * batch * seq_len * elements_per_token * bytes_per_element
    """
    check_positive_int("n_layers", n_layers)
    check_positive_int("seq_len", seq_len, allow_zero=True)
    check_positive_int("batch", batch)
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be positive, got {bytes_per_element}")
    if kv_lora_rank is not None:
        if n_kv_heads is not None or head_dim is not None:
            raise ValueError("give either kv_lora_rank (MLA) or n_kv_heads and head_dim, not both")
        check_positive_int("kv_lora_rank", kv_lora_rank)
        check_positive_int("rope_head_dim", rope_head_dim, allow_zero=True)
        per_token = kv_lora_rank + rope_head_dim
    else:
        if n_kv_heads is None or head_dim is None:
            raise ValueError("n_kv_heads and head_dim are required (or kv_lora_rank for MLA)")
        if rope_head_dim != 0:
            raise ValueError(
                f"rope_head_dim is for MLA (with kv_lora_rank); MHA/GQA/MQA (n_kv_heads and "
                f"head_dim) count RoPE inside head_dim: expected 0, got {rope_head_dim!r}"
            )
        check_positive_int("n_kv_heads", n_kv_heads)
        check_positive_int("head_dim", head_dim)
        per_token = 2 * n_kv_heads * head_dim
    return int(n_layers * batch * seq_len * per_token * bytes_per_element)
