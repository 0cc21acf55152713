r"""Training-free KV-cache policies for decoding (chapter 3.3).

A decoder that keeps every key and value grows its cache by ``2 L G d_h`` numbers per token.
A policy caps the cache at a ``budget`` of tokens per layer and decides, after every step,
which cached tokens to drop (or, for Quest, which to read):

======================  ======================================================================
:class:`FullCache`      keep everything (the reference)
:class:`SlidingWindow`  the ``budget`` most recent tokens
:class:`StreamingLLM`   ``n_sink`` first tokens (the attention sinks) + the most recent; keys
                        are rotated by their *slot in the cache*, not their original position,
                        so the model never sees a distance larger than it was trained on
                        (Xiao et al., 2024)
:class:`H2O`            the ``recent`` newest tokens + the "heavy hitters" with the largest
                        attention accumulated since they arrived (Zhang et al., 2023). Newcomers
                        have had no time to gather score, hence the protected recent window;
                        ties go to the newer token
:class:`TOVA`           drop the token the current query attends to least, averaged over heads
:class:`Quest`          keep everything, but read only the pages (``page_size`` tokens) whose
                        upper bound ``sum_d max(q_d min_d, q_d max_d)`` on the score is largest,
                        per query head (Tang et al., 2024): saves reads, not memory
======================  ======================================================================

SnapKV (Li et al., 2024) compresses the prompt once, at the end of prefill:
:func:`snapkv_select` votes with the attention of the last ``window`` prompt queries (pooled
over neighbouring positions) and keeps the winners plus the window.

Eviction is shared by the heads of a layer (H2O originally decides per head; TOVA, like this
module, per layer, from the attention averaged over heads; one decision per layer keeps one
cache length per layer and the bookkeeping short), batch size 1.

:func:`decode` runs a Llama-family model token by token under a policy and returns the
negative log-likelihood of every next token, the tokens held and read at every step and,
on request, the attention mass the tokens read carry against the best possible choice of as
many (:class:`DecodeResult`); :func:`decode_nll` is its loss alone. :func:`llama_view` is
the adapter that reads
the weights of the book's :class:`~effarch.models.ByteLM` or of a ``transformers``
``LlamaForCausalLM`` (same module names), so the same policies run on either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .._checks import check_positive_int, check_tensor, check_token_ids
from ..attention import apply_rope

__all__ = [
    "H2O",
    "TOVA",
    "FullCache",
    "KVPolicy",
    "LayerCache",
    "LlamaView",
    "Quest",
    "SlidingWindow",
    "StreamingLLM",
    "DecodeResult",
    "decode",
    "decode_nll",
    "llama_view",
    "snapkv_select",
]


# --------------------------------------------------------------------------------------------
# The model, seen as a stack of Llama layers
# --------------------------------------------------------------------------------------------


@dataclass
class LlamaView:
    """What decoding needs from a Llama-family model: its modules and attention sizes."""

    embed: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    head_weight: torch.Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float


_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_plain_attention(layers: list[nn.Module]) -> None:
    """Reject attention layers with weights the policies would not apply (Qwen3's
    ``q_norm``/``k_norm``, an attention-sink parameter, ...): the decoding loop uses only
    ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``."""
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        extra = [name for name, _ in attn.named_parameters(recurse=False)]
        extra += [
            name
            for name, child in attn.named_children()
            if name not in _ATTENTION_MODULES and any(True for _ in child.parameters())
        ]
        if extra:
            raise TypeError(
                f"model.layers[{i}].self_attn must hold weights only in "
                f"{', '.join(_ATTENTION_MODULES)} (the policies apply nothing else), got "
                f"{', '.join(extra)} ({type(attn).__name__})"
            )


def llama_view(model: nn.Module) -> LlamaView:
    """Adapter: the modules of an :class:`~effarch.models.ByteLM` or of a ``transformers``
    Llama-family causal LM (``model.model.layers[i].self_attn.q_proj`` ..., rotate-half RoPE).

    For ``transformers``, ``config.head_dim``, ``num_attention_heads``, ``num_key_value_heads``
    and ``rope_theta`` (or ``rope_parameters["rope_theta"]``) give the sizes; the LM head is
    ``lm_head``.

    Only what the decoding loop reproduces is accepted: an attention layer whose weights lie
    outside ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Qwen3's ``q_norm``/``k_norm``)
    raises ``TypeError``, and a scaled RoPE (any ``rope_type`` but ``"default"`` in
    ``config.rope_parameters``, transformers v5, or ``config.rope_scaling``, transformers 4.x)
    raises ``ValueError``. Llama and SmolLM2 (plain RoPE) pass.
    """
    if hasattr(model, "cfg") and hasattr(model, "embed_tokens"):  # ByteLM
        _check_plain_attention(list(model.layers))
        attn = model.layers[0].self_attn
        return LlamaView(model.embed_tokens, list(model.layers), model.norm,
                         model.embed_tokens.weight, attn.n_heads, attn.n_kv_heads,
                         attn.head_dim, attn.rope_base)  # fmt: skip
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if inner is None or config is None or not hasattr(inner, "layers"):
        raise TypeError(
            "model must be an effarch ByteLM or a transformers Llama-family causal LM "
            f"(model.model.layers, model.config), got {type(model).__name__}"
        )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    # transformers v5 keeps RoPE's settings in rope_parameters, 4.x its scaling in rope_scaling
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, key, None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"only plain RoPE is supported: config.{key} must have rope_type "
                             f"'default', got {kind!r}")  # fmt: skip
    _check_plain_attention(list(inner.layers))
    rope = getattr(config, "rope_parameters", None) or {}
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return LlamaView(inner.embed_tokens, list(inner.layers), inner.norm, model.lm_head.weight,
                     n_heads, config.num_key_value_heads, head_dim, float(base))  # fmt: skip


# --------------------------------------------------------------------------------------------
# The cache and the policies
# --------------------------------------------------------------------------------------------


@dataclass
class LayerCache:
    """One layer's cache: keys ``k [n, G, D]`` (rotated at their positions, or not rotated
    when the policy repositions), values ``v [n, G, D]``, original positions ``pos [n]``,
    attention accumulated since arrival ``score [n]`` (summed over heads and steps) and the
    current step's attention ``last [n]`` (mean over heads)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor
    last: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def __len__(self) -> int:
        return self.k.shape[0]

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the entries ``idx`` (sorted, so the cache stays in position order)."""
        idx = idx.sort().values
        self.k, self.v, self.pos = self.k[idx], self.v[idx], self.pos[idx]
        self.score, self.last = self.score[idx], self.last[idx]


class KVPolicy:
    """Base class: a ``budget`` of cached tokens per layer (``None``: unbounded).

    ``reposition``: rotate keys by their slot in the cache at every step (StreamingLLM)
    instead of once, at their original position. ``scored``: the policy ranks tokens by
    attention, so it evicts after the step has attended (that step reads ``budget + 1``
    tokens, the new one included); rule-based policies evict before attending, so every
    step reads at most ``budget``. Between steps a layer holds at most ``budget`` either way.
    Subclasses override :meth:`evict` (which entries to keep once the cache holds more than
    ``budget``) and may override
    :meth:`read_mask` (which entries each query head reads this step).
    """

    reposition = False
    scored = False  # True: evicts by this step's attention, so after attending
    evicts = True  # False: the budget limits reads (read_mask), never what is kept

    def __init__(self, budget: int | None) -> None:
        self.budget = None if budget is None else check_positive_int("budget", budget)

    def evict(self, cache: LayerCache) -> torch.Tensor:
        """Indices of the entries to keep (called when ``len(cache) > budget``)."""
        raise NotImplementedError

    def read_mask(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor | None:
        """Bool ``[H, n]`` of the entries each head reads, or ``None`` for all."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget})"


