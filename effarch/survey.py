"""The survey's map as data: the seven families and what each one's token mixer remembers.

Sun et al. (2025), *Speed Always Wins* (arXiv:2508.09834), sort efficient architectures
into seven families. :data:`FAMILIES` lists them with the book chapter that covers each.
:func:`mixer_state_elements` gives the size of the memory a token mixer carries from one
generated token to the next: the KV cache for softmax attention (it grows with the
context), a fixed matrix for linear models (it does not). It is the survey's analytic
table, by name and at LLM sizes (``d_model = 4096`` by default), for the mixers of
:data:`STATE_TABLE_MIXERS`; it builds no layer. The layers themselves answer the same
question for their own configuration, ``layer.state_size(seq_len)`` (see
:func:`effarch.models.mixer_state_size`), and the tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_choice, check_positive_int


@dataclass(frozen=True)
class Family:
    """One family of the survey: its section, chapter folder and what it changes."""

    section: int
    name: str
    chapter: str
    changes: str
    idea: str


#: The seven families, in the survey's order, each with the book chapter that covers it.
FAMILIES: tuple[Family, ...] = (
    Family(
        2,
        "Linear sequence modeling",
        "02_linear_sequence_modeling",
        "token mixer",
        "a fixed-size state updated per token replaces the growing KV cache",
    ),
    Family(
        3,
        "Sparse sequence modeling",
        "03_sparse_sequence_modeling",
        "token mixer",
        "each query attends to a chosen subset of keys",
    ),
    Family(
        4,
        "Efficient full attention",
        "04_efficient_full_attention",
        "token mixer",
        "softmax attention kept and made cheaper: IO-aware kernels, fewer or compressed K/V "
        "heads, low precision (all over every key), or routing heads and key blocks (MoH, "
        "MoBA)",
    ),
    Family(
        5,
        "Sparse mixture-of-experts",
        "05_sparse_moe",
        "feed-forward network",
        "each token uses a few of many expert FFNs",
    ),
    Family(
        6,
        "Hybrid architectures",
        "06_hybrid_architectures",
        "both",
        "attention layers interleaved with linear ones (often a few among many), or both in one"
        " layer",
    ),
    Family(
        7,
        "Diffusion LLMs",
        "07_diffusion_llms",
        "decoding",
        "denoise many masked tokens per step instead of one token at a time",
    ),
    Family(
        8,
        "Other modalities",
        "08_other_modalities",
        "application",
        "the same mixers on images, audio and multimodal sequences",
    ),
)

#: The mixers :func:`mixer_state_elements` has a formula for (its ``mixer`` argument).
STATE_TABLE_MIXERS = (
    "mha",
    "gqa",
    "mla",
    "sliding_window",
    "linear_attention",
    "mamba",
    "hybrid",
)


def mixer_state_elements(
    mixer: str,
    context: int,
    *,
    d_model: int = 4096,
    n_heads: int = 32,
    n_kv_heads: int = 8,
    kv_lora_rank: int = 512,
    rope_head_dim: int = 64,
    window: int = 4096,
    d_state: int = 16,
    expand: int = 2,
    attention_every: int = 8,
) -> int:
    """Elements one layer keeps between decoding steps after ``context`` tokens (analytic).

    The survey's table, computed from the formulas below without building a layer; the
    layers' own ``state_size(seq_len)`` give the same numbers for the same configuration
    (``linear_attention`` without its normaliser, ``sliding_window`` and ``mha`` with
    ``G = H`` key/value heads). With ``dh = d_model / n_heads``:

    ========================  =========================================================
    ``mha``                   ``2 * context * d_model`` (keys and values of every head)
    ``gqa``                   ``2 * context * n_kv_heads * dh``
    ``mla``                   ``context * (kv_lora_rank + rope_head_dim)``
    ``sliding_window``        ``2 * min(context, window) * d_model``
    ``linear_attention``      ``n_heads * dh * dh`` (one ``dh x dh`` matrix per head)
    ``mamba``                 ``expand * d_model * d_state``
    ``hybrid``                one GQA layer per ``attention_every`` layers, Mamba in the
                              rest: the per-layer average
    ========================  =========================================================
    """
    check_choice("mixer", mixer, STATE_TABLE_MIXERS)
    check_positive_int("context", context, allow_zero=True)
    for name, v in (
        ("d_model", d_model),
        ("n_heads", n_heads),
        ("n_kv_heads", n_kv_heads),
        ("kv_lora_rank", kv_lora_rank),
        ("window", window),
        ("d_state", d_state),
        ("expand", expand),
        ("attention_every", attention_every),
    ):
        check_positive_int(name, v)
    check_positive_int("rope_head_dim", rope_head_dim, allow_zero=True)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    dh = d_model // n_heads
    if mixer in ("gqa", "hybrid") and (n_kv_heads > n_heads or n_heads % n_kv_heads):
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}) for mixer {mixer!r}"
        )
    if mixer == "mha":
        return 2 * context * d_model
    if mixer == "gqa":
        return 2 * context * n_kv_heads * dh
    if mixer == "mla":
        return context * (kv_lora_rank + rope_head_dim)
    if mixer == "sliding_window":
        return 2 * min(context, window) * d_model
    if mixer == "linear_attention":
        return n_heads * dh * dh
    if mixer == "mamba":
        return expand * d_model * d_state
    attn = 2 * context * n_kv_heads * dh
    ssm = expand * d_model * d_state
    return (attn + (attention_every - 1) * ssm) // attention_every
