r"""Hybrid models (chapter 6.1): token mixers and FFNs chosen per layer by a pattern.

A :class:`HybridLM` is a pre-norm decoder whose layer ``l`` runs the mixer named by the letter
``pattern[l]`` and the FFN named by ``ffn[l]``::

    HybridLM(257, 64, "MMMAMMMM", {"A": ("attention", {}), "M": ("mamba", {})}, ffn="DE")

Letters map to any mixer of :data:`~effarch.models.MIXERS` (with its keyword arguments);
FFN letters are ``D`` (dense SwiGLU), ``E`` (:class:`~effarch.moe.MoELayer`) and ``-``
(none), the string repeated to the number of layers. ``tied`` names letters whose layers
share one mixer module: Zamba's single attention block applied at several depths (each use
keeps its own cache, since it sees different inputs).

Decoding keeps, per layer, the memory its kind needs (:meth:`HybridLM.new_cache`): a
:class:`~effarch.attention.KVCache` for softmax attention, a window buffer
(:class:`~effarch.attention.WindowKVCache`) for sliding-window attention, the recurrent
state for linear attention and SSMs. ``model(ids, cache)`` consumes any number of new tokens
and updates the cache in place; token-by-token decoding equals the full forward (tested).

:data:`HYBRIDS` holds the layouts of the published hybrids, in the terms of their
``transformers`` configurations:

- ``jamba``: one attention layer in eight (``attn_layer_period=8``, ``attn_layer_offset=4``)
  among Mamba layers, an MoE FFN every other layer (``expert_layer_period=2``,
  ``expert_layer_offset=1``);
- ``samba``: Mamba and sliding-window attention alternating, a dense FFN after each;
- ``minimax``: lightning (linear, decayed) attention with softmax attention every eighth
  layer (MiniMax-01's ``layer_types``: ``linear_attention`` then ``full_attention``);
- ``zamba``: Mamba-2 layers with one shared (tied) attention layer every sixth layer, the
  period of Zamba2's ``hybrid_layer_ids`` (the layers its ``layers_block_type`` marks
  ``"hybrid"``: 6, 12, ..., 42, then 47 and 51 in its default 54 layers, one layer later
  than here) and of Zamba's ``attn_layer_period=6`` (after three fixed layers: 2, 7, 13,
  ...). A simplification of Zamba2: there, a
  hybrid layer runs the shared transformer block (attention, then its own MLP, over
  ``concat(hidden, original embeddings)``, ``2 d`` wide, RoPE off by default:
  ``use_mem_rope=False``) and adds its output, through a per-layer linear, to the input of
  that layer's own Mamba layer (not to the residual stream), and its Mamba layers have no
  MLP. Here the ``S`` layer *replaces* the Mamba layer by the shared attention (with RoPE)
  on the hidden state alone, and ``ffn="D"`` gives every layer, Mamba layers included, a
  dense FFN of its own (the ``S`` layers' FFNs are not tied, only the mixer). The per-use
  LoRA adapters are not modelled: those on the shared attention's ``q, k, v`` are off by
  default (``use_shared_attention_adapter=False``), while ``transformers`` always builds the
  ones on the shared MLP's gate and up projection.

:class:`YOCOLM` is You Only Cache Once (Sun et al., 2024): a self-decoder of efficient layers
(sliding-window attention, or any recurrent mixer), then one key/value projection of its
output, cached once, which every layer of the cross-decoder attends to with its own queries:
the KV cache of one layer instead of one per layer.

:func:`decode_memory` and :func:`decode_step_time` measure what decoding holds and how long a
step takes as the context grows (chapters 6.1 and 6.2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..attention import KVCache, apply_rope, sdpa_attention
from ..bench import best_of_rounds, tensor_bytes
from ..moe import MoELayer
from ..nn import ShortConvolution, SwiGLU
from .block import PreNormBlock, RecurrentState
from .mixers import MIXERS, carries_state, mixer_state_size, mixes_neighbours

__all__ = [
    "HYBRIDS",
    "HybridCache",
    "HybridLM",
    "RecurrentState",
    "YOCOLM",
    "cache_bytes",
    "decode_memory",
    "decode_step_time",
]

FFN_KINDS = {"D": "dense SwiGLU", "E": "MoE", "-": "none"}

HYBRIDS: dict[str, dict[str, Any]] = {
    "jamba": {"pattern": "MMMMAMMM", "ffn": "DE",
              "mixers": {"A": ("attention", {}), "M": ("mamba", {})}},
    "samba": {"pattern": "MS", "ffn": "D",
              "mixers": {"M": ("mamba", {}), "S": ("sliding_window", {"window": 16})}},
    "minimax": {"pattern": "LLLLLLLA", "ffn": "D",
                "mixers": {"L": ("retnet", {}), "A": ("attention", {})}},
    # Zamba2's hybrid layer adds the shared block to a Mamba layer's input, and its Mamba
    # layers have no MLP; "S" replaces a Mamba layer and every layer has a dense FFN here
    # (module docstring)
    "zamba": {"pattern": "MMMMMS", "ffn": "D", "tied": "S",
              "mixers": {"M": ("mamba2", {}), "S": ("attention", {})}},
}  # fmt: skip
"""Published hybrid layouts: ``pattern``, ``ffn``, ``mixers`` (and ``tied``) for
:class:`HybridLM`; the pattern repeats to the number of layers (module docstring), which
:meth:`HybridLM.preset` requires to be a multiple of the layout's period."""


