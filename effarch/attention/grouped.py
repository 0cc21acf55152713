"""Multi-head, grouped-query and multi-query attention in one module, with a KV cache.

With ``H`` query heads and ``G`` key/value heads (``G`` divides ``H``):

* MHA (Vaswani et al., 2017): ``G = H``, every query head has its own keys and values;
* GQA (Ainslie et al., 2023): ``1 < G < H``, query head ``h`` shares key/value head
  ``h // (H / G)``;
* MQA (Shazeer, 2019): ``G = 1``, all heads share one key and one value.

The KV cache shrinks by ``H / G``; the query side and the FLOPs of the scores do not.
The layout and weights follow ``transformers``' LLaMA attention (separate ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, rotate-half RoPE), so its weights can be copied in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from .._checks import check_heads, check_positive_int, check_same, check_tensor
from .naive import sdpa_attention
from .rope import apply_rope


def _check_cache_update(
    cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> int:
    """Check the new tokens of a cache update: ``k [B, T, G, D]`` and ``v [B, T, G, Dv]`` with
    the batch, heads and widths of the cache's ``cache_k [B, *, G, D]`` and ``cache_v``, the
    same ``T`` in both, and the cache's dtype and device (no silent broadcast or cast);
    return ``T``."""
    b, _, g, d = cache_k.shape
    dv = cache_v.shape[3]
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    if k.shape[0] != b or k.shape[2:] != cache_k.shape[2:]:
        raise ValueError(f"k must be [{b}, T, {g}, {d}] for this cache, got {tuple(k.shape)}")
    t = k.shape[1]
    if tuple(v.shape) != (b, t, g, dv):
        raise ValueError(
            f"v must be [B, T, G, Dv] = [{b}, {t}, {g}, {dv}] for this cache and k of shape "
            f"{tuple(k.shape)}, got {tuple(v.shape)}"
        )
    check_same(("the cache", "k", "v"), (cache_k, k, v))
    return t


class KVCache:
    """A preallocated key/value cache ``[B, max_len, G, D]``, filled left to right.

    ``update(k, v)`` writes the new tokens after the ``length`` already held and returns
    views of everything cached so far; ``truncate(n)`` forgets all but the first ``n``.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        head_dim_v: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, v in (("batch", batch), ("max_len", max_len), ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim)):  # fmt: skip
            check_positive_int(name, v)
        dv = head_dim if head_dim_v is None else check_positive_int("head_dim_v", head_dim_v)
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, max_len, n_kv_heads, dv, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k [B, T, G, D]`` and ``v [B, T, G, Dv]`` (the cache's batch, heads, widths,
        dtype and device); return the keys and values of every token held."""
        t = _check_cache_update(self.k, self.v, k, v)
        if self.length + t > self.max_len:
            raise ValueError(
                f"the cache holds at most max_len={self.max_len} tokens; it has "
                f"{self.length} and {t} more were given"
            )
        self.k[:, self.length : self.length + t] = k
        self.v[:, self.length : self.length + t] = v
        self.length += t
        return self.k[:, : self.length], self.v[:, : self.length]

    def truncate(self, length: int) -> None:
        check_positive_int("length", length, allow_zero=True)
        if length > self.length:
            raise ValueError(f"length must be at most the {self.length} tokens held, got {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the filled part of the cache (keys and values)."""
        per_token = (self.k[0, 0].numel() + self.v[0, 0].numel()) * self.k.element_size()
        return per_token * self.k.shape[0] * self.length


