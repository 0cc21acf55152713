r"""Content-based sparse attention: LSH (Reformer) and k-means routing (chapter 3.2).

Both choose, per query, the keys it may read by *content* rather than position.

**LSH attention** (Kitaev et al., 2020). Queries and keys are shared (``k = q / |q|``), so a
token and its best matches tend to fall in the same bucket of a random-rotation hash:
``bucket(x) = argmax([x R; -x R])`` with ``R [D, n_buckets / 2]`` Gaussian, one ``R`` per
round. Per round, tokens are sorted by ``(bucket, position)``, the sorted sequence is cut into
chunks of ``chunk`` tokens, and each query reads the keys of its own chunk and the previous one
that share its bucket and are not in its future, its own key included (Reformer masks it, and
scales scores differently: see :func:`lsh_attention`). Rounds are merged by their log-sum-exp,

.. math:: o_i = \sum_r \frac{e^{\mathrm{lse}_{r,i}}}{\sum_{r'} e^{\mathrm{lse}_{r',i}}}\, o_{r,i},

which equals one softmax over the keys of all rounds, a key found in two rounds counting twice
(Reformer subtracts the duplicate count; this plain merge keeps the formula short). Cost per
round ``O(T chunk)`` after an ``O(T log T)`` sort. Causal masking removes future *keys*, but
it does not make chunked LSH causal: future tokens change the sorted order and so the chunk
boundaries, and with them the set of earlier keys a query sees (the tests show the leak). It
is a training-time method for full sequences, not a decoding rule.

**Routing attention** (Roy et al., 2021). Tokens are assigned to the nearest of ``C``
centroids (by cosine), and a query reads the earlier keys of its cluster. Centroids follow
the tokens by an exponential moving average of their members (:func:`kmeans_update`), the
online k-means the Routing Transformer trains alongside the model.

:func:`lsh_reference` and :func:`routing_reference` compute the same outputs with per-query
loops, as the checks.

**Causality.** A routed method can decode only if what a query reads depends on the past
alone. :func:`future_leaks` checks that by redrawing the future and watching earlier outputs;
:func:`expert_choice_attention` is the counter-example it must catch: key blocks choose their
queries over the whole sequence (expert-choice routing), so a later query can take an earlier
one's place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .._checks import check_positive_int, check_tensor
from .block import masked_attention

__all__ = [
    "expert_choice_attention",
    "future_leaks",
    "kmeans_update",
    "lsh_attention",
    "lsh_buckets",
    "lsh_reference",
    "routing_attention",
    "routing_reference",
]


def _check_qv(qk: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor("qk", qk, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    if qk.shape[:3] != v.shape[:3]:
        raise ValueError(f"v must be [B, T, H, *] like qk {tuple(qk.shape)}, got {tuple(v.shape)}")


def _check_rotations(rotations: torch.Tensor, x: torch.Tensor, x_name: str) -> None:
    check_tensor("rotations", rotations, ndim=3)
    d = x.shape[-1]
    if rotations.shape[1] != d or rotations.shape[0] < 1 or rotations.shape[2] < 1:
        raise ValueError(
            f"rotations must be [n_rounds >= 1, D = {d} (the head_dim of {x_name}), "
            f"n_buckets / 2 >= 1], got {tuple(rotations.shape)}"
        )
    if rotations.device != x.device:
        raise ValueError(f"rotations must be on the device of {x_name} ({x.device}), got "
                         f"{rotations.device}")  # fmt: skip


def _hash(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    proj = torch.einsum("bthd,rdn->rbthn", x, rotations.to(x.dtype))
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: ``argmax([x R; -x R])`` per round. ``x [B, T, H, D]``, ``rotations
    [n_rounds, D, n_buckets / 2]``; returns ``int64 [n_rounds, B, T, H]``."""
    check_tensor("x", x, ndim=4, floating=True)
    _check_rotations(rotations, x, "x")
    return _hash(x, rotations)


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    *,
    chunk: int = 32,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal LSH attention with shared queries and keys (see the module docstring).

    Two differences from Reformer as ``transformers`` implements it
    (``LSHSelfAttention._attend`` and ``_len_and_dim_norm`` in ``modeling_reformer.py``):

    * Reformer always masks a token's own key (with a finite ``-1e5`` in float32, so it is read
      only when the token has no other key to attend to, as the first token), because with
      shared queries and keys ``q . q / |q|`` is almost always the largest score; here the
      own key keeps its full score.
    * Reformer's logits are ``q . k / |k|`` (the key divided by its RMS, then by ``sqrt(D)``:
      by its length) with no further scale, which is ``scale=1`` here; the default here
      multiplies by ``D ** -0.5`` as well.

    Args:
        qk: ``[B, T, H, D]`` shared queries/keys (keys are ``qk / |qk|``).
        v: ``[B, T, H, Dv]``.
        rotations: ``[n_rounds, D, n_buckets / 2]`` random rotations (one hash per round).
        chunk: chunk length in the sorted order; ``T`` must be a multiple of it.
        scale: default ``D ** -0.5``.

    Returns:
        ``o [B, T, H, Dv]``.
    """
    _check_qv(qk, v)
    _check_rotations(rotations, qk, "qk")
    check_positive_int("chunk", chunk)
    b, t, h, d = qk.shape
    if t % chunk:
        raise ValueError(f"T must be a multiple of chunk={chunk}, got T={t}")
    sc = d**-0.5 if scale is None else float(scale)
    keys = F.normalize(qk, dim=-1)
    buckets = _hash(qk, rotations)  # [R, B, T, H]
    pos = torch.arange(t, device=qk.device)
    outs, lses = [], []
    for bk in buckets:
        order = torch.argsort(bk * t + pos[None, :, None], dim=1)  # sort by (bucket, position)

        def sort(x: torch.Tensor, order: torch.Tensor = order) -> torch.Tensor:
            return torch.gather(x, 1, order[..., None].expand(*order.shape, x.shape[-1]))

        sq, sk, sv = sort(qk), sort(keys), sort(v)
        sb = torch.gather(bk, 1, order)
        sp = pos[order]  # original positions, [B, T, H]
        cq, ck, cv, cb, cp = (
            rearrange(x, "b (n c) h ... -> b h n c ...", c=chunk) for x in (sq, sk, sv, sb, sp)
        )

        def with_previous(x: torch.Tensor, fill: float) -> torch.Tensor:
            prev = torch.roll(x, 1, dims=2)
            prev[:, :, 0] = fill  # the first chunk has no previous one
            return torch.cat([prev, x], dim=3)

        kk, vv = with_previous(ck, 0.0), with_previous(cv, 0.0)
        kb, kp = with_previous(cb, -1), with_previous(cp, t + 1)  # never matches, never past
        s = torch.einsum("bhncd,bhnjd->bhncj", cq, kk) * sc
        keep = (cb[..., None] == kb[..., None, :]) & (kp[..., None, :] <= cp[..., None])
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)  # the query itself is always kept: finite
        o = torch.einsum("bhncj,bhnjd->bhncd", torch.exp(s - lse[..., None]), vv)
        o = rearrange(o, "b h n c d -> b (n c) h d")
        lse = rearrange(lse, "b h n c -> b (n c) h")
        inverse = torch.argsort(order, dim=1)
        outs.append(torch.gather(o, 1, inverse[..., None].expand_as(o)))
        lses.append(torch.gather(lse, 1, inverse))
    lse = torch.stack(lses)  # [R, B, T, H]
    w = torch.softmax(lse, dim=0)[..., None]
    return (w * torch.stack(outs)).sum(0)


def lsh_reference(
    qk: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    *,
    chunk: int = 32,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`lsh_attention` with Python loops over rounds, batches, heads and queries."""
    _check_qv(qk, v)
    b, t, h, d = qk.shape
    sc = d**-0.5 if scale is None else float(scale)
    keys = F.normalize(qk, dim=-1)
    buckets = lsh_buckets(qk, rotations)
    out = torch.zeros(b, t, h, v.shape[-1], dtype=qk.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                outs, lses = [], []
                for r in range(rotations.shape[0]):
                    bk = buckets[r, bi, :, hi].tolist()
                    order = sorted(range(t), key=lambda j: (bk[j], j))
                    rank = {j: n for n, j in enumerate(order)}
                    c = rank[i] // chunk
                    window = order[max(0, (c - 1) * chunk) : (c + 1) * chunk]
                    allowed = [j for j in window if bk[j] == bk[i] and j <= i]
                    s = torch.stack([qk[bi, i, hi] @ keys[bi, j, hi] for j in allowed]) * sc
                    lse = torch.logsumexp(s, 0)
                    p = torch.exp(s - lse)
                    outs.append(sum(pj * v[bi, j, hi] for pj, j in zip(p, allowed, strict=True)))
                    lses.append(lse)
                w = torch.softmax(torch.stack(lses), 0)
                out[bi, i, hi] = sum(wr * o for wr, o in zip(w, outs, strict=True))
    return out


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine: ``x [B, T, H, D]``, ``centroids [H, C, D]`` -> ``[B, T, H]``."""
    return torch.einsum("bthd,hcd->bthc", F.normalize(x, dim=-1),
                        F.normalize(centroids, dim=-1).to(x.dtype)).argmax(-1)  # fmt: skip


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal routing attention: query ``i`` reads the keys ``j <= i`` of its own cluster.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``.
        centroids: ``[H, C, D]``, one set per head; queries and keys are assigned separately.
        scale: default ``D ** -0.5``.

    Returns:
        ``o [B, T, H, Dv]``; a query whose cluster holds no earlier key reads nothing (0).

    Computed densely with the cluster mask (the dense form is the clearest statement; the
    saving comes from sorting by cluster, as LSH attention does).
    """
    _check_qv(q, v)
    if k.shape != q.shape:
        raise ValueError(f"k must be shaped like q {tuple(q.shape)}, got {tuple(k.shape)}")
    t = q.shape[1]
    sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cq, ck = _assign(q, centroids), _assign(k, centroids)  # [B, T, H]
    same = rearrange(cq, "b t h -> b h t 1") == rearrange(ck, "b t h -> b h 1 t")
    keep = same & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bihd,bjhd->bhij", q, k) * sc
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, v.to(p.dtype))


