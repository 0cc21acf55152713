r"""Context parallelism on ``torch.distributed`` (chapter 9.2): one sequence over ``P`` ranks.

A sequence too long for one device is cut along time; rank ``r`` holds the tokens of its
shard (queries, keys and values of every layer) and the ranks exchange only what a token
needs from the others. The code is written for gloo (CPU) and NCCL (GPU) alike; the tests
run it on gloo.

**Ring attention** (softmax attention; Liu et al., 2023). Every rank keeps its queries; the
key/value blocks travel around the ring ``r -> r + 1``. At step ``s = 0 .. P - 1`` rank ``r``
holds the block of rank ``(r - s) mod P``, sends it on while it computes the partial attention
of its queries with it, and merges the partial result into its running output by the
log-sum-exp of each row (the online softmax of chapter 4.1)::

    l = logaddexp(l_a, l_b),    o = exp(l_a - l) o_a + exp(l_b - l) o_b

After ``P`` steps every query has seen every key: the output is exact. A rank sends
``(P - 1)`` key/value blocks of ``2 (T / P) H_kv D`` numbers forward, ``O(T D)`` per rank, and
the backward pass sends the blocks around once more with their gradients beside them.

*Causal load balance.* With a causal mask, contiguous shards leave rank 0 with one useful
block and rank ``P - 1`` with ``P``. The sequence is cut into ``2P`` chunks and rank ``r``
takes chunks ``r`` and ``2P - 1 - r`` (``layout="zigzag"``, as ring-flash-attn's
``zigzag_ring_flash_attn_func``): every rank then does ``2P + 1`` chunk products. Inside a
step, a (query chunk ``i``, key chunk ``j``) pair is computed in full for ``j < i``, with the
causal mask for ``j = i`` and skipped for ``j > i``.

**LASP** (linear attention sequence parallelism; Sun et al., 2024 and 2025). The state of
each of :mod:`effarch.linear`'s matrix-state ops (``TRANSITIONS``) is an affine function
of the state it starts from: over rank ``r``'s tokens
``S_out = M_r S_in + S_r``, with ``S_r`` the state the shard builds from zero and ``M_r`` the
product of its transitions (``I`` for linear attention, a diagonal of decays for RetNet and
GLA, a full ``K x K`` matrix for the delta rules). Each rank computes ``(M_r, S_r)``, the pairs
are all-gathered (LASP-2), each rank folds those of the ranks before it into its initial state
``h_r = M_{r-1} (... (M_0 0 + S_0) ...) + S_{r-1}`` and runs its shard from ``h_r``. A rank
sends ``(P - 1)`` copies of ``K V`` (plus ``K`` or ``K^2``) numbers per head: ``O(D^2)``,
independent of ``T``. Backward is the reverse exchange (a reduce-scatter of the gathered
pairs' gradients).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange

from .. import linear
from .._checks import check_attention_qkv, check_choice, check_positive_int
from ..attention import naive_attention
from .launch import process_group

__all__ = [
    "check_context_parallel",
    "context_parallel_errors",
    "lasp",
    "lasp_bytes",
    "ring_attention",
    "ring_attention_bytes",
    "ring_chunk_products",
    "shard_chunks",
    "shard_sequence",
    "unshard_sequence",
]

LAYOUTS = ("zigzag", "contiguous")


def _world(group: Any) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; one process (1, 0) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def shard_chunks(world: int, rank: int, layout: str = "zigzag") -> list[int]:
    """The two chunks (of ``2 * world``) that ``rank`` holds: ``[2r, 2r + 1]`` for
    ``"contiguous"``, ``[r, 2 world - 1 - r]`` for ``"zigzag"``."""
    world = check_positive_int("world", world)
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    check_choice("layout", layout, LAYOUTS)
    return [2 * rank, 2 * rank + 1] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def shard_sequence(
    x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim`` (time, ``[B, T, ...]`` by default): the
    chunks of :func:`shard_chunks` concatenated; ``T`` must be a multiple of ``2 world``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    world = check_positive_int("world", world)
    n = x.shape[dim]
    if n % (2 * world):
        raise ValueError(f"x.shape[{dim}]={n} must be a multiple of 2 * world = {2 * world}")
    pieces = x.chunk(2 * world, dim)
    return torch.cat([pieces[c] for c in shard_chunks(world, rank, layout)], dim)


def unshard_sequence(
    shards: list[torch.Tensor], layout: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the whole sequence from every rank's shard."""
    world = len(shards)
    chunks: list[torch.Tensor | None] = [None] * (2 * world)
    for r, s in enumerate(shards):
        a, b = s.chunk(2, dim)
        c0, c1 = shard_chunks(world, r, layout)
        chunks[c0], chunks[c1] = a, b
    return torch.cat(chunks, dim)  # type: ignore[arg-type]


