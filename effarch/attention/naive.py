"""Softmax attention, written the obvious way: the reference every fast form is checked against.

Layout ``[batch, seq, heads, head_dim]`` as in flash-attn (``flash_attn_func``) and
flash-linear-attention. To compare with ``torch.nn.functional.scaled_dot_product_attention``
transpose to ``[batch, heads, seq, head_dim]`` first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat

from .._checks import check_attention_qkv, check_same, check_tensor

# scaled_dot_product_attention shares key/value heads natively from torch 2.5 on
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _check_window(window: object) -> None:
    """Check a local window as flash-attn's ``window_size``: ``None`` or a pair
    ``(left, right)`` of ints ``>= -1`` (``-1``: that side unbounded)."""
    if window is None:
        return
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and w >= -1 for w in window)
    ):
        raise ValueError(f"window must be a pair (left, right) of ints >= -1, got {window!r}")


def attention_mask(
    seq_q: int,
    seq_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[seq_q, seq_k]`` mask, True where query ``i`` may attend to key ``j``.

    Aligned to the bottom right as in flash-attn: with ``off = seq_k - seq_q``,
    ``causal`` keeps ``j <= i + off`` and ``window=(left, right)`` keeps
    ``i + off - left <= j <= i + off + right`` (``-1`` leaves that side unbounded; ``window``
    must be a pair of ints ``>= -1``, as in :func:`naive_attention`).
    """
    _check_window(window)
    i = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device)[None, :]
    mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if window is not None:
        left, right = window
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
    if causal:
        mask &= j <= i
    return mask


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention that materialises the full score matrix.

    ``O = softmax(scale * Q K^T + M) V`` with ``M`` zero where allowed and ``-inf`` where
    masked (see :func:`attention_mask`).

    Args:
        q: ``[B, Tq, Hq, D]`` queries.
        k: ``[B, Tk, Hkv, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (grouped-query
            attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
        v: ``[B, Tk, Hkv, Dv]`` values.
        causal: mask future keys, aligned to the bottom right when ``Tq != Tk``.
        scale: score scale, default ``D ** -0.5``.
        window: ``(left, right)`` local window as flash-attn's ``window_size``.

    Returns:
        ``[B, Tq, Hq, Dv]`` in the dtype of ``q``. A query that sees no key outputs
        zeros (as flash-attn does). Half-precision inputs are computed in float32.

    Memory is ``O(B Hq Tq Tk)`` for the scores: that is the point of this function.
    Equivalent to ``flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
    window_size=window)``.
    """
    check_attention_qkv(q, k, v)
    _check_window(window)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    groups = q.shape[2] // k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    kf = repeat(kf, "b t h d -> b t (h g) d", g=groups)
    vf = repeat(vf, "b t h d -> b t (h g) d", g=groups)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale  # [B, H, Tq, Tk]
    mask = None
    if causal or window is not None:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)  # rows with no key: NaN -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` in our ``[B, T, H, D]`` layout.

    The same contract as :func:`naive_attention` (GQA, bottom-right causal mask when
    ``Tq != Tk``, ``window=(left, right)`` as flash-attn's ``window_size``), delegating to
    whichever fused backend torch picks (FlashAttention or memory-efficient attention on a
    GPU, a fused kernel on the CPU); a window is passed to it as a boolean mask. Rows that
    see no key are zeroed, as in flash-attn. Values narrower or wider than the queries and
    keys are zero-padded to one head dim, which the fused kernels need (as MLA prefill on
    FlashAttention does; zero columns change no score and no output). With GQA, where every
    query sees every key (a decoding step's single query, or no mask), the query heads that
    share a key/value head are packed as rows of one product over its keys, as flash-attn's
    ``pack_gqa`` and flash-decoding do: each key is read once per group, not once per query
    head (on a CPU, SDPA's ``enable_gqa`` path took two to four times as long per cached
    token). An independent reference for tests and the baseline in benchmarks.

    ``mask``: an optional boolean ``[Tq, Tk]`` (or 3 or 4 dimensions broadcastable to
    ``[B, Hq, Tq, Tk]``), True where query ``i`` may attend to key ``j``: SDPA's boolean
    ``attn_mask``, for any pattern (e.g. ``effarch.sparse.dense_mask`` of a ``mask_mod``);
    with ``causal`` both apply. ``o_i = sum_j softmax_j(s_ij + log M_ij) v_j``, 0 for a row
    that keeps no key.
    """
    check_attention_qkv(q, k, v)
    if mask is not None:
        _check_mask(mask, q, k)
        if mask.ndim == 4:  # a batch or head axis broadcast with stride 0: keep one copy
            mask = mask[: 1 if mask.stride(0) == 0 else None, : 1 if mask.stride(1) == 0 else None]
    if window is not None:  # the window and the causal mask as one boolean mask
        _check_window(window)
        local = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window,
                               device=q.device)  # fmt: skip
        mask, causal = (local if mask is None else mask & local), False
    return launch_sdpa(q, k, v, causal=causal, scale=scale, mask=mask)


def _check_mask(mask: object, q: torch.Tensor, k: torch.Tensor) -> None:
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    check_same(("q", "mask"), (q, mask), dtype=False)
    full = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
        ok = 2 <= mask.ndim <= 4 and torch.broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask must have 2 to 4 dimensions and broadcast to [B, Hq, Tq, Tk] = "
            f"{list(full)}, got {tuple(mask.shape)}"
        )


def launch_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sdpa_attention` on arguments already checked (by it, or by
    :func:`~effarch.attention.flash_attention` when it falls back to PyTorch)."""
    tq, tk = q.shape[1], k.shape[1]
    groups = q.shape[2] // k.shape[2]
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv:  # one head dim for the fused kernels: pad with zeros, slice the output
        scale = d**-0.5 if scale is None else scale
        if dv < d:
            v = F.pad(v, (0, d - dv))
        else:
            q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if groups > 1 and mask is None and (not causal or tq == 1):
        # every query sees every key (decoding, or no mask): the `groups` query heads that
        # share a key/value head become rows of one product over that head's keys, which
        # reads each key once for the whole group (flash-attn's pack_gqa, flash-decoding)
        b, g = q.shape[0], k.shape[2]
        qp = q.reshape(b, tq, g, groups, q.shape[-1]).permute(0, 2, 3, 1, 4)
        out = F.scaled_dot_product_attention(qp.reshape(b, g, groups * tq, -1), kt, vt,
                                             scale=scale)  # fmt: skip
        out = out.reshape(b, g, groups, tq, -1).permute(0, 3, 1, 2, 4)
        return out.reshape(b, tq, g * groups, -1)[..., :dv]
    extra = {}
    if groups > 1:
        if _SDPA_HAS_GQA:  # reads each shared key/value head in place, no copies
            extra["enable_gqa"] = True
        else:
            kt = kt.repeat_interleave(groups, dim=1)
            vt = vt.repeat_interleave(groups, dim=1)
    if mask is not None or (causal and tq != tk and tq != 1):
        if causal:  # bottom right; one query after a cache (Tq = 1) sees every key
            cmask = attention_mask(tq, tk, causal=True, device=q.device)
            mask = cmask if mask is None else mask & cmask
        # a row that keeps no key attends to every key, then is zeroed: its gradients are 0
        # whatever the torch version (older SDPA returns NaN for it, and NaN gradients)
        empty = ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask | empty, scale=scale,
                                             **extra)  # fmt: skip
        out = out.masked_fill(empty, 0.0)
    else:
        is_causal = causal and tq == tk
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal, scale=scale, **extra)
    return out.transpose(1, 2)[..., :dv]
