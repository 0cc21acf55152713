r"""Attention patterns as functions, FlexAttention's convention (chapter 3.1).

A pattern is a ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: ``True`` where query
``q_idx`` may attend to key ``kv_idx`` in batch ``b`` and head ``h``. The four arguments are
integer tensors that broadcast against each other, so one function describes the mask at any
length, and it passes unchanged to PyTorch's ``torch.nn.attention.flex_attention``
(``create_block_mask``). With ``Tq != Tk``, ``q_idx`` counts from the first query and
``kv_idx`` from the first key (FlexAttention's convention, so :func:`causal` is aligned top
left; pass ``offset = Tk - Tq`` to align it bottom right as flash-attn and a KV cache do).
The patterns that take no ``offset`` (:func:`fixed`, :func:`block_local`,
:func:`random_blocks`, :func:`bigbird`, :func:`axial`) are aligned top left: they assume
``Tq = Tk``, or queries counted from the first key.

Patterns of the field, with the distance ``delta = q_idx + offset - kv_idx``:

==========================  ==========================================================
:func:`causal`              ``delta >= 0``
:func:`sliding_window`      ``0 <= delta < w`` (flash-attn ``window_size=(w - 1, 0)``)
:func:`dilated`             ``0 <= delta < w * dilation`` and ``delta % dilation == 0``
:func:`strided`             ``delta >= 0`` and ``delta % stride == 0`` (Sparse Transformer)
:func:`fixed`               causal; same block of ``stride``, or ``kv_idx`` among the last
                            ``c`` positions of its block (Sparse Transformer's "fixed")
:func:`block_local`         ``q_idx // block == kv_idx // block``
:func:`global_tokens`       ``q_idx < n`` or ``kv_idx < n`` (Longformer, ETC)
:func:`random_blocks`       per query block, ``r`` key blocks drawn by a seeded hash (causal)
:func:`bigbird`             window or global or random blocks, within causal (BigBird)
:func:`axial`               same row or same column of a ``width``-wide grid, causal
==========================  ==========================================================

:func:`and_masks` and :func:`or_masks` combine them; :func:`dense_mask` materialises any
pattern as a ``[B, H, Tq, Tk]`` boolean tensor.

A pattern that is a band of diagonals, ``lo <= q_idx - kv_idx < hi`` (:func:`causal`,
:func:`sliding_window`, and :func:`and_masks` of such patterns), also says so: it carries
``(lo, hi)`` as the attribute ``_effarch_band``, ``hi = None`` when unbounded (the offset
folded into both), which :func:`mask_band` reads. A tile of such a mask is empty, full or
partial by the distances at its corners alone, so :func:`~effarch.sparse.block_layout` sorts
its tiles without evaluating the mask element by element, as FlashAttention's kernels derive
the key blocks of a causal or windowed query block from its position. A declared band is
trusted, not checked against the function; any other pattern is evaluated everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checks import check_positive_int

__all__ = [
    "MaskMod",
    "and_masks",
    "axial",
    "bigbird",
    "block_local",
    "causal",
    "dense_mask",
    "dilated",
    "fixed",
    "global_tokens",
    "mask_band",
    "or_masks",
    "random_blocks",
    "receptive_field",
    "sliding_window",
    "strided",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool``, broadcasting integer tensors."""


Band = tuple[int, int | None]
"""``(lo, hi)``: the pattern is ``lo <= q_idx - kv_idx < hi`` (``hi = None``: no upper end)."""


_BAND = "_effarch_band"  # the attribute a pattern declares its band in


def _with_band(mask_mod: MaskMod, lo: int, hi: int | None) -> MaskMod:
    setattr(mask_mod, _BAND, (lo, hi))
    return mask_mod


def mask_band(mask_mod: MaskMod) -> Band | None:
    """The diagonal band ``(lo, hi)`` a pattern declared, ``lo <= q_idx - kv_idx < hi``
    (``hi = None``: unbounded), or ``None`` for a pattern that is not a declared band. The
    declaration (the attribute ``_effarch_band``) is trusted: a pattern that declares a band
    it does not compute gets a wrong layout.

    ``sliding_window(w, offset)`` is the band ``(-offset, w - offset)``, ``causal(offset)``
    ``(-offset, None)``; :func:`and_masks` of bands is their intersection.
    """
    got = getattr(mask_mod, _BAND, None)
    if got is None:
        return None
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not (isinstance(got, tuple) and len(got) == 2 and is_int(got[0])
            and (got[1] is None or is_int(got[1]))):  # fmt: skip
        raise TypeError(f"mask_mod.{_BAND} must be a tuple (lo: int, hi: int | None), got {got!r}")
    return got