def ring_chunk_products(world: int, layout: str = "zigzag", causal: bool = True) -> list[int]:
    """Chunk-by-chunk attention products each rank computes in :func:`ring_attention` (each
    ``(T / 2P)^2`` scores): ``2P + 1`` on every rank for ``"zigzag"``, ``4r + 3`` on rank
    ``r`` for ``"contiguous"``, ``4P`` without the causal mask. A count, not a timing."""
    out = []
    for r in range(world):
        mine = shard_chunks(world, r, layout)
        out.append(4 * world if not causal else sum(j <= i for i in mine for j in range(2 * world)))
    return out


# --------------------------------------------------------------------------------------------
# Ring attention
# --------------------------------------------------------------------------------------------


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool) -> torch.Tensor:
    """``scale q k^T`` for one chunk pair, ``q [B, c, Hkv, G, D]``, ``k [B, c, Hkv, D]`` ->
    ``[B, Hkv, G, c, c]``, future keys at ``-inf`` on a diagonal pair."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    if diagonal:
        c = s.shape[-1]
        future = torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s


def _pairs(mine: list[int], theirs: list[int], causal: bool, c: int):
    """``(query slice, key slice, diagonal)`` for every chunk pair a step computes."""
    for a, i in enumerate(mine):
        for b, j in enumerate(theirs):
            if not causal or j < i:
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), False
            elif j == i:
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), True


class _Ring:
    """Send a tensor to the next rank while receiving the previous rank's (non-blocking)."""

    def __init__(self, group: Any, world: int, rank: int, stats: dict[str, float] | None):
        self.group, self.world, self.stats = group, world, stats
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        if group is not None:  # P2P ops take global ranks
            nxt, prev = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prev)
        self.next, self.prev = nxt, prev

    def start(self, x: torch.Tensor, key: str) -> tuple[torch.Tensor, list[Any]]:
        x = x.contiguous()
        buf = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, self.next, self.group),
            dist.P2POp(dist.irecv, buf, self.prev, self.group),
        ]
        if self.stats is not None:
            self.stats[key] = self.stats.get(key, 0) + x.numel() * x.element_size()
        return buf, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(handle: tuple[torch.Tensor, list[Any]]) -> torch.Tensor:
        buf, works = handle
        for w in works:
            w.wait()
        return buf


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, group, stats):  # type: ignore[override]
        world, rank = _world(group)
        ring = _Ring(group, world, rank, stats) if world > 1 else None
        g = q.shape[2] // k.shape[2]
        work = torch.promote_types(q.dtype, torch.float32)
        qg = rearrange(q.to(work), "b t (h g) d -> b t h g d", g=g)
        c = q.shape[1] // 2
        mine = shard_chunks(world, rank, layout)
        o = torch.zeros_like(qg)
        lse = torch.full(qg.shape[:-1], float("-inf"), dtype=work, device=q.device)
        kv = torch.stack([k, v])  # travels in the inputs' dtype, as ring-flash-attn's does
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(kv, "forward") if ring and step < world - 1 else None
            for qs, ks, diagonal in _pairs(mine, shard_chunks(world, src, layout), causal, c):
                if stats is not None:
                    stats["products"] = stats.get("products", 0) + 1
                k_b, v_b = kv[0][:, ks].to(work), kv[1][:, ks].to(work)
                s = _scores(qg[:, qs], k_b, scale, diagonal)
                l_b = torch.logsumexp(s, -1)  # [B, Hkv, G, c]
                o_b = torch.einsum("bhgqk,bkhd->bqhgd", torch.exp(s - l_b[..., None]), v_b)
                l_b = rearrange(l_b, "b h g q -> b q h g")
                l_a = lse[:, qs]
                new = torch.logaddexp(l_a, l_b)
                o[:, qs] = (torch.exp(l_a - new)[..., None] * o[:, qs]
                            + torch.exp(l_b - new)[..., None] * o_b)  # fmt: skip
                lse[:, qs] = new
            if pending is not None:
                kv = _Ring.wait(pending)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.layout, ctx.group, ctx.stats = (
            scale,
            causal,
            layout,
            group,
            stats,
        )
        return rearrange(o, "b t h g d -> b t (h g) d").to(q.dtype)

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        scale, causal, layout, group = ctx.scale, ctx.causal, ctx.layout, ctx.group
        world, rank = _world(group)
        ring = _Ring(group, world, rank, ctx.stats) if world > 1 else None
        g = q.shape[2] // k.shape[2]
        work = o.dtype
        qg = rearrange(q.to(work), "b t (h g) d -> b t h g d", g=g)
        dog = rearrange(do.to(work), "b t (h g) d -> b t h g d", g=g)
        delta = (dog * o).sum(-1)  # [B, t, Hkv, G]: rowsum(dO * O), flash attention's D
        dq = torch.zeros_like(qg)
        c = q.shape[1] // 2
        mine = shard_chunks(world, rank, layout)
        kv = torch.stack([k, v])  # in the inputs' dtype, as forward sent it
        dkv = torch.zeros(kv.shape, dtype=work, device=kv.device)  # travels with its block
        for step in range(world):
            src = (rank - step) % world
            pending = ring.start(kv, "backward") if ring and step < world - 1 else None
            for qs, ks, diagonal in _pairs(mine, shard_chunks(world, src, layout), causal, c):
                k_b, v_b = kv[0][:, ks].to(work), kv[1][:, ks].to(work)
                s = _scores(qg[:, qs], k_b, scale, diagonal)
                lse_q = rearrange(lse[:, qs], "b q h g -> b h g q")
                p = torch.exp(s - lse_q[..., None])  # the final softmax weights
                dkv[1][:, ks] += torch.einsum("bhgqk,bqhgd->bkhd", p, dog[:, qs])
                dp = torch.einsum("bqhgd,bkhd->bhgqk", dog[:, qs], v_b)
                ds = p * (dp - rearrange(delta[:, qs], "b q h g -> b h g q")[..., None]) * scale
                dq[:, qs] += torch.einsum("bhgqk,bkhd->bqhgd", ds, k_b)
                dkv[0][:, ks] += torch.einsum("bhgqk,bqhgd->bkhd", ds, qg[:, qs])
            if ring:  # the gradients follow their block; after P hops they are home
                dkv = _Ring.wait(ring.start(dkv, "backward"))
            if pending is not None:
                kv = _Ring.wait(pending)
        dq = rearrange(dq, "b t h g d -> b t (h g) d").to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    group: Any = None,
    stats: dict[str, float] | None = None,
) -> torch.Tensor:
    r"""Softmax attention over a sequence sharded on the ranks of ``group`` (module docstring).

    Each rank passes its own shard, cut by :func:`shard_sequence` with the same ``layout``:
    ``q [B, T/P, Hq, D]``, ``k, v [B, T/P, Hkv, D]`` (``Hkv`` divides ``Hq``: query head ``h``
    reads key/value head ``h // (Hq / Hkv)``; ``v``'s head dim must equal ``D``: keys and
    values travel as one block, so ``Dv != D`` raises ``ValueError``), and receives its shard of
    ``O = softmax(scale Q K^T + M) V`` over the whole sequence, ``[B, T/P, Hq, D]``. Backward
    (by autograd) returns each rank's shard of ``dQ, dK, dV``. Partial results are kept in
    float32 (float64 inputs stay float64); keys and values travel in their own dtype, their
    gradients in that float32 (ring-flash-attn's choices). Without a process group it is
    plain attention.

    ring-flash-attn: ``zigzag_ring_flash_attn_func(q, k, v, softmax_scale=..., causal=...)`` for
    ``layout="zigzag"`` and ``ring_flash_attn_func`` for ``"contiguous"``; flash-attn's
    arguments and layout, except the default of ``causal``: ``True`` here, ``False`` there
    (as in flash-attn), so pass ``causal`` explicitly when porting a call. ``stats``, if
    given, gains the bytes this rank sent (``"forward"``, ``"backward"``) and the chunk
    products it computed (``"products"``, forward).
    """
    check_attention_qkv(q, k, v)
    if v.shape[3] != k.shape[3]:
        raise ValueError(
            f"v must have the head dim of q and k ({k.shape[3]}) in dim 3 (keys and values "
            f"travel as one block), got {v.shape[3]} (shape {tuple(v.shape)})"
        )
    if q.shape[1] != k.shape[1] or q.shape[1] % 2:
        raise ValueError(
            "q and k must hold the same shard (T/P tokens, an even number: two chunks), got "
            f"{q.shape[1]} and {k.shape[1]}"
        )
    check_choice("layout", layout, LAYOUTS)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, scale, bool(causal), layout, group, stats)


