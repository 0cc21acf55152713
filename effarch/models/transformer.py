"""A plain pre-norm transformer block and its analytic cost.

The block is the baseline every efficient architecture in the book is measured against:
RMSNorm -> multi-head (or grouped-query) softmax attention -> residual, RMSNorm -> SwiGLU
FFN -> residual, as in LLaMA. Symbols used throughout:

    d = d_model, H = n_heads, G = n_kv_heads, dh = d / H, f = d_ff, T = tokens processed,
    L = tokens already in the KV cache, B = batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._checks import check_heads, check_positive_int, check_tensor
from ..attention import kv_cache_bytes, naive_attention
from ..bench.flops import attention_flops


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a decoder-only transformer (LLaMA-style: RMSNorm, SwiGLU, no biases)."""

    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    gated_ffn: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_ff", "vocab_size"):
            check_positive_int(name, getattr(self, name))
        check_heads(self.d_model, self.n_heads, self.n_kv_heads)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def block_params(self) -> int:
        """Weights of one block: attention projections and the FFN (norms ignored)."""
        d, dh = self.d_model, self.head_dim
        attn = d * self.n_heads * dh + 2 * d * self.kv_heads * dh + self.n_heads * dh * d
        ffn = (3 if self.gated_ffn else 2) * d * self.d_ff
        return attn + ffn


#: LLaMA-2 7B (Touvron et al., 2023): multi-head attention, 32 layers.
LLAMA2_7B = TransformerConfig(d_model=4096, n_heads=32, n_layers=32, d_ff=11008)
#: Mistral 7B (Jiang et al., 2023): the same width with grouped-query attention (8 KV heads).
MISTRAL_7B = TransformerConfig(d_model=4096, n_heads=32, n_layers=32, d_ff=14336, n_kv_heads=8)


def block_flops(
    cfg: TransformerConfig,
    tokens: int,
    *,
    batch: int = 1,
    context: int = 0,
    causal: bool = False,
) -> dict[str, int]:
    """Matmul FLOPs of one block's forward pass, by component.

    ``tokens`` new tokens (``T``) attend to themselves and to ``context`` cached ones
    (``L``): prefill is ``(T, L=0)``, one decode step is ``(T=1, L)``. With 2 FLOPs per
    multiply-add and ``N = B T``:

        q_proj   2 N d (H dh)              kv_proj  2 N d (2 G dh)
        attention 2 B H T (L+T) (2 dh)     (halved-ish when causal: only unmasked pairs)
        o_proj   2 N (H dh) d              ffn      2 N d f * (3 if gated else 2)

    ``causal=False`` counts the full score matrix, which is what a naive implementation
    computes even when it then masks it.
    """
    check_positive_int("tokens", tokens)
    check_positive_int("batch", batch)
    check_positive_int("context", context, allow_zero=True)
    d, h, g, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    n = batch * tokens
    return {
        "q_proj": 2 * n * d * h * dh,
        "kv_proj": 2 * n * d * 2 * g * dh,
        "attention": attention_flops(batch, tokens, h, dh, seq_k=context + tokens, causal=causal),
        "o_proj": 2 * n * h * dh * d,
        "ffn": 2 * n * d * cfg.d_ff * (3 if cfg.gated_ffn else 2),
    }


def attention_share(cfg: TransformerConfig, tokens: int, *, causal: bool = True) -> float:
    """Fraction of a block's prefill FLOPs spent in attention's scores and values
    (:func:`block_flops` with ``context = 0``)."""
    parts = block_flops(cfg, tokens, causal=causal)
    return parts["attention"] / sum(parts.values())


def attention_crossover(cfg: TransformerConfig, *, causal: bool = True) -> int:
    """The shortest prompt whose attention FLOPs exceed those of the rest of the block.

    The share of attention grows with ``T`` (its cost is quadratic, the rest linear), so
    the crossover is found by bisection over ``1 .. 2^30``.
    """
    lo, hi = 1, 2**30
    if attention_share(cfg, hi, causal=causal) <= 0.5:
        raise ValueError(f"attention never exceeds half of the block's FLOPs below T = {hi}")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if attention_share(cfg, mid, causal=causal) > 0.5 else (mid + 1, hi)
    return lo


def block_memory(
    cfg: TransformerConfig,
    tokens: int,
    *,
    batch: int = 1,
    context: int = 0,
    bytes_per_element: float = 2,
) -> dict[str, int]:
    """Bytes one block reads or materialises in a forward pass, by component.

    * ``weights``: the block's parameters, read once per forward pass;
    * ``kv_cache``: keys and values of all ``L + T`` tokens, ``2 B (L+T) G dh`` elements;
    * ``scores``: the ``B H T (L+T)`` attention matrix that naive attention materialises
      (FlashAttention never stores it);
    * ``activations``: the ``B T d`` hidden state and the ``B T f`` FFN intermediate.
    """
    check_positive_int("tokens", tokens)
    check_positive_int("batch", batch)
    check_positive_int("context", context, allow_zero=True)
    e = bytes_per_element
    total = context + tokens
    return {
        "weights": int(cfg.block_params() * e),
        "kv_cache": kv_cache_bytes(
            n_layers=1,
            seq_len=total,
            batch=batch,
            n_kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            bytes_per_element=e,
        ),
        "scores": int(batch * cfg.n_heads * tokens * total * e),
        "activations": int(batch * tokens * (cfg.d_model + cfg.d_ff) * e),
    }


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: ``x + Attn(norm(x))`` then ``x + FFN(norm(x))``.

    Input and output ``[B, T, d_model]``; the FFN is SwiGLU when ``cfg.gated_ffn``, else
    GELU. Attention is :func:`naive_attention` (causal),
    so its cost is the textbook one that the rest of the book sets out to beat.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, h, g, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.norm1 = nn.RMSNorm(d)
        self.norm2 = nn.RMSNorm(d)
        self.q_proj = nn.Linear(d, h * dh, bias=False)
        self.kv_proj = nn.Linear(d, 2 * g * dh, bias=False)
        self.o_proj = nn.Linear(h * dh, d, bias=False)
        self.up = nn.Linear(d, (2 if cfg.gated_ffn else 1) * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"x must have d_model={self.cfg.d_model} features in dim 2, "
                f"got shape {tuple(x.shape)}"
            )
        dh = self.cfg.head_dim
        y = self.norm1(x)
        q = rearrange(self.q_proj(y), "b t (h d) -> b t h d", d=dh)
        k, v = rearrange(self.kv_proj(y), "b t (two g d) -> two b t g d", two=2, d=dh)
        a = naive_attention(q, k, v, causal=True)
        x = x + self.o_proj(rearrange(a, "b t h d -> b t (h d)"))
        y = self.norm2(x)
        if self.cfg.gated_ffn:
            gate, up = self.up(y).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(self.up(y))
        return x + self.down(hidden)