class WindowKVCache:
    """A key/value buffer for sliding-window attention: it keeps the last ``window - 1`` tokens.

    The interface of :class:`KVCache`: ``length`` counts every token seen (their positions
    for RoPE), ``update(k, v)`` returns the held tokens followed by the new ones, enough for
    each new query to see its last ``window`` keys under a bottom-right aligned window mask,
    and then forgets all but the last ``window - 1``. Memory is ``O(window)`` whatever the
    context (Mistral's rolling buffer; ``transformers``' ``DynamicSlidingWindowLayer``, 5.x
    ``cache_utils``, which likewise returns the held and new tokens, keeps the last
    ``window - 1`` and grows until it holds that many; its ``StaticSlidingWindowLayer``, the
    ``SlidingWindowLayer`` of 4.5x, instead preallocates a fixed buffer of ``window`` tokens).
    ``window=None`` keeps every token: a cache that grows without a preset ``max_len``.
    """

    def __init__(
        self,
        batch: int,
        window: int | None,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, v in (("batch", batch), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            check_positive_int(name, v)
        if window is not None:
            check_positive_int("window", window)
        self.window = window
        self.k = torch.zeros(batch, 0, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [B, T, G, D]`` (the cache's batch, heads, width, dtype and device);
        return the held tokens followed by the new ones."""
        _check_cache_update(self.k, self.v, k, v)
        k_all, v_all = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        # keep the last window - 1 (all of them without a window)
        first = 0 if self.window is None else max(0, k_all.shape[1] - (self.window - 1))
        self.k, self.v = k_all[:, first:], v_all[:, first:]
        self.length += k.shape[1]
        return k_all, v_all

    def nbytes(self) -> int:
        """Bytes held between calls (at most ``window - 1`` tokens' keys and values)."""
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


_PROJECTION_ATTRS = ("q_proj", "k_proj", "v_proj", "head_dim", "rope", "rope_base")


def project_qkv(
    layer: nn.Module, x: torch.Tensor, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads of an attention layer: ``q [B, T, H, D]``, ``k, v [B, T, G, D]``, RoPE applied.

    ``layer`` is a :class:`MultiHeadAttention`, or any module with its attribute names
    (``q_proj``, ``k_proj``, ``v_proj``, ``head_dim``, ``rope``, ``rope_base``), such as the
    linearized layer of :mod:`effarch.linear.linearize`; the tokens of ``x [B, T, d]`` sit at
    positions ``start .. start + T - 1`` (``start`` is the cache length when decoding).
    """
    missing = [a for a in _PROJECTION_ATTRS if not hasattr(layer, a)]
    if missing:
        raise TypeError(
            f"layer must be an attention layer with {list(_PROJECTION_ATTRS)}; "
            f"{type(layer).__name__} lacks {missing}"
        )
    check_tensor("x", x, ndim=3, floating=True)
    d_model = layer.q_proj.in_features
    if x.shape[-1] != d_model:
        raise ValueError(f"x must have d_model={d_model} features in dim 2, got {tuple(x.shape)}")
    check_positive_int("start", start, allow_zero=True)
    dh = layer.head_dim
    q = rearrange(layer.q_proj(x), "b t (h d) -> b t h d", d=dh)
    k = rearrange(layer.k_proj(x), "b t (g d) -> b t g d", d=dh)
    v = rearrange(layer.v_proj(x), "b t (g d) -> b t g d", d=dh)
    if layer.rope:
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        q = apply_rope(q, pos, base=layer.rope_base)
        k = apply_rope(k, pos, base=layer.rope_base)
    return q, k, v


class MultiHeadAttention(nn.Module):
    """MHA, GQA or MQA self-attention with RoPE and an optional KV cache.

    Args:
        d_model: model width ``d``.
        n_heads: query heads ``H``; ``head_dim = d_model // n_heads`` unless given.
        n_kv_heads: key/value heads ``G`` (default ``H``: MHA; ``1``: MQA).
        rope: apply rotary position embeddings to queries and keys.
        causal: mask future tokens (bottom-right aligned, so cached decoding works).
        attention: the attention function ``(q, k, v, *, causal, scale) -> o`` in the
            ``[B, T, H, D]`` layout: :func:`sdpa_attention` by default; ``naive_attention``,
            ``tiled_attention`` or ``flash_attention`` fit too.

    ``forward(x [B, T, d], cache=None) -> [B, T, d]``. With a :class:`KVCache`, the new
    tokens take positions ``cache.length ..`` and attend to everything cached; decoding
    token by token then equals one pass over the whole sequence.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        causal: bool = True,
        bias: bool = False,
        attention: Callable[..., torch.Tensor] = sdpa_attention,
    ) -> None:
        super().__init__()
        g, head_dim = check_heads(d_model, n_heads, n_kv_heads, head_dim)
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, g
        self.head_dim = head_dim
        self.rope, self.rope_base, self.causal, self.attention = rope, rope_base, causal, attention
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, g * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, g * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` shaped for this layer (dtype/device of its weights)."""
        w = self.k_proj.weight
        return KVCache(
            batch, max_len, self.n_kv_heads, self.head_dim, dtype=w.dtype, device=w.device
        )

    def state_size(self, seq_len: int) -> int:
        """KV-cache elements one sequence holds after ``seq_len = T`` tokens: ``2 T G dh``.

        Keys and values of every token, ``G = n_kv_heads`` heads of width ``dh = head_dim``
        (what :meth:`new_cache` fills); it grows with the context.
        """
        check_positive_int("seq_len", seq_len)
        return 2 * seq_len * self.n_kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = project_qkv(self, x, 0 if cache is None else cache.length)
        if cache is not None:
            k, v = cache.update(k, v)
        o = self.attention(q, k, v, causal=self.causal, scale=self.head_dim**-0.5)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))


def mha_to_gqa(layer: MultiHeadAttention, n_kv_heads: int) -> MultiHeadAttention:
    """Convert an attention layer to ``n_kv_heads`` key/value heads by mean-pooling.

    The key (and value) projection of each new head is the mean of the projections of the
    ``H / G`` old heads it replaces: the initialisation the GQA paper (Ainslie et al.,
    2023) uses before uptraining. Query and output projections are copied. Returns a new
    layer; the old one is unchanged.
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be a MultiHeadAttention, got {type(layer).__name__}")
    check_positive_int("n_kv_heads", n_kv_heads)
    if layer.n_kv_heads % n_kv_heads:
        raise ValueError(
            f"n_kv_heads ({n_kv_heads}) must divide the layer's {layer.n_kv_heads} kv heads"
        )
    new = MultiHeadAttention(
        layer.d_model, layer.n_heads, n_kv_heads, head_dim=layer.head_dim, rope=layer.rope,
        rope_base=layer.rope_base, causal=layer.causal, bias=layer.q_proj.bias is not None,
        attention=layer.attention,
    ).to(device=layer.q_proj.weight.device, dtype=layer.q_proj.weight.dtype)  # fmt: skip
    r = layer.n_kv_heads // n_kv_heads
    with torch.no_grad():
        new.q_proj.load_state_dict(layer.q_proj.state_dict())
        new.o_proj.load_state_dict(layer.o_proj.state_dict())
        for old, pooled in ((layer.k_proj, new.k_proj), (layer.v_proj, new.v_proj)):
            w = rearrange(old.weight, "(g r d) c -> g r d c", r=r, d=layer.head_dim)
            pooled.weight.copy_(rearrange(w.mean(1), "g d c -> (g d) c"))
            if old.bias is not None:
                b = rearrange(old.bias, "(g r d) -> g r d", r=r, d=layer.head_dim)
                pooled.bias.copy_(rearrange(b.mean(1), "g d -> (g d)"))
    return new