def _offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__} ({offset!r})")
    return offset


def causal(offset: int = 0) -> MaskMod:
    """Causal: ``q_idx + offset >= kv_idx``. ``offset = Tk - Tq`` aligns it bottom right."""
    offset = _offset(offset)

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return _with_band(mask_mod, -offset, None)


def sliding_window(w: int, offset: int = 0) -> MaskMod:
    """The ``w`` most recent keys, the query's own included: ``0 <= q + offset - kv < w``.

    Equals flash-attn's ``window_size=(w - 1, 0)`` with ``causal=True`` and chapter 4's
    ``window=w``; ``w = 1`` sees only itself.
    """
    check_positive_int("w", w)
    offset = _offset(offset)

    def mask_mod(b, h, q_idx, kv_idx):
        delta = q_idx + offset - kv_idx
        return (delta >= 0) & (delta < w)

    return _with_band(mask_mod, -offset, w - offset)


def dilated(w: int, dilation: int, offset: int = 0) -> MaskMod:
    """``w`` keys spaced ``dilation`` apart, back from the query: distances ``0, d, .., (w-1) d``.

    ``dilation = 1`` is :func:`sliding_window`; the receptive field per layer grows to
    ``(w - 1) dilation + 1`` positions at the same cost (Longformer's dilated windows).
    """
    check_positive_int("w", w)
    check_positive_int("dilation", dilation)
    offset = _offset(offset)

    def mask_mod(b, h, q_idx, kv_idx):
        delta = q_idx + offset - kv_idx
        return (delta >= 0) & (delta < w * dilation) & (delta % dilation == 0)

    return mask_mod


def strided(stride: int, offset: int = 0) -> MaskMod:
    """Every ``stride``-th earlier key: ``delta >= 0`` and ``delta % stride == 0``.

    The Sparse Transformer's second strided head (Child et al., 2019); with a window of
    ``stride`` (:func:`or_masks`) any token reaches any earlier one in two layers.
    """
    check_positive_int("stride", stride)
    offset = _offset(offset)

    def mask_mod(b, h, q_idx, kv_idx):
        delta = q_idx + offset - kv_idx
        return (delta >= 0) & (delta % stride == 0)

    return mask_mod


def fixed(stride: int, c: int = 1) -> MaskMod:
    """The Sparse Transformer's "fixed" pattern, causal: the query's own block of ``stride``
    positions, plus the last ``c`` positions of every earlier block ("summary" cells)."""
    check_positive_int("stride", stride)
    check_positive_int("c", c)
    if c > stride:
        raise ValueError(f"c must be at most stride={stride}, got {c}")

    def mask_mod(b, h, q_idx, kv_idx):
        same = q_idx // stride == kv_idx // stride
        summary = kv_idx % stride >= stride - c
        return (q_idx >= kv_idx) & (same | summary)

    return mask_mod


def block_local(block: int) -> MaskMod:
    """Attention within fixed blocks: ``q_idx // block == kv_idx // block`` (not causal)."""
    check_positive_int("block", block)

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx // block == kv_idx // block

    return mask_mod


def global_tokens(n: int) -> MaskMod:
    """The first ``n`` positions see and are seen by every position (not causal by itself).

    Longformer and BigBird designed window + global (+ random) attention for bidirectional
    encoders. Restricted to the past,
    ``and_masks(causal(), or_masks(sliding_window(w), global_tokens(n)))`` is the causal
    version chapter 3.1 uses (:func:`bigbird` adds random blocks): every later position still
    reads the global tokens, but they read only the past, so they cannot relay the sequence.
    """
    check_positive_int("n", n)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx < n) | (kv_idx < n)

    return mask_mod