def routing_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: torch.Tensor,
    *, scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`routing_attention` one query at a time, nearest centroid by a loop."""
    b, t, h, d = q.shape
    sc = d**-0.5 if scale is None else float(scale)
    out = torch.zeros(b, t, h, v.shape[-1], dtype=q.dtype)

    def nearest(x: torch.Tensor, hi: int) -> int:
        sims = [F.cosine_similarity(x, c.to(x.dtype), dim=0).item() for c in centroids[hi]]
        return max(range(len(sims)), key=lambda c: (sims[c], -c))

    for bi in range(b):
        for hi in range(h):
            ck = [nearest(k[bi, j, hi], hi) for j in range(t)]
            for i in range(t):
                ci = nearest(q[bi, i, hi], hi)
                allowed = [j for j in range(i + 1) if ck[j] == ci]
                if not allowed:
                    continue
                s = torch.stack([q[bi, i, hi] @ k[bi, j, hi] for j in allowed]) * sc
                p = torch.softmax(s, 0)
                out[bi, i, hi] = sum(pj * v[bi, j, hi] for pj, j in zip(p, allowed, strict=True))
    return out


def kmeans_update(
    centroids: torch.Tensor, x: torch.Tensor, *, decay: float = 0.999
) -> torch.Tensor:
    """One online k-means step: each centroid moves towards the mean of its members,
    ``c <- decay c + (1 - decay) mean(normalize(x) in cluster c)``; empty clusters stay.
    ``centroids [H, C, D]``, ``x [B, T, H, D]``; returns the new centroids."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    xn = F.normalize(x, dim=-1)
    assign = F.one_hot(_assign(x, centroids), centroids.shape[1]).to(x.dtype)  # [B, T, H, C]
    sums = torch.einsum("bthc,bthd->hcd", assign, xn)
    counts = assign.sum(dim=(0, 1))[..., None]  # [H, C, 1]
    means = sums / counts.clamp_min(1.0)
    moved = decay * centroids + (1 - decay) * means.to(centroids.dtype)
    return torch.where(counts > 0, moved, centroids)


