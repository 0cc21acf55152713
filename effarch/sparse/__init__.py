"""Sparse sequence modeling (chapter 3): attention that skips most query-key pairs.

============================  ============================================================
patterns (3.1)                :mod:`effarch.sparse.masks`: ``mask_mod`` functions in
                              FlexAttention's convention, combined with :func:`and_masks`
                              and :func:`or_masks`, materialised by :func:`dense_mask`
reference                     :func:`masked_attention`: every score, then the mask
tiles                         :func:`block_layout`: empty, partial and full tiles
                              (FlexAttention's ``BlockMask``)
dynamic (3.2)                 :class:`NativeSparseAttention` (:func:`nsa_attention`):
                              compressed, selected and window branches, gated;
                              :func:`lsh_attention` (Reformer), :func:`routing_attention`
KV policies (3.3)             :mod:`effarch.sparse.kv_policies`: StreamingLLM, H2O, TOVA,
                              Quest, SnapKV on a decoding loop (:func:`decode`)
sparse prefill (3.3)          :mod:`effarch.sparse.prefill`: MInference's vertical-slash,
                              XAttention's antidiagonal scoring (:func:`prefill_nll`)
fast path (3.4)               :func:`block_sparse_attention`: only the non-empty tiles,
                              in PyTorch or in the Triton kernel ``effarch_kernels.
                              block_sparse_attention`` (forward and backward)
============================  ============================================================

Layout ``[batch, seq, heads, head_dim]``; grouped-query heads as in chapter 4.
"""

from .block import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockLayout,
    block_layout,
    block_sparse_attention,
    kernel_tables,
    masked_attention,
)
from .kv_policies import (
    H2O,
    TOVA,
    DecodeResult,
    FullCache,
    KVPolicy,
    Quest,
    SlidingWindow,
    StreamingLLM,
    decode,
    decode_nll,
    llama_view,
    snapkv_select,
)
from .masks import (
    MaskMod,
    and_masks,
    axial,
    bigbird,
    block_local,
    causal,
    dense_mask,
    dilated,
    fixed,
    global_tokens,
    mask_band,
    or_masks,
    random_blocks,
    receptive_field,
    sliding_window,
    strided,
)
from .nsa import (
    NativeSparseAttention,
    NSACache,
    nsa_attention,
    nsa_compress,
    nsa_decode,
    nsa_reference,
    nsa_select,
)
from .prefill import (
    PrefillPattern,
    Static,
    VerticalSlash,
    XAttention,
    antidiagonal_scores,
    prefill_nll,
    sparse_prefill,
    vertical_slash_tables,
    xattention_tiles,
)
from .routing import (
    expert_choice_attention,
    future_leaks,
    kmeans_update,
    lsh_attention,
    lsh_buckets,
    lsh_reference,
    routing_attention,
    routing_reference,
)

__all__ = [
    "expert_choice_attention",
    "future_leaks",
    "PrefillPattern",
    "Static",
    "VerticalSlash",
    "XAttention",
    "antidiagonal_scores",
    "prefill_nll",
    "sparse_prefill",
    "vertical_slash_tables",
    "xattention_tiles",
    "kmeans_update",
    "lsh_attention",
    "lsh_buckets",
    "lsh_reference",
    "routing_attention",
    "routing_reference",
    "NativeSparseAttention",
    "NSACache",
    "nsa_attention",
    "nsa_compress",
    "nsa_decode",
    "nsa_reference",
    "nsa_select",
    "H2O",
    "TOVA",
    "FullCache",
    "KVPolicy",
    "Quest",
    "SlidingWindow",
    "StreamingLLM",
    "DecodeResult",
    "decode",
    "decode_nll",
    "llama_view",
    "snapkv_select",
    "EMPTY",
    "FULL",
    "PARTIAL",
    "BlockLayout",
    "MaskMod",
    "and_masks",
    "axial",
    "bigbird",
    "block_layout",
    "block_local",
    "block_sparse_attention",
    "causal",
    "dense_mask",
    "dilated",
    "fixed",
    "global_tokens",
    "kernel_tables",
    "mask_band",
    "masked_attention",
    "or_masks",
    "random_blocks",
    "receptive_field",
    "sliding_window",
    "strided",
]