class FullCache(KVPolicy):
    """Keep every token: the reference."""

    def __init__(self) -> None:
        super().__init__(None)


class SlidingWindow(KVPolicy):
    """The ``budget`` most recent tokens."""

    def evict(self, cache: LayerCache) -> torch.Tensor:
        return torch.arange(len(cache) - self.budget, len(cache), device=cache.k.device)


class StreamingLLM(KVPolicy):
    """``n_sink`` first tokens + the ``budget - n_sink`` most recent, positions by cache slot
    (``reposition=False`` keeps the original positions, to show why that fails)."""

    def __init__(self, budget: int, n_sink: int = 4, *, reposition: bool = True) -> None:
        super().__init__(budget)
        self.n_sink = check_positive_int("n_sink", n_sink, allow_zero=True)
        if self.n_sink >= budget:
            raise ValueError(f"n_sink must be less than budget={budget}, got {n_sink}")
        self.reposition = bool(reposition)

    def evict(self, cache: LayerCache) -> torch.Tensor:
        n = len(cache)
        return torch.cat(
            [torch.arange(self.n_sink), torch.arange(n - self.budget + self.n_sink, n)]
        ).to(cache.k.device)


def _top(values: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values``, ties to the larger (newer) position."""
    order = torch.argsort(pos, descending=True, stable=True)  # newest first
    best = torch.argsort(values[order], descending=True, stable=True)[:k]
    return order[best]


class H2O(KVPolicy):
    """The ``recent`` newest tokens + the ``budget - recent`` heavy hitters (accumulated
    attention since arrival) among the older ones."""

    scored = True

    def __init__(self, budget: int, recent: int | None = None) -> None:
        super().__init__(budget)
        self.recent = budget // 2 if recent is None else check_positive_int("recent", recent)
        if self.recent > budget:
            raise ValueError(f"recent must be at most budget={budget}, got {recent}")

    def evict(self, cache: LayerCache) -> torch.Tensor:
        n = len(cache)
        recent = torch.arange(n - self.recent, n, device=cache.k.device)
        older = n - self.recent
        heavy = _top(cache.score[:older], cache.pos[:older], self.budget - self.recent)
        return torch.cat([heavy, recent])


class TOVA(KVPolicy):
    """Drop the tokens the current query attends to least (mean over heads)."""

    scored = True

    def evict(self, cache: LayerCache) -> torch.Tensor:
        return _top(cache.last, cache.pos, self.budget)


class Quest(KVPolicy):
    """Read the pages with the largest score bound, per query head; keep everything.

    Pages are ``page_size`` consecutive cache entries; the page a query is in is always read.
    The bound ``sum_d max(q_d min_d, q_d max_d) >= q . k`` holds for every key of the page.
    """

    def __init__(self, budget: int, page_size: int = 16) -> None:
        super().__init__(budget)
        self.page_size = check_positive_int("page_size", page_size)
        self.evicts = False
        if budget < page_size:
            raise ValueError(f"budget must be at least page_size={page_size}, got {budget}")

    def read_mask(self, q: torch.Tensor, cache: LayerCache) -> torch.Tensor | None:
        n, p = len(cache), self.page_size
        if n <= self.budget:
            return None
        h, g = q.shape[0], cache.k.shape[1]
        n_pages = math.ceil(n / p)
        k = F.pad(cache.k, (0, 0, 0, 0, 0, n_pages * p - n))
        pages = rearrange(k, "(m p) g d -> m p g d", p=p)
        valid = (torch.arange(n_pages * p, device=q.device) < n).view(n_pages, p, 1, 1)
        kmax = pages.masked_fill(~valid, float("-inf")).amax(1)  # [m, G, D]
        kmin = pages.masked_fill(~valid, float("inf")).amin(1)
        kmax, kmin = (repeat(x, "m g d -> m (g r) d", r=h // g) for x in (kmax, kmin))
        bound = torch.maximum(q[None] * kmin, q[None] * kmax).sum(-1).T  # [H, m]
        bound[:, -1] = float("inf")  # the current page is always read
        top = bound.topk(min(self.budget // p, n_pages), dim=-1).indices
        chosen = torch.zeros(h, n_pages, dtype=torch.bool, device=q.device)
        chosen.scatter_(1, top, True)
        return repeat(chosen, "h m -> h (m p)", p=p)[:, :n]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _step_attention(
    view: LlamaView, layer: nn.Module, x: torch.Tensor, t: int, cache: LayerCache | None,
    policy: KVPolicy, shadow: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, LayerCache, tuple[float, float, float]]:  # fmt: skip
    """One token through one attention layer under ``policy``.

    Returns ``(out [1, d], cache, (read, kept, oracle))``: the tokens read (mean over heads)
    and, when ``shadow`` (this layer's keys at their original positions, every token) is
    given, the full-cache attention mass on the tokens read and on the oracle's as many.
    """
    attn, dh, h, g = layer.self_attn, view.head_dim, view.n_heads, view.n_kv_heads
    q = attn.q_proj(x).view(1, 1, h, dh)
    k = attn.k_proj(x).view(1, 1, g, dh)
    v = attn.v_proj(x).view(1, g, dh)
    pos = torch.tensor([t], device=x.device)
    rotated = apply_rope(k, pos, base=view.rope_base)[0]
    k = k[0] if policy.reposition else rotated
    if cache is None:
        zero = torch.zeros(1, dtype=x.dtype, device=x.device)
        cache = LayerCache(k, v, pos, zero, zero.clone())
    else:
        cache.k, cache.v = torch.cat([cache.k, k]), torch.cat([cache.v, v])
        cache.pos = torch.cat([cache.pos, pos])
        cache.score = torch.cat([cache.score, cache.score.new_zeros(1)])
        cache.last = torch.cat([cache.last, cache.last.new_zeros(1)])
    evicts = policy.budget is not None and policy.evicts
    if evicts and not policy.scored and len(cache) > policy.budget:
        cache.keep(policy.evict(cache))
    n = len(cache)
    q_at_t = apply_rope(q, pos, base=view.rope_base)[0, 0]  # [H, D]
    if policy.reposition:  # StreamingLLM: distances measured inside the cache
        slots = torch.arange(n, device=x.device)
        keys = apply_rope(cache.k[None], slots, base=view.rope_base)[0]
        q = apply_rope(q, slots[-1:], base=view.rope_base)[0, 0]
    else:
        keys, q = cache.k, q_at_t
    keys = repeat(keys, "n g d -> n (g r) d", r=h // g)
    s = torch.einsum("hd,nhd->hn", q, keys) * dh**-0.5
    read = policy.read_mask(q, cache)
    if read is not None:
        s = s.masked_fill(~read, float("-inf"))
    p = s.softmax(-1)  # [H, n]
    o = torch.einsum("hn,nhd->hd", p, repeat(cache.v, "n g d -> n (g r) d", r=h // g))
    counts = read.sum(-1) if read is not None else torch.full((h,), n, device=x.device)
    stats = (counts.float().mean().item(), math.nan, math.nan)
    if shadow is not None:  # the full cache's attention for the same query
        shadow.append(rotated)
        every = repeat(torch.cat(shadow), "n g d -> n (g r) d", r=h // g)
        full = (torch.einsum("hd,nhd->hn", q_at_t, every) * dh**-0.5).softmax(-1)  # [H, t+1]
        on_read = full[:, cache.pos] if read is None else full[:, cache.pos] * read
        ranked = full.sort(-1, descending=True).values.cumsum(-1)
        oracle = ranked.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
        stats = (stats[0], on_read.sum(-1).mean().item(), oracle.mean().item())
    cache.score = cache.score + p.sum(0).detach()
    cache.last = p.mean(0).detach()
    if evicts and policy.scored and n > policy.budget:
        cache.keep(policy.evict(cache))
    return attn.o_proj(o.reshape(1, h * dh)), cache, stats


@dataclass
class DecodeResult:
    """What :func:`decode` measured, one entry per decoding step ``t = 0 .. T - 2``.

    ``nll [T - 1]``: ``-log p(ids[t + 1] | the cache after ids[..t])`` in nats.
    ``held [T - 1]``: tokens cached per layer after the step (layer 0; all layers alike).
    ``read [T - 1, L]``: tokens each layer's query read at the step (mean over heads).
    ``kept_mass [T - 1, L]``: with ``recall=True``, the attention mass that the *full* cache
    would put on the tokens the policy read (same query, keys at their original positions,
    mean over heads); ``oracle_mass``: the largest mass any choice of as many tokens could
    hold (the full attention's top-``read``). ``NaN`` without ``recall``.
    """

    nll: torch.Tensor
    held: torch.Tensor
    read: torch.Tensor
    kept_mass: torch.Tensor
    oracle_mass: torch.Tensor

    def cache_bytes(self, view: LlamaView, bytes_per: int = 2) -> torch.Tensor:
        """Bytes of keys and values held after each step: ``2 L G d_h`` numbers a token."""
        return self.held * (2 * len(view.layers) * view.n_kv_heads * view.head_dim * bytes_per)


@torch.no_grad()
def decode(
    model: nn.Module, ids: torch.Tensor, policy: KVPolicy, *, recall: bool = False
) -> DecodeResult:
    """Feed ``ids`` one token at a time under ``policy``; score each next token.

    Args:
        model: a :class:`~effarch.models.ByteLM` or a ``transformers`` Llama-family causal LM
            (see :func:`llama_view`).
        ids: ``[T]`` or ``[1, T]`` int64 token ids, on the model's device.
        policy: a :class:`KVPolicy`.
        recall: also measure, at every step and layer, the full-cache attention mass on the
            tokens read against the oracle top-k (keeps a second, full set of keys: the cost
            of :class:`FullCache` on top of the policy's).

    Returns:
        a :class:`DecodeResult`.
    """
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"policy must be a KVPolicy, got {type(policy).__name__}")
    ids = check_token_ids("ids", ids)
    view = llama_view(model)
    n_layers = len(view.layers)
    caches: list[LayerCache | None] = [None] * n_layers
    shadows = [[] for _ in range(n_layers)] if recall else [None] * n_layers
    nll, held, stats = [], [], []
    for t in range(ids.numel() - 1):
        h = view.embed(ids[t : t + 1])  # [1, d]
        step = []
        for i, layer in enumerate(view.layers):
            a, caches[i], st = _step_attention(view, layer, layer.input_layernorm(h), t,
                                               caches[i], policy, shadows[i])  # fmt: skip
            step.append(st)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = view.norm(h) @ view.head_weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll.append(F.cross_entropy(logits, ids[t + 1 : t + 2]))
        held.append(len(caches[0]))
        stats.append(step)
    st = torch.tensor(stats, dtype=torch.float64)  # [T - 1, L, 3]
    return DecodeResult(torch.stack(nll), torch.tensor(held), st[..., 0], st[..., 1], st[..., 2])


def decode_nll(
    model: nn.Module, ids: torch.Tensor, policy: KVPolicy
) -> tuple[torch.Tensor, list[int]]:
    """:func:`decode`'s ``(nll [T - 1], held)``: the loss of every next token in nats and the
    tokens cached per layer after every step."""
    result = decode(model, ids, policy)
    return result.nll, result.held.tolist()


def snapkv_select(
    attention: torch.Tensor, budget: int, window: int = 16, kernel: int = 5
) -> torch.Tensor:
    """SnapKV's selection: which prompt tokens to keep, per key/value head.

    The last ``window`` queries vote with their attention on the earlier tokens, the votes
    are max-pooled over ``kernel`` neighbouring positions, and the ``budget - window``
    winners are kept with the window. Two differences from the reference code
    (FasterDecoding/SnapKV, ``SnapKVCluster.update_kv``): it pools with ``avgpool`` by
    default (``maxpool`` is its option), and it votes per *query* head (the keys are
    expanded by ``repeat_kv`` before the vote, so each query head keeps its own tokens);
    here the votes of the query heads of a group are summed, one choice per key/value head,
    and the pooling is max-pooling.

    Args:
        attention: ``[G, R, T, T]`` causal attention probabilities of the prompt, query heads
            grouped by their key/value head.
        budget: tokens kept per head, the ``window`` last ones included.
        window: the observation window: the last queries, whose attention votes.
        kernel: width of the max-pooling over positions that keeps neighbours of a winner:
            position ``j`` takes the largest vote of ``j - kernel // 2 .. j + (kernel - 1) //
            2`` (centred for an odd ``kernel``, one more on the left for an even one).

    Returns:
        ``keep [G, budget]`` sorted, distinct token indices per key/value head (equal votes:
        the earlier token wins), on the device of ``attention``.
    """
    check_tensor("attention", attention, ndim=4, floating=True)
    check_positive_int("budget", budget)
    check_positive_int("window", window)
    check_positive_int("kernel", kernel)
    t, dev = attention.shape[-1], attention.device
    if budget >= t:
        return torch.arange(t, device=dev).expand(attention.shape[0], t)
    if window >= budget:
        raise ValueError(f"window must be less than budget={budget}, got {window}")
    votes = attention[:, :, t - window :, : t - window].sum(dim=(1, 2))  # [G, T - window]
    votes = F.max_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    votes = votes[:, : t - window]  # an even kernel pools one position too many
    # max-pooling makes ties; a stable sort breaks them toward the earlier token
    chosen = torch.argsort(votes, dim=-1, descending=True, stable=True)[:, : budget - window]
    recent = torch.arange(t - window, t, device=dev).expand(attention.shape[0], window)
    return torch.cat([chosen, recent], dim=-1).sort(-1).values