def _hash(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (two rounds of multiply, xor-shift), elementwise on int64."""
    x = (x * 0x2C1B3C6D + 0x297A2D39) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x297A2D39 + 0x2C1B3C6D) & 0x7FFFFFFF
    return x ^ (x >> 13)


def random_blocks(block: int, r: int, seed: int = 0) -> MaskMod:
    """For each query block ``i``, ``r`` key blocks drawn among ``0 .. i`` (causal).

    The draws are a seeded hash of ``(i, draw, seed)``, so the pattern is a pure function of
    the indices (no table to size in advance) and the same on every machine. Draws may
    coincide, so a query block gets at most ``r`` distinct blocks.
    """
    check_positive_int("block", block)
    check_positive_int("r", r)
    check_positive_int("seed", seed, allow_zero=True)

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // block, kv_idx // block
        hit = torch.zeros_like(qb + kb, dtype=torch.bool)
        for j in range(r):
            pick = _hash(qb * 1_000_003 + j * 7919 + seed * 104_729) % (qb + 1)
            hit = hit | (kb == pick)
        return hit & (q_idx >= kv_idx)

    return mask_mod


def bigbird(window: int, n_global: int, r: int, block: int, seed: int = 0) -> MaskMod:
    """BigBird's pattern (Zaheer et al., 2020), restricted to the past (BigBird's sparse
    attention is its bidirectional encoder's): a sliding window of ``window`` keys,
    ``n_global`` global tokens, and ``r`` random key blocks of size ``block`` per query block."""
    return and_masks(
        causal(),
        or_masks(sliding_window(window), global_tokens(n_global), random_blocks(block, r, seed)),
    )


def axial(width: int) -> MaskMod:
    """2-D axial attention over a row-major grid ``width`` wide, causal: the query's own
    row (earlier columns) and own column (earlier rows); two layers reach any earlier cell."""
    check_positive_int("width", width)

    def mask_mod(b, h, q_idx, kv_idx):
        same_row = q_idx // width == kv_idx // width
        same_col = q_idx % width == kv_idx % width
        return (q_idx >= kv_idx) & (same_row | same_col)

    return mask_mod


def _check_mods(mods: tuple) -> None:
    if not mods:
        raise ValueError("give at least one mask_mod")
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(f"mask_mod {i} must be callable, got {type(m).__name__}")


def and_masks(*mods: MaskMod) -> MaskMod:
    """The intersection of patterns (FlexAttention's ``and_masks``); of bands, the band
    ``(max lo, min hi)`` (see :func:`mask_band`)."""
    _check_mods(mods)

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    bands = [mask_band(m) for m in mods]
    if all(x is not None for x in bands):
        his = [hi for _, hi in bands if hi is not None]
        return _with_band(mask_mod, max(lo for lo, _ in bands), min(his) if his else None)
    return mask_mod


def or_masks(*mods: MaskMod) -> MaskMod:
    """The union of patterns (FlexAttention's ``or_masks``)."""
    _check_mods(mods)

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def dense_mask(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    *,
    batch: int = 1,
    heads: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Evaluate ``mask_mod`` everywhere: ``torch.bool [batch, heads, q_len, kv_len]``.

    ``mask[b, h, i, j] = mask_mod(b, h, i, j)``, the indices as broadcasting int64 tensors
    ``[B, 1, 1, 1]``, ``[1, H, 1, 1]``, ``[1, 1, Tq, 1]``, ``[1, 1, 1, Tk]``.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    for name, v in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch), ("heads", heads)):
        check_positive_int(name, v)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    b, h = ar(batch).view(-1, 1, 1, 1), ar(heads).view(1, -1, 1, 1)
    q, kv = ar(q_len).view(1, 1, -1, 1), ar(kv_len).view(1, 1, 1, -1)
    out = mask_mod(b, h, q, kv)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"mask_mod must return a bool tensor, got {got}")
    return out.expand(batch, heads, q_len, kv_len)


def receptive_field(mask_mod: MaskMod, seq_len: int, n_layers: int) -> torch.Tensor:
    """How many positions each token has heard from after each of ``n_layers`` layers.

    Information moves one mask step per layer, and the residual stream keeps what a token
    already had: with ``A = M | I`` (the mask of head 0, batch 0, plus the diagonal),
    ``R_1 = A`` and ``R_{l+1} = A R_l`` in Boolean arithmetic, so ``R_l[i, j]`` says whether
    token ``j`` can influence the output at position ``i`` after ``l`` layers. Returns
    ``counts [n_layers, seq_len]`` int64, ``counts[l - 1, i] = sum_j R_l[i, j]``. For a causal
    window of ``w`` this is ``min(i + 1, l (w - 1) + 1)``.
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("n_layers", n_layers)
    a = dense_mask(mask_mod, seq_len, seq_len)[0, 0] | torch.eye(seq_len, dtype=torch.bool)
    a = a.float()
    reach, counts = a, []
    for _ in range(n_layers):
        counts.append(reach.sum(-1).long())
        reach = ((a @ reach) > 0).float()
    return torch.stack(counts)
