r"""The transformer a diffusion LLM runs: the book's Llama-style decoder, mask made optional.

LLaDA is a Llama without the causal mask: every position reads every other, so a masked
token is predicted from both sides. :class:`DiffusionLM` is that model at book size::

    h   = E[x]                                                  # [B, T, d]
    h   = h + Attn(RMSNorm(h); mask)      # RoPE at `positions`, mask: none, causal, or any
    h   = h + SwiGLU(RMSNorm(h))
    out = RMSNorm(h) E^T                                        # tied head, [B, T, V]

The same class with ``causal=True`` is the autoregressive baseline of the same size, so the
two are compared at equal parameters. Block diffusion (7.2) needs two more things, both
arguments of :meth:`DiffusionLM.forward`: a ``mask_mod`` over the concatenation of the noisy
and the clean sequence, and ``positions`` that give both copies the same RoPE positions;
and a KV cache over the committed blocks (one :class:`~effarch.attention.KVCache` per layer).

Names follow ``transformers``' Llama (``embed_tokens``, ``self_attn.{q,k,v,o}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``norm``).
LLaDA's own modelling code (``modeling_llada.py``; LLaDA-8B's configuration has
``block_type="llama"``, so its blocks are ``LLaDALlamaBlock``) names them, with the same
arithmetic: ``transformer.wte`` (``embed_tokens``); per block ``attn_norm``
(``input_layernorm``), ``q_proj``, ``k_proj``, ``v_proj``, ``attn_out`` (``o_proj``),
``ff_norm`` (``post_attention_layernorm``), ``ff_proj`` (``gate_proj``: ``silu(ff_proj(x)) *
up_proj(x)``), ``up_proj`` and ``ff_out`` (``down_proj``); ``transformer.ln_f`` (``norm``).
Its fused ``att_proj`` (queries, keys and values in one projection) belongs to the
OLMo-style ``LLaDASequentialBlock``, not to LLaDA-8B's blocks. The head here is tied to the
embedding; LLaDA-8B unties it (``weight_tying=False``: a separate ``transformer.ff_out``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..attention import KVCache, apply_rope, sdpa_attention
from ..nn import SwiGLU
from ..sparse import MaskMod, dense_mask

__all__ = ["DiffusionLM", "DiffusionLMConfig"]


@dataclass(frozen=True)
class DiffusionLMConfig:
    """Sizes of a :class:`DiffusionLM`. ``vocab_size`` counts the mask token (LLaDA keeps it
    inside the vocabulary: id 126336 of 126464); ``causal=True`` makes it an AR model."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    rope_base: float = 10000.0
    causal: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads must divide d_model, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")


class _Attention(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, d // cfg.n_heads, cfg.rope_base
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x, positions, causal, keep, cache):
        heads = "b t (h d) -> b t h d"
        q = apply_rope(rearrange(self.q_proj(x), heads, d=self.head_dim), positions,
                       base=self.rope_base)  # fmt: skip
        k = apply_rope(rearrange(self.k_proj(x), heads, d=self.head_dim), positions,
                       base=self.rope_base)  # fmt: skip
        v = rearrange(self.v_proj(x), heads, d=self.head_dim)
        if cache is not None:  # the new tokens read every cached one and each other
            k, v = cache.update(k, v)
        # a pattern arrives as its boolean mask: SDPA equals sparse.masked_attention on it
        o = sdpa_attention(q, k, v, causal=causal and keep is None, mask=keep)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))


class _Layer(nn.Module):
    def __init__(self, cfg: DiffusionLMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, h, positions, causal, keep, cache):
        h = h + self.self_attn(self.input_layernorm(h), positions, causal, keep, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DiffusionLM(nn.Module):
    """The decoder of the module docstring: bidirectional by default, causal on request.

    ``forward(input_ids [B, T], *, positions=None, mask_mod=None, caches=None) -> [B, T, V]``:

    * ``positions [T]`` int64: the RoPE positions (default ``start + arange(T)``, ``start``
      the cached length); block diffusion gives the noisy and the clean copy the same ones.
    * ``mask_mod``: an attention pattern (:mod:`effarch.sparse.masks`' convention, query and
      key indices counted over this call's tokens); overrides ``cfg.causal``.
    * ``caches``: one :class:`~effarch.attention.KVCache` per layer (:meth:`new_caches`);
      the new tokens' keys and values are appended and the new tokens read all of them (no
      mask between the cached and the new). :meth:`truncate` forgets what a call appended,
      so a noisy block can be scored against the cache without staying in it.
    """

    def __init__(self, cfg: DiffusionLMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, DiffusionLMConfig):
            raise TypeError(f"cfg must be a DiffusionLMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        for name, p in self.named_parameters():  # GPT-2's init, residual outputs scaled
            if p.ndim == 2:
                deep = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, std=0.02 * ((2 * cfg.n_layers) ** -0.5 if deep else 1.0))

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty :class:`~effarch.attention.KVCache` per layer, in the weights' dtype."""
        w = self.embed_tokens.weight
        h, dh = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        return [KVCache(batch, max_len, h, dh, dtype=w.dtype, device=w.device)
                for _ in self.layers]  # fmt: skip

    @staticmethod
    def truncate(caches: list[KVCache], length: int) -> None:
        """Forget all but the first ``length`` tokens of every cache."""
        for c in caches:
            c.truncate(length)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask_mod: MaskMod | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long,))
        v = self.cfg.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= v):
            raise ValueError(
                f"input_ids must lie in [0, {v}), got [{int(input_ids.min())}, "
                f"{int(input_ids.max())}]"
            )
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must hold {len(self.layers)} caches, got {len(caches)}")
        if mask_mod is not None and caches is not None:
            raise ValueError("give mask_mod or caches, not both")
        t = input_ids.shape[1]
        start = 0 if caches is None else caches[0].length
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device)
        else:
            check_tensor("positions", positions, ndim=1)
        h = self.embed_tokens(input_ids)
        causal = self.cfg.causal  # bottom-right aligned: with a cache too
        keep = None  # the pattern, evaluated once for every layer (mask_mod overrides causal)
        if mask_mod is not None:
            heads = self.cfg.n_heads
            keep = dense_mask(mask_mod, t, t, batch=len(h), heads=heads, device=h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, causal, keep, None if caches is None else caches[i])
        return self.norm(h) @ self.embed_tokens.weight.T