def future_leaks(
    fn: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    split: int,
    seed: int = 0,
    atol: float = 1e-12,
) -> torch.Tensor:
    """Which outputs before ``split`` change when the future changes.

    Every input's positions ``split ..`` (dimension 1, the sequence) are redrawn from
    ``3 N(0, 1)`` (seeded) and ``fn`` is run on both versions; a causal ``fn`` gives the same
    outputs at every position before ``split``.

    Args:
        fn: ``fn(*inputs) -> [B, T, ...]``.
        inputs: tensors ``[B, T, ...]`` of one length ``T``.
        split: the first position that changes (``0 < split < T``).

    Returns:
        bool ``[split]``: ``True`` where some output at that position moved by more than
        ``atol``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not inputs or any(not isinstance(x, torch.Tensor) or x.ndim < 2 for x in inputs):
        raise TypeError("inputs must be tensors [B, T, ...]")
    t = inputs[0].shape[1]
    if any(x.shape[1] != t for x in inputs):
        raise ValueError(f"inputs must share their length, got {[x.shape[1] for x in inputs]}")
    if not 0 < split < t:
        raise ValueError(f"split must be in 1 .. {t - 1}, got {split}")
    gen = torch.Generator().manual_seed(seed)
    changed = []
    for x in inputs:
        y = x.clone()
        noise = torch.randn(y[:, split:].shape, generator=gen, dtype=torch.float64) * 3
        y[:, split:] = noise.to(dtype=y.dtype, device=y.device)
        changed.append(y)
    a, b = fn(*inputs), fn(*changed)
    diff = (a[:, :split] - b[:, :split]).abs()
    return diff.flatten(2).amax(dim=(0, 2)) > atol if diff.ndim > 2 else diff.amax(0) > atol


def expert_choice_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, capacity: int
) -> torch.Tensor:
    """Expert-choice routing over key blocks, a *non-causal* router kept as a counter-example.

    Each key block (mean-pooled keys) picks the ``capacity`` queries of the whole sequence
    that score it highest; a query reads the blocks that picked it and its own block, causally
    masked. The choice ranks future queries too, so changing them changes earlier outputs
    (:func:`future_leaks` sees it): fine for a full sequence, impossible to decode.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, T, G, D]`` (GQA); ``T`` a multiple of ``block``.

    Returns:
        ``o [B, T, H, Dv]``.
    """
    check_positive_int("block", block)
    check_positive_int("capacity", capacity)
    b, t, h, _ = q.shape
    if t % block:
        raise ValueError(f"T must be a multiple of block={block}, got T={t}")
    pooled = repeat(k.unflatten(1, (t // block, block)).mean(2), "b n g d -> b n (g r) d",
                    r=h // k.shape[2])  # fmt: skip
    score = torch.einsum("bthd,bnhd->bhnt", q, pooled)  # each key block scores every query
    picked = torch.zeros_like(score, dtype=torch.bool)
    picked.scatter_(-1, score.topk(min(capacity, t), dim=-1).indices, True)
    reads = picked.transpose(-1, -2).repeat_interleave(block, -1)  # [B, H, T, T]
    pos = torch.arange(t, device=q.device)
    keep = (reads | (pos[:, None] // block == pos[None] // block)) & (pos[None] <= pos[:, None])
    return masked_attention(q, k, v, lambda bb, hh, i, j: keep[bb, hh, i, j])