class HybridCache(list):
    """Per layer, the memory decoding needs (:meth:`HybridLM.new_cache`); ``started`` turns
    true after the first call (meta tokens are prepended once, before it). ``conv`` holds,
    per layer, the last inputs of the short convolution before its mixer (``None`` where
    the layer has none, or before the first call)."""

    started: bool = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.conv: list[torch.Tensor | None] = []


def _repeat(letters: str, n: int, name: str) -> str:
    """``letters`` repeated and cut to ``n`` layers; a cut inside a period is allowed (the
    documented repetition), dropping letters of the first period is not."""
    if not isinstance(letters, str) or not letters:
        raise ValueError(f"{name} must be a non-empty string of letters, got {letters!r}")
    if n < len(letters):
        raise ValueError(
            f"n_layers must be at least the length of {name} ({len(letters)}: {letters!r}), "
            f"got {n}: layers of the {name} would be dropped"
        )
    return (letters * n)[:n]


class HybridLM(nn.Module):
    r"""A decoder whose mixers and FFNs follow a layer pattern (module docstring).

    Args:
        vocab_size: ``V``.
        d_model: width ``d``.
        pattern: one letter per layer; its length is the number of layers unless
            ``n_layers`` repeats it.
        mixers: letter -> ``(name in MIXERS, keyword arguments)``.
        ffn: FFN letters (``D``, ``E``, ``-``), repeated to the number of layers.
        n_layers: layers (default: ``len(pattern)``); the pattern and ``ffn`` repeat and
            are cut to ``n_layers`` (``"MA"`` over 3 layers is ``"MAM"``); ``n_layers``
            smaller than ``len(pattern)`` or ``len(ffn)`` raises ``ValueError``, since
            letters of the pattern would be dropped.
        d_ff: the dense FFN's width (default ``2 d``); also the experts' width unless
            ``moe_kwargs`` sets ``d_ff``.
        moe_kwargs: :class:`~effarch.moe.MoELayer` arguments for ``E`` layers (``n_experts``
            and ``k`` at least).
        tied: letters whose layers share one mixer module (Zamba's shared block).
        meta_tokens: learnable vectors prepended to every sequence before the first layer and
            dropped from the output (Hymba's meta tokens: a learned prefix that attention can
            rest on and that primes the recurrent states); 0 for none.
        tie_embeddings: the head reuses the embedding matrix.
        short_conv: width ``W`` of a causal depthwise convolution over the last ``W`` tokens
            put before every mixer that does not already mix neighbouring tokens
            (:func:`~effarch.models.mixes_neighbours`: attention, sliding windows, MLA, linear
            attention, RetNet, GLA), as :class:`~effarch.models.TinyLM` does and as
            fla's layers do with ``use_short_conv``; ``0`` (the default) for none. Its last
            ``W - 1`` inputs are part of the decoding cache (``HybridCache.conv``).

    ``forward(input_ids [B, T], cache=None) -> logits [B, T, V]``; with a cache from
    :meth:`new_cache` the tokens continue the cached ones.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        pattern: str,
        mixers: Mapping[str, tuple[str, Mapping[str, Any]]],
        *,
        ffn: str = "D",
        n_layers: int | None = None,
        d_ff: int | None = None,
        moe_kwargs: Mapping[str, Any] | None = None,
        tied: str = "",
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        meta_tokens: int = 0,
        short_conv: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("short_conv", short_conv, allow_zero=True)
        check_positive_int("d_model", d_model)
        n = len(pattern) if n_layers is None else check_positive_int("n_layers", n_layers)
        self.pattern = _repeat(pattern, n, "pattern")
        self.ffn_pattern = _repeat(ffn, n, "ffn")
        if not isinstance(mixers, Mapping):
            raise TypeError(f"mixers must map letters to (name, kwargs), got {type(mixers)}")
        for letter in sorted(set(self.pattern)):
            spec = mixers.get(letter)
            if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0] in MIXERS):
                raise ValueError(
                    f"mixers[{letter!r}] must be (a name of {sorted(MIXERS)}, kwargs), got {spec!r}"
                )
        bad = sorted(set(self.ffn_pattern) - set(FFN_KINDS))
        if bad:
            raise ValueError(f"ffn letters must be in {sorted(FFN_KINDS)}, got {bad}")
        moe = dict(moe_kwargs or {})
        if "E" in self.ffn_pattern and not {"n_experts", "k"} <= moe.keys():
            raise ValueError(f"ffn 'E' needs moe_kwargs with n_experts and k, got {moe}")
        d_ff = 2 * d_model if d_ff is None else check_positive_int("d_ff", d_ff)
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n
        self.mixers_spec = {k: (v[0], dict(v[1])) for k, v in mixers.items()}
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        check_positive_int("meta_tokens", meta_tokens, allow_zero=True)
        self.meta = (
            nn.Parameter(torch.randn(meta_tokens, d_model) * d_model**-0.5) if meta_tokens else None
        )
        shared: dict[str, nn.Module] = {}
        blocks = []
        for letter, f in zip(self.pattern, self.ffn_pattern, strict=True):
            name, kwargs = self.mixers_spec[letter]
            if letter in tied and letter in shared:
                mixer = shared[letter]
            else:
                mixer = shared[letter] = MIXERS[name](d_model, **kwargs)
            if f == "D":
                mlp: nn.Module | None = SwiGLU(d_model, d_ff)
            elif f == "E":
                expert_kw = {k: v for k, v in moe.items() if k != "d_ff"}
                mlp = MoELayer(d_model, moe.get("d_ff", d_ff), **expert_kw)
            else:
                mlp = None
            width = 0 if mixes_neighbours(mixer) else short_conv
            conv = ShortConvolution(d_model, width, activation=False) if width else None
            blocks.append(PreNormBlock(d_model, mixer, mlp, conv=conv, eps=norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)

    @classmethod
    def preset(cls, name: str, vocab_size: int, d_model: int, n_layers: int, **kw: Any) -> HybridLM:
        """The layout ``HYBRIDS[name]`` at this size; ``kw`` overrides its arguments.

        ``n_layers`` must be a positive multiple of the layout's period (the least common
        multiple of the lengths of its ``pattern`` and ``ffn``: 8 for Jamba, 2 for Samba, 8
        for MiniMax, 6 for Zamba), or the model would not be the named layout (Jamba over
        4 layers would have no attention layer): ``ValueError`` otherwise.
        """
        if name not in HYBRIDS:
            raise ValueError(f"name must be one of {sorted(HYBRIDS)}, got {name!r}")
        check_positive_int("n_layers", n_layers)
        spec = {**HYBRIDS[name], **kw}
        pattern, ffn = spec["pattern"], spec.get("ffn", "D")
        if isinstance(pattern, str) and isinstance(ffn, str) and pattern and ffn:
            period = math.lcm(len(pattern), len(ffn))
            if n_layers % period:
                raise ValueError(
                    f"n_layers must be a positive multiple of the period of {name!r} "
                    f"({period}: pattern {pattern!r}, ffn {ffn!r}), got {n_layers}"
                )
        return cls(vocab_size, d_model, n_layers=n_layers, **spec)

    def new_cache(self, batch: int, max_len: int) -> HybridCache:
        """Per layer, the memory decoding needs: the mixer's own cache when it has
        ``new_cache`` (attention: a KV cache; sliding window: a window buffer), else a
        :class:`RecurrentState` for mixers that carry a state."""
        check_positive_int("batch", batch)
        check_positive_int("max_len", max_len)
        max_len += 0 if self.meta is None else self.meta.shape[0]
        caches = HybridCache()
        for block in self.blocks:
            mixer = block.mixer
            if hasattr(mixer, "new_cache"):
                caches.append(mixer.new_cache(batch, max_len))
            elif carries_state(mixer):
                caches.append(RecurrentState())
            else:
                raise ValueError(f"mixer {type(mixer).__name__} cannot decode with a cache")
        caches.conv = [None] * len(self.blocks)
        return caches

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long, torch.int32))
        n = len(self.blocks)
        if cache is not None and (not isinstance(cache, HybridCache) or len(cache) != n):
            got = f"{type(cache).__name__} of {len(cache)}" if isinstance(cache, list) else cache
            raise ValueError(f"cache must be this model's new_cache() ({n} layers), got {got}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.vocab_size}), got [{lo}, {hi}]"
            )
        h = self.embed(input_ids)
        prefix = self.meta is not None and (cache is None or not cache.started)
        if prefix:
            h = torch.cat([self.meta.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        for i, block in enumerate(self.blocks):
            if cache is None:
                h = block(h)[0]
            else:
                h, cache.conv[i] = block(h, cache[i], cache.conv[i])
        if cache is not None:
            cache.started = True
        if prefix:
            h = h[:, self.meta.shape[0] :]
        h = self.norm(h)
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)

    def state_sizes(self, seq_len: int) -> list[int]:
        """Per layer, :func:`~effarch.models.mixer_state_size` after ``seq_len`` tokens."""
        return [mixer_state_size(b.mixer, seq_len) for b in self.blocks]

    def num_parameters(self) -> int:
        """Trainable parameters, each shared module counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, ffn={self.ffn_pattern!r}"


