"""What the kernels support, importable without Triton: the one source of their limits.

``effarch`` reads these at import time to say, before any kernel module (and so Triton) is
imported, why a kernel cannot take a call; the launchers in this package read them to refuse
the same calls. Each ``*_reason`` function returns ``None`` when a size is supported and
otherwise the sentence that explains why not, used both as a ``ValueError`` message and as
the reason in ``backend='triton' cannot run: <reason>``.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import os

#: The chunkwise linear-attention kernels hold all of a key (``K``) in one block.
MAX_KEY_DIM = 256
#: The attention kernels pad the head dimension to a power of two, up to this.
MAX_HEAD_DIM = 256
#: The selective-scan kernel keeps a ``[channels, N]`` state in registers.
MAX_STATE_DIM = 256
#: The chunkwise kernels need a power-of-two chunk of at least this many steps (``tl.dot``
#: needs blocks of 16 or more).
MIN_CHUNK_SIZE = 16


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in Triton's CPU interpreter.

    Triton reads the variable when it is first imported, so it must be set before that
    (``effarch.notebook.setup`` does so on a machine without a GPU).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def chunk_size_supported(chunk_size: int) -> bool:
    """True for a power of two ``>= MIN_CHUNK_SIZE``."""
    return chunk_size >= MIN_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0


def chunk_size_reason(chunk_size: int) -> str | None:
    """Why the chunkwise kernels cannot use ``chunk_size``, or None when they can."""
    if chunk_size_supported(chunk_size):
        return None
    return f"chunk_size must be a power of two >= {MIN_CHUNK_SIZE}, got {chunk_size}"


def key_dim_reason(dim_k: int) -> str | None:
    """Why the chunkwise kernels cannot take keys of ``dim_k`` entries, or None."""
    if dim_k <= MAX_KEY_DIM:
        return None
    return f"the kernel supports K up to {MAX_KEY_DIM}, got K = {dim_k}"


def head_dim_reason(head_dim: int) -> str | None:
    """Why the attention kernels cannot take heads of ``head_dim``, or None."""
    if head_dim <= MAX_HEAD_DIM:
        return None
    return f"the kernel supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}"


def tile_size_reason(block_q: int, block_k: int) -> str | None:
    """Why the block-sparse attention kernel cannot use tiles ``block_q x block_k``, or None
    (``tl.dot`` needs powers of two of at least 16)."""
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if not chunk_size_supported(n):
            return f"{name} must be a power of two >= {MIN_CHUNK_SIZE} for the kernel, got {n}"
    return None


def state_dim_reason(n_state: int) -> str | None:
    """Why the selective-scan kernel cannot take a state of ``n_state`` entries, or None."""
    if 1 <= n_state <= MAX_STATE_DIM:
        return None
    return f"the kernel supports a state size N from 1 to {MAX_STATE_DIM}, got {n_state}"


def check(reason: str | None) -> None:
    """Raise ``ValueError(reason)`` unless ``reason`` is None (for the launchers)."""
    if reason is not None:
        raise ValueError(reason)