def ring_attention_bytes(
    seq_len: int, world: int, n_kv_heads: int, head_dim: int, bytes_per: int = 2, batch: int = 1
) -> dict[str, int]:
    """Bytes one rank sends in :func:`ring_attention`, modelled: forward ``(P - 1)`` blocks of
    keys and values (``2 B (T / P) Hkv D`` numbers each, ``bytes_per`` bytes: the inputs'
    dtype); backward the same blocks plus their gradients, which make ``P`` hops in the
    accumulation dtype (float32 for 16-bit inputs: ``max(bytes_per, 4)`` bytes)."""
    numbers = 2 * batch * (seq_len // world) * n_kv_heads * head_dim
    block, grads = numbers * bytes_per, numbers * max(bytes_per, 4)
    if world == 1:
        return {"forward": 0, "backward": 0}
    return {"forward": (world - 1) * block, "backward": (world - 1) * block + world * grads}


# --------------------------------------------------------------------------------------------
# LASP
# --------------------------------------------------------------------------------------------

# how each op's state transition over a shard is sent: nothing (identity), its diagonal, or all
TRANSITIONS = {
    "linear_attention": "identity",
    "retention": "diagonal",
    "simple_gla": "diagonal",
    "gla": "diagonal",
    "delta_rule": "full",
    "gated_delta_rule": "full",
    "dplr_delta_rule": "full",
}


class _AllGather(torch.autograd.Function):
    """``dist.all_gather`` of one tensor per rank -> ``[P, ...]``; backward sums each rank's
    slice of the gradient over the ranks (a reduce-scatter, made of one all-to-all so that
    gloo runs it too)."""

    @staticmethod
    def forward(ctx, x, group, stats):  # type: ignore[override]
        world, _ = _world(group)
        ctx.group, ctx.stats, ctx.world = group, stats, world
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        if stats is not None:
            stats["forward"] = stats.get("forward", 0) + (world - 1) * x.numel() * x.element_size()
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        got = torch.empty_like(grad)
        dist.all_to_all_single(got, grad, group=ctx.group)
        if ctx.stats is not None:
            n = grad[0].numel() * grad.element_size() * (ctx.world - 1)
            ctx.stats["backward"] = ctx.stats.get("backward", 0) + n
        return got.sum(0), None, None


def lasp(
    op: Callable[..., tuple[torch.Tensor, Any]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *args: torch.Tensor,
    group: Any = None,
    stats: dict[str, float] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Run a linear op of :mod:`effarch.linear` on a sequence sharded contiguously over the
    ranks of ``group``: LASP-2 (module docstring).

    ``op`` is one of ``linear_attention``, ``retention``, ``simple_gla``, ``gla``,
    ``delta_rule``, ``gated_delta_rule``, ``dplr_delta_rule``; ``q, k, v`` and the op's
    per-token ``args`` (gates, ``beta``, ...) are this rank's shard ``[B, T/P, H, ...]``
    (:func:`shard_sequence` with ``layout="contiguous"``); ``kwargs`` go to the op (``scale``,
    ``mode``, ``chunk_size``). Returns ``(o, S)``: this rank's outputs ``[B, T/P, H, V]``,
    equal to its slice of ``op`` on the whole sequence, and the state after its tokens
    ``[B, H, K, V]`` (on the last rank, the sequence's final state).

    The transition ``M_r`` of the shard is read off the op itself: the state is affine in the
    initial state, so running the shard with zero values from ``S_in = I`` gives ``M_r I``
    (from a column of ones when ``M_r`` is diagonal). The shard is then run again from the
    gathered initial state; LASP-2's kernels instead add the inter-shard term
    ``q_t^T (decay) h_r`` to the intra-shard output, the same numbers with less work.
    fla: ``fla.ops.*`` with ``initial_state=h_r``; LASP-2's ``lasp2`` on its all-gather.
    """
    name = getattr(op, "__name__", None)
    if name not in TRANSITIONS or getattr(linear, name, None) is not op:
        raise TypeError(f"op must be one of effarch.linear's {sorted(TRANSITIONS)}, got {op!r}")
    for bad in ("initial_state", "output_final_state"):
        if bad in kwargs:
            raise ValueError(f"lasp sets {bad} itself; got {bad}={kwargs[bad]!r}")
    if kwargs.get("normalize"):
        raise ValueError("lasp needs an unnormalised op: got normalize=True")
    world, rank = _world(group)
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    _, s_r = op(q, k, v, *args, output_final_state=True, **kwargs)  # from a zero state
    kind = TRANSITIONS[name]
    parts = [s_r.flatten(2)]
    if kind == "diagonal":
        ones = torch.ones(b, h, dk, 1, dtype=q.dtype, device=q.device)
        _, m = op(q, k, v.new_zeros(b, t, h, 1), *args, initial_state=ones,
                  output_final_state=True, **kwargs)  # fmt: skip
        parts.append(m.flatten(2))
    elif kind == "full":
        eye = torch.eye(dk, dtype=q.dtype, device=q.device).expand(b, h, dk, dk)
        _, m = op(q, k, v.new_zeros(b, t, h, dk), *args, initial_state=eye,
                  output_final_state=True, **kwargs)  # fmt: skip
        parts.append(m.flatten(2))
    payload = torch.cat(parts, -1)
    gathered = _AllGather.apply(payload, group, stats) if world > 1 else payload[None]
    # zero, but computed from the gathered pairs: rank 0 uses none of them, yet its backward
    # must take part in the exchange's reverse (a collective every rank joins)
    state = 0 * gathered[..., : dk * dv].sum(0).reshape(b, h, dk, dv)
    for j in range(rank):  # h_{j+1} = M_j h_j + S_j
        s_j = gathered[j][..., : dk * dv].reshape(b, h, dk, dv)
        if kind == "identity":
            state = state + s_j
        elif kind == "diagonal":
            state = gathered[j][..., dk * dv :, None] * state + s_j
        else:
            state = gathered[j][..., dk * dv :].reshape(b, h, dk, dk) @ state + s_j
    o, final = op(q, k, v, *args, initial_state=state, output_final_state=True, **kwargs)
    return o, final


def lasp_bytes(
    op_name: str, world: int, n_heads: int, key_dim: int, value_dim: int, bytes_per: int = 4,
    batch: int = 1,
) -> dict[str, int]:  # fmt: skip
    """Bytes one rank sends in :func:`lasp`, modelled: ``(P - 1)`` copies of its state
    ``B H K V`` plus its transition (``0``, ``B H K`` or ``B H K^2`` numbers) forward, and as
    many in the backward reduce-scatter. Independent of the sequence length. ``bytes_per``
    is the state's element size: 4 by default, since the book's linear ops (as fla's) return
    float32 states for 16-bit inputs. The payload is what a rank hands the all-gather; the
    ``P - 1`` copies are the factor of a ring all-gather, which forwards each shard once."""
    kind = check_choice("op_name", op_name, sorted(TRANSITIONS))
    extra = {"identity": 0, "diagonal": key_dim, "full": key_dim * key_dim}[TRANSITIONS[kind]]
    n = (world - 1) * batch * n_heads * (key_dim * value_dim + extra) * bytes_per
    return {"forward": n, "backward": n}


# --------------------------------------------------------------------------------------------
# The worker the tests and chapter 9.2 spawn
# --------------------------------------------------------------------------------------------


def _case_layout(case: dict[str, Any]) -> str:
    """How a case's sequence is sharded: its ``layout`` for the ring, contiguous for LASP."""
    return case.get("layout", "zigzag") if case["kind"] == "ring" else "contiguous"


def check_context_parallel(
    rank: int, world: int, port: int, out_dir: str, config: dict[str, Any]
) -> None:
    """Worker for :func:`~effarch.dist.spawn`: run each of ``config["cases"]`` on this rank's
    shard and save, per case, its output, the gradients of ``(out * dout).sum()`` and the
    bytes sent, to ``out_dir/rank{rank}.pt``.

    A case is a dict: ``kind`` (``"ring"`` or ``"lasp"``), ``inputs`` (the whole sequence's
    tensors ``[B, T, ...]``, in the order the function takes them), ``dout`` (whole), ``kwargs``
    and, for ``"ring"``, ``layout``; for ``"lasp"``, ``op`` (the function).
    """
    with process_group(rank, world, port):
        results = []
        for case in config["cases"]:
            layout = _case_layout(case)
            mine = [
                shard_sequence(x, world, rank, layout).clone().requires_grad_()
                for x in case["inputs"]
            ]
            stats: dict[str, float] = {}
            if case["kind"] == "ring":
                out = ring_attention(*mine, layout=layout, stats=stats, **case["kwargs"])
            else:
                out, _ = lasp(case["op"], *mine, stats=stats, **case["kwargs"])
            (out * shard_sequence(case["dout"], world, rank, layout)).sum().backward()
            results.append(
                {"out": out.detach(), "grads": [x.grad for x in mine], "bytes": dict(stats)}
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def context_parallel_errors(cases: list[dict[str, Any]], ranks: list[list[dict]]) -> list[float]:
    """Compare a :func:`check_context_parallel` run with one process doing the whole sequence.

    ``cases`` are the cases the workers ran, ``ranks[r]`` the list rank ``r`` saved (one
    entry per case, in order). For each case the single process runs
    :func:`~effarch.attention.naive_attention` (``"ring"``, with the case's ``causal`` and
    ``softmax_scale``) or
    the case's ``op`` (``"lasp"``) on the whole inputs and back-propagates
    ``(out * dout).sum()``; the ranks' outputs and input gradients are put back in sequence
    order with :func:`unshard_sequence`. Returns, per case, the largest absolute difference
    over the output and every input's gradient (ring attention's merges and LASP's folded
    states reorder sums, so expect rounding, ``~1e-15`` in float64).
    """
    if len(ranks) < 1 or any(len(r) != len(cases) for r in ranks):
        got = [len(r) for r in ranks]
        raise ValueError(
            f"ranks must hold one result per case for each rank ({len(cases)} cases), got {got}"
        )
    errors = []
    for i, case in enumerate(cases):
        layout = _case_layout(case)
        xs = [x.detach().clone().requires_grad_() for x in case["inputs"]]
        if case["kind"] == "ring":
            kw = case["kwargs"]
            out = naive_attention(*xs, causal=kw.get("causal", True), scale=kw.get("softmax_scale"))
        else:
            out, _ = case["op"](*xs, **case["kwargs"])
        (out * case["dout"]).sum().backward()
        want = [out.detach()] + [x.grad for x in xs]
        got = [unshard_sequence([r[i]["out"] for r in ranks], layout)]
        got += [unshard_sequence([r[i]["grads"][j] for r in ranks], layout) for j in range(len(xs))]
        errors.append(max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)))
    return errors