def cache_bytes(cache: Sequence[Any]) -> list[int]:
    """Bytes each layer's cache holds now: ``nbytes()`` of each entry, plus the inputs its
    short convolution keeps (``HybridCache.conv``)."""
    conv = getattr(cache, "conv", [])
    return [
        c.nbytes() + (tensor_bytes(conv[i]) if i < len(conv) else 0) for i, c in enumerate(cache)
    ]


class _CrossLayer(nn.Module):
    """A cross-decoder layer of YOCO: its own queries on the shared keys and values, then an
    FFN; attention is causal (bottom-right aligned when decoding)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_ff: int, eps: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.attn_norm = nn.RMSNorm(d_model, eps=eps)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(
        self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor:
        b, t, _ = h.shape
        q = self.q_proj(self.attn_norm(h)).view(b, t, self.n_heads, self.head_dim)
        q = apply_rope(q, torch.arange(start, start + t, device=h.device))
        o = sdpa_attention(q, k, v, causal=True, scale=self.head_dim**-0.5)
        h = h + self.o_proj(o.reshape(b, t, -1))
        return h + self.mlp(self.mlp_norm(h))


class YOCOLM(nn.Module):
    r"""You Only Cache Once: a self-decoder, one shared KV cache, a cross-decoder.

    ``h = SelfDecoder(Embed(x))`` (``n_layers / 2`` blocks of ``self_mixer``, each with an
    FFN); ``K = RoPE(W_K RMSNorm(h))``, ``V = W_V RMSNorm(h)`` with ``G = n_kv_heads`` heads,
    computed and cached once; then ``n_layers / 2`` cross-decoder layers, each
    ``h += W_O attn(RoPE(W_Q^l RMSNorm(h)), K, V)`` (causal) and an FFN.

    Args:
        vocab_size, d_model, n_layers: as :class:`HybridLM` (``n_layers`` even).
        n_heads, n_kv_heads: the cross-decoder's query heads and the shared cache's heads.
        self_mixer: ``(name in MIXERS, kwargs)`` of the self-decoder (YOCO uses sliding-window
            attention or gated retention).
        d_ff: FFN width (default ``2 d``).

    ``forward(input_ids, cache=None)``; :meth:`new_cache` holds the self-decoder's caches and
    the one shared :class:`~effarch.attention.KVCache` (its last entry).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        *,
        n_heads: int,
        n_kv_heads: int | None = None,
        self_mixer: tuple[str, Mapping[str, Any]] = ("sliding_window", {"window": 16}),
        d_ff: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_int("n_layers", n_layers)
        if n_layers % 2:
            raise ValueError(
                f"n_layers must be even (half self-, half cross-decoder), got {n_layers}"
            )
        check_positive_int("n_heads", n_heads)
        g = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        if d_model % n_heads or n_heads % g:
            raise ValueError(
                f"n_heads must divide d_model={d_model} and be a multiple of n_kv_heads={g}, "
                f"got n_heads={n_heads}"
            )
        d_ff = 2 * d_model if d_ff is None else check_positive_int("d_ff", d_ff)
        self.self_decoder = HybridLM(
            vocab_size, d_model, "S", {"S": self_mixer}, n_layers=n_layers // 2, d_ff=d_ff,
            norm_eps=norm_eps,
        )  # fmt: skip
        self.vocab_size, self.n_kv_heads, self.head_dim = vocab_size, g, d_model // n_heads
        self.kv_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.k_proj = nn.Linear(d_model, g * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, g * self.head_dim, bias=False)
        self.cross = nn.ModuleList(
            _CrossLayer(d_model, n_heads, self.head_dim, d_ff, norm_eps)
            for _ in range(n_layers // 2)
        )
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def new_cache(self, batch: int, max_len: int) -> HybridCache:
        """The self-decoder's caches, then the shared KV cache (one layer's worth)."""
        cache = self.self_decoder.new_cache(batch, max_len)
        w = self.k_proj.weight
        cache.append(KVCache(batch, max_len, self.n_kv_heads, self.head_dim, dtype=w.dtype,
                             device=w.device))  # fmt: skip
        return cache

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        n_self = len(self.self_decoder.blocks)
        if cache is not None and (not isinstance(cache, HybridCache) or len(cache) != n_self + 1):
            raise ValueError("cache must be this model's new_cache()")
        sd = self.self_decoder
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long, torch.int32))
        h = sd.embed(input_ids)
        for i, block in enumerate(sd.blocks):
            if cache is None:
                h = block(h)[0]
            else:
                h, cache.conv[i] = block(h, cache[i], cache.conv[i])
        b, t, _ = h.shape
        u = self.kv_norm(h)
        start = 0 if cache is None else cache[-1].length
        k = self.k_proj(u).view(b, t, self.n_kv_heads, self.head_dim)
        k = apply_rope(k, torch.arange(start, start + t, device=h.device))
        v = self.v_proj(u).view(b, t, self.n_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache[-1].update(k, v)
            cache.started = True
        for layer in self.cross:
            h = layer(h, k, v, start)
        return F.linear(self.norm(h), sd.embed.weight)


@torch.no_grad()
def decode_memory(
    model: HybridLM | YOCOLM, contexts: Sequence[int], *, batch: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Bytes each layer's decoding memory holds after each context length, measured.

    Random tokens are fed through ``model`` with a cache from its ``new_cache`` (in chunks up
    to each length of the increasing ``contexts``: a chunked prefill leaves the cache a
    token-by-token decode would), and :func:`cache_bytes` is read at each length.

    Returns:
        ``{"context": [...], "per_layer": [[bytes of each layer] per context], "total": [...]}``
        (for :class:`YOCOLM` the last layer entry is the shared KV cache).
    """
    lengths = [check_positive_int("contexts", int(c)) for c in contexts]
    if lengths != sorted(lengths):
        raise ValueError(f"contexts must be increasing, got {list(contexts)}")
    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, lengths[-1]), generator=gen)
    device = next(model.parameters()).device
    cache = model.new_cache(batch, lengths[-1])
    per_layer, done = [], 0
    for n in lengths:
        if n > done:
            model(ids[:, done:n].to(device), cache)
            done = n
        per_layer.append(cache_bytes(cache))
    return {"context": lengths, "per_layer": per_layer, "total": [sum(b) for b in per_layer]}


def _repeat_rows(obj: Any, n: int) -> Any:
    """``obj`` (a cache of one sequence: its tensors ``[1, ...]``, held in lists, dicts and
    attributes) with every tensor's single row repeated ``n`` times; lists, dicts and objects
    are changed in place, so pass a copy. A 0-dim tensor (a position counter that every row
    shares, as TTT's ``pos``) stays as it is."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim == 0:
            return obj
        if obj.shape[0] != 1:
            raise ValueError(f"a cache tensor of one sequence has 1 row, got {tuple(obj.shape)}")
        return obj.repeat(n, *([1] * (obj.ndim - 1)))
    if isinstance(obj, tuple):
        return tuple(_repeat_rows(x, n) for x in obj)
    if isinstance(obj, list):
        obj[:] = [_repeat_rows(x, n) for x in obj]
    elif isinstance(obj, dict):
        obj.update({k: _repeat_rows(v, n) for k, v in obj.items()})
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
        for key, value in list(vars(obj).items()):
            setattr(obj, key, _repeat_rows(value, n))
    return obj


@torch.no_grad()
def decode_step_time(
    models: Mapping[str, HybridLM | YOCOLM],
    contexts: Sequence[int],
    *,
    steps: int = 8,
    repeats: int = 3,
    chunk: int = 1024,
    threads: int | None = None,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, list[Any]]:
    """Seconds per decoding step after each context length, for several models, measured.

    A step feeds one new token to each of ``batch`` sequences (``input_ids [batch, 1]``).
    Each model's cache is filled for one sequence of random tokens up to each context ``T``
    in turn (a prefill in chunks of ``chunk`` tokens, not timed) and copied at every ``T``.
    A run repeats that copy's rows into a fresh cache of ``batch`` rows (a step reads and
    writes the same sizes whatever the values held, and the new tokens differ from row to
    row, so a router still sees distinct tokens; the prefill costs one row instead of
    ``batch``), decodes one token untimed (it brings the model and the cache into the
    processor's caches, which the previous run may have evicted),
    then ``steps`` tokens timed (tokens ``T + 2 .. T + steps + 1``); one sample is
    ``elapsed / steps``, and the result for a model and a context is
    ``min over the repeats of elapsed / steps``. Every round visits all contexts and all
    models in turn, so a slow spell of a shared machine falls on all of them alike, and the
    minimum is kept because disturbances only ever add time
    (:func:`~effarch.bench.best_of_rounds`). The garbage collector is off inside a run, and
    the device is synchronised around it.

    Args:
        models: name -> :class:`HybridLM` or :class:`YOCOLM` (in eval mode, on one device).
        contexts: increasing context lengths ``T``.
        steps: single-token steps per timed run.
        repeats: rounds; the minimum over them is reported.
        chunk: prefill chunk length (a chunked prefill leaves the cache a token-by-token one
            would, in memory bounded by ``chunk`` rows of scores).
        threads: CPU threads for the timed runs (:func:`~effarch.bench.cpu_threads`: small
            steps time most steadily on one); ``None`` keeps PyTorch's setting, and so does
            a model on a GPU. The untimed prefill always keeps it.
        batch, seed: sequences per step and the seed of the random tokens.

    Returns:
        ``{"context": [T, ...], name: [seconds per step at each T], ...}``.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError(f"models must be a non-empty mapping name -> model, got {models!r}")
    if "context" in models:
        raise ValueError("models must not use the name 'context' (the key of the lengths)")
    lengths = [check_positive_int("contexts", c) for c in contexts]
    if not lengths or lengths != sorted(set(lengths)):
        raise ValueError(f"contexts must be strictly increasing, got {list(contexts)}")
    check_positive_int("steps", steps)
    check_positive_int("repeats", repeats)
    check_positive_int("chunk", chunk)
    check_positive_int("batch", batch)
    if threads is not None:
        check_positive_int("threads", threads)
    filled: dict[tuple[str, int], tuple[Any, torch.Tensor]] = {}
    for name, model in models.items():
        if not isinstance(model, (HybridLM, YOCOLM)):
            raise TypeError(f"models[{name!r}] must be a HybridLM or YOCOLM, got {type(model)}")
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        size = (batch, lengths[-1] + steps + 1)
        ids = torch.randint(0, model.vocab_size, size, generator=gen).to(device)
        cache, done = model.new_cache(1, lengths[-1] + steps + 1), 0
        for t in lengths:
            for lo in range(done, t, chunk):
                model(ids[:1, lo : min(t, lo + chunk)], cache)
            done = t
            filled[name, t] = copy.deepcopy(cache), ids[:, t : t + steps + 1]

    def prepare(name: str, t: int) -> Callable[[], Callable[[], None]]:
        def setup() -> Callable[[], None]:
            model, (cache, new) = models[name], filled[name, t]
            cache = _repeat_rows(copy.deepcopy(cache), batch)
            model(new[:, :1], cache)  # untimed: warms the caches

            def run() -> None:
                for s in range(1, steps + 1):
                    model(new[:, s : s + 1], cache)

            return run

        return setup

    device = next(next(iter(models.values())).parameters()).device
    runs = {(name, t): prepare(name, t) for t in lengths for name in models}
    best = best_of_rounds(runs, repeats=repeats, device=device, threads=threads)
    return {"context": lengths, **{n: [best[n, t] / steps for t in lengths] for n in models}}
