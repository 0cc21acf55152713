r"""Linearization (survey section 2.6): turn a trained softmax attention layer into a linear one.

Training a linear-attention model from scratch is expensive; *linearizing* keeps a trained
Transformer's weights and swaps only the attention kernel. The softmax layer computes, per head
and causal row ``i`` (``q, k`` after RoPE, ``D`` the head dim)::

    A_ij = exp(q_i . k_j / sqrt(D)) / sum_{s<=i} exp(q_i . k_s / sqrt(D))     (j <= i)
    o_i  = sum_j A_ij v_j

and the linearized layer keeps ``W_q, W_k, W_v, W_o`` and RoPE but replaces the kernel by an
inner product of positive features, so the sum runs through a fixed-size state
(:func:`~effarch.linear.ops.linear_attention` with ``normalize=True``)::

    Ahat_ij = phi_q(q_i) . phi_k(k_j) / sum_{s<=i} phi_q(q_i) . phi_k(k_s)
    o_i     = S_i^T phi_q(q_i) / (phi_q(q_i) . z_i),  S_i = sum_{j<=i} phi_k(k_j) v_j^T,
                                                       z_i = sum_{j<=i} phi_k(k_j)

Three steps, following Hedgehog (Zhang et al., 2024) and LoLCATs (Zhang et al., 2025):

1. **Learnable feature maps.** ``phi`` is Hedgehog's map (a per-head linear layer followed by a
   softmax over features, for both signs: :class:`~effarch.linear.feature_maps.HedgehogFeatureMap`),
   one for queries and one for keys. Fixed maps (``elu(x) + 1``, Performer's random features)
   are the untrained baselines.
2. **Attention transfer** (:func:`attention_transfer`). Train only the feature maps, with the
   projections frozen, so that the linear layer reproduces the softmax layer on sample inputs:
   either its outputs (mean squared error, LoLCATs) or its attention weights (the cross-entropy
   ``-sum_j A_ij log Ahat_ij``, Hedgehog). The teacher is the layer itself, so no labels and
   only a few parameters (about ``2 H D F`` per layer) are needed.
3. **Low-rank fine-tuning** (:func:`low_rank_finetune`, LoLCATs' second stage). Add LoRA
   adapters (:class:`LoRALinear`) to the projections and train them to close the remaining gap.
   LoLCATs trains them on the language-modelling loss of the whole model; with a single layer
   here the target is again the softmax layer's output.

**Sliding window + linear** (``window=w``, LoLCATs). Softmax attention is often dominated by the
last few keys, which a low-rank kernel struggles with. The hybrid keeps exact softmax scores on
the last ``w`` keys and linear scores on the older ones, in one normalisation::

    m_i = max_{i-w < j <= i} q_i . k_j / sqrt(D)
    a_ij = exp(q_i . k_j / sqrt(D) - m_i)               for i - w < j <= i   (the window)
    b_ij = lambda_h phi_q(q_i) . phi_k(k_j)             for j <= i - w        (older keys)
    o_i  = (sum_j a_ij v_j + sum_j b_ij v_j) / (sum_j a_ij + sum_j b_ij)

As in LoLCATs the window scores are shifted by their row maximum ``m_i``: the linear scores are
then trained to approximate ``exp(q . k / sqrt(D) - m_i)``, whose scale is per query and would
otherwise have to be learnt by ``phi_q`` (Hedgehog features are bounded: ``phi . phi <= 2``).
``lambda_h = exp(log_linear_weight_h)`` is a learnt per-head weight of the linear part (LoLCATs'
window factor). With ``w >= T`` nothing is linear and the layer *is* the softmax layer; with
``lambda = 0`` it is sliding-window attention.

Cost: the forward pass keeps the keys of the window and a linear state, so it is
``O(T (w + F) D)`` per head: the window scores come from ``w``-long slices of the keys
(``unfold``), the linear part from :func:`~effarch.linear.ops.linear_attention` applied to the keys
and values delayed by ``w`` steps (so ``S_i`` only holds ``j <= i - w``). When decoding, the state
is ``(S, z)`` plus a cache of the last ``w`` keys and values: constant memory. A chunked kernel
(window = chunk length) does the same per chunk: quadratic softmax scores
between a chunk and itself plus the previous chunk (masked to the window), linear scores
for the part of that band outside the window, and the carried state ``S`` for everything older.
:meth:`LinearizedAttention.attention_weights` materialises the ``[T, T]`` weights instead
(``O(T^2)``): the reference the tests and the ``"weights"`` loss use.

Grouped-query layers (``n_kv_heads = G < H``) keep their grouping: ``phi_k`` has one map per
key/value head, and a key/value head's features and values serve the ``H / G`` query heads
that share it, so the state is shared like the KV cache was (the op is called with the
features repeated to ``H`` heads).

There is no pretrained LLM in this package, so :func:`linearization_task` builds a stand-in
teacher: a random :class:`~effarch.attention.MultiHeadAttention` with sharpened query/key weights
(peaked attention like trained heads) and partly matched ``W_q``, ``W_k`` (heads that attend
to earlier copies of the current token), fed token embeddings of random sequences drawn from a
small vocabulary so that tokens repeat. The errors measured on it show the method at work, not
what a real model's layers would give.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from tqdm.auto import tqdm

from .._checks import (
    check_choice,
    check_positive_int,
    check_positive_number,
    check_tensor,
)
from ..attention.grouped import MultiHeadAttention, project_qkv
from ..attention.quantized import attention_error
from .feature_maps import HedgehogFeatureMap, PerformerFeatureMap, elu_plus_one
from .ops import linear_attention

__all__ = [
    "LinearizationTask",
    "LinearizedAttention",
    "LoRALinear",
    "TransferResult",
    "add_lora",
    "attention_transfer",
    "linearization_error",
    "linearization_sweep",
    "linearization_task",
    "low_rank_finetune",
    "softmax_attention_weights",
]

FEATURE_MAPS = ("hedgehog", "elu", "performer")
LOSSES = ("output", "weights")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------
# Feature maps without parameters, as modules
# --------------------------------------------------------------------------------------------


class _EluPlusOne(nn.Module):
    """``elu(x) + 1`` elementwise (Katharopoulos et al., 2020): feature dim ``D``, untrained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu_plus_one(x)


class _Performer(nn.Module):
    """FAVOR+ random features of ``x / D**0.25``, so that ``phi(q) . phi(k) ~ exp(q.k/sqrt(D))``."""

    def __init__(self, head_dim: int, num_features: int, seed: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.map = PerformerFeatureMap(head_dim, num_features, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(x * self.head_dim**-0.25)


def _make_feature_maps(
    kind: str, n_heads: int, n_kv_heads: int, head_dim: int, feature_dim: int | None, seed: int
) -> tuple[nn.Module, nn.Module]:
    """``(phi_q, phi_k)`` for ``kind``; Hedgehog's are separate per-head maps for q and k."""
    if kind == "elu":
        if feature_dim is not None and feature_dim != head_dim:
            raise ValueError(
                f"feature_map='elu' keeps the head dim ({head_dim}) as its feature dim; "
                f"got feature_dim={feature_dim} (pass None)"
            )
        return _EluPlusOne(), _EluPlusOne()
    if kind == "performer":
        # q and k must see the same random projection: one module serves both
        shared = _Performer(head_dim, head_dim if feature_dim is None else feature_dim, seed)
        return shared, shared
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (
            HedgehogFeatureMap(n_heads, head_dim, feature_dim),
            HedgehogFeatureMap(n_kv_heads, head_dim, feature_dim),
        )


# --------------------------------------------------------------------------------------------
# Shared pieces of the softmax and the linearized layer
# --------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, G, *] -> [B, T, H, *]``: query head ``h`` gets key/value head ``h // (H / G)``."""
    return repeat(x, "b t g d -> b t (g r) d", r=n_heads // x.shape[2])


def _check_input(name: str, x: Any, d_model: int) -> torch.Tensor:
    check_tensor(name, x, ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{name} must be [B, T, d_model] with d_model={d_model}, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one sequence and token, got {tuple(x.shape)}")
    return x


def _check_attention_layer(layer: Any) -> MultiHeadAttention:
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be a MultiHeadAttention, got {type(layer).__name__}")
    if not layer.causal:
        raise ValueError("layer must be causal: linearized attention here is causal only")
    return layer


def softmax_attention_weights(layer: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The causal softmax attention weights ``A [B, H, T, T]`` of ``layer`` on ``x [B, T, d]``.

    ``A_ij = softmax_j(q_i . k_j / sqrt(D))`` over ``j <= i`` (zero above the diagonal), with the
    layer's projections and RoPE; ``layer(x) = W_o [A V]`` (heads concatenated). Computed in
    the layer's dtype; memory ``O(B H T^2)``.
    """
    _check_attention_layer(layer)
    _check_input("x", x, layer.d_model)
    q, k, _ = project_qkv(layer, x)
    k = _repeat_kv(k, layer.n_heads)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * layer.head_dim**-0.5
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


# --------------------------------------------------------------------------------------------
# The linearized layer
# --------------------------------------------------------------------------------------------


class LinearizedAttention(nn.Module):
    r"""Causal linear attention (optionally sliding window + linear) with softmax-layer weights.

    Per query head ``h`` and position ``i`` (``q, k, v`` projected as in
    :class:`~effarch.attention.MultiHeadAttention`, RoPE on ``q`` and ``k``)::

        window=None:  o_i = sum_{j<=i} phi_q(q_i).phi_k(k_j) v_j / sum_{j<=i} phi_q(q_i).phi_k(k_j)
        window=w:     o_i = (sum_{i-w<j<=i} a_ij v_j + sum_{j<=i-w} b_ij v_j) / (sum a + sum b)
                      a_ij = exp(q_i.k_j / sqrt(D) - m_i),  b_ij = lambda_h phi_q(q_i).phi_k(k_j)
        y_i = W_o [o_i^(1), ..., o_i^(H)]

    (see the module docstring for ``m_i`` and ``lambda_h``). Build it from a trained layer with
    :meth:`from_attention`; the constructor makes one with fresh projections.

    Args:
        d_model, n_heads, n_kv_heads, head_dim, rope, rope_base, bias: as in
            :class:`~effarch.attention.MultiHeadAttention`.
        feature_map: ``"hedgehog"`` (learnable, default), ``"elu"`` (``elu(x) + 1``) or
            ``"performer"`` (positive random features of ``x / D**0.25``).
        feature_dim: ``F``: Hedgehog's features per sign (``2F`` features in all; default
            ``D``) or Performer's number of features (default ``D``); must be ``None`` or
            ``D`` for ``"elu"``.
        window: ``w``, the number of most recent keys (the current one included) scored by
            softmax; ``None`` for pure linear attention.
        chunk_size: chunk length of :func:`~effarch.linear.ops.linear_attention`.
        seed: seed of the feature maps' initialisation (Hedgehog with ``F != D``, Performer).

    ``forward(x [B, T, d_model]) -> [B, T, d_model]``, positions ``0 .. T-1``.
    :meth:`transfer_parameters` lists what attention transfer trains.
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
        bias: bool = False,
        feature_map: str = "hedgehog",
        feature_dim: int | None = None,
        window: int | None = None,
        chunk_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        g = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % g:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({g})")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
            head_dim = d_model // n_heads
        check_positive_int("head_dim", head_dim)
        if not isinstance(rope, bool):
            raise TypeError(f"rope must be a bool, got {type(rope).__name__} ({rope!r})")
        check_positive_number("rope_base", rope_base)
        if not isinstance(feature_map, str):
            raise TypeError(f"feature_map must be a str, got {type(feature_map).__name__}")
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        if feature_dim is not None:
            check_positive_int("feature_dim", feature_dim)
        if window is not None:
            check_positive_int("window", window)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("seed", seed, allow_zero=True)

        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, g, head_dim
        self.rope, self.rope_base = rope, rope_base
        self.feature_map, self.window, self.chunk_size = feature_map, window, chunk_size
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, g * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, g * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.phi_q, self.phi_k = _make_feature_maps(
            feature_map, n_heads, g, head_dim, feature_dim, seed
        )
        # log of the per-head weight lambda_h of the linear scores (used with a window only)
        self.log_linear_weight = nn.Parameter(torch.zeros(n_heads))

    @classmethod
    def from_attention(
        cls,
        layer: MultiHeadAttention,
        feature_map: str = "hedgehog",
        feature_dim: int | None = None,
        window: int | None = None,
        *,
        freeze: bool = True,
        chunk_size: int = 64,
        seed: int = 0,
    ) -> LinearizedAttention:
        """A linearized copy of a trained causal ``layer``.

        The projections are copied (the original layer stays untouched by later training,
        LoRA included) and, with ``freeze=True``, excluded from gradients; the RoPE settings
        are taken over. The new module has the layer's dtype and device.
        """
        _check_attention_layer(layer)
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze must be a bool, got {type(freeze).__name__} ({freeze!r})")
        w = layer.q_proj.weight
        new = cls(
            layer.d_model, layer.n_heads, layer.n_kv_heads, head_dim=layer.head_dim,
            rope=layer.rope, rope_base=layer.rope_base, bias=layer.q_proj.bias is not None,
            feature_map=feature_map, feature_dim=feature_dim, window=window,
            chunk_size=chunk_size, seed=seed,
        ).to(device=w.device, dtype=w.dtype)  # fmt: skip
        for name in PROJECTIONS:
            setattr(new, name, copy.deepcopy(getattr(layer, name)))
            for p in getattr(new, name).parameters():
                p.requires_grad_(not freeze)
        return new

    def transfer_parameters(self) -> list[nn.Parameter]:
        """The parameters attention transfer trains: the feature maps' (none for ``"elu"`` and
        ``"performer"``), plus the linear weight ``log lambda_h`` when there is a window."""
        params = list(self.phi_q.parameters())
        if self.phi_k is not self.phi_q:
            params += list(self.phi_k.parameters())
        if self.window is not None:
            params.append(self.log_linear_weight)
        return params

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(q, k, v, phi_q(q), phi_k(k))`` for ``x [B, T, d]``, with ``k``, ``v`` and
        ``phi_k(k)`` repeated to the ``H`` query heads: ``[B, T, H, D]`` and ``[B, T, H, F']``."""
        q, k, v = project_qkv(self, x)
        fq, fk = self.phi_q(q), self.phi_k(k)
        h = self.n_heads
        return q, _repeat_kv(k, h), _repeat_kv(v, h), fq, _repeat_kv(fk, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("x", x, self.d_model)
        q, k, v, fq, fk = self.features(x)
        if self.window is None:
            o, _ = linear_attention(
                fq, fk, v, scale=1.0, normalize=True, chunk_size=self.chunk_size
            )
        else:
            o = self._window_linear(q, k, v, fq, fk)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _window_linear(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        fq: torch.Tensor,
        fk: torch.Tensor,
    ) -> torch.Tensor:
        """The hybrid in ``O(T (w + F) D)``: window slices plus a delayed linear state.

        Takes ``q, k, v: [B, T, H, D]`` and ``fq, fk: [B, T, H, F']``; returns ``[B, T, H, D]``.
        """
        _, t, _, d = q.shape
        w = self.window
        assert w is not None
        # window: the keys i-w+1 .. i of every query i, as [B, T, H, w, D] (zeros before 0)
        k_win = F.pad(k, (0, 0, 0, 0, w - 1, 0)).unfold(1, w, 1).transpose(-1, -2)
        v_win = F.pad(v, (0, 0, 0, 0, w - 1, 0)).unfold(1, w, 1).transpose(-1, -2)
        pos = torch.arange(t, device=q.device)[:, None] - (w - 1) + torch.arange(w, device=q.device)
        scores = torch.einsum("bthd,bthwd->bthw", q, k_win) * d**-0.5
        scores = scores.masked_fill((pos < 0)[None, :, None, :], float("-inf"))
        a = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        num = torch.einsum("bthw,bthwd->bthd", a, v_win)
        den = a.sum(dim=-1, keepdim=True)
        if t > w:
            # keys j <= i - w: linear attention on keys and values delayed by w steps
            fk_old = F.pad(fk, (0, 0, 0, 0, w, 0))[:, :t]
            v_old = F.pad(v, (0, 0, 0, 0, w, 0))[:, :t]
            v_old = torch.cat([v_old, torch.ones_like(v_old[..., :1])], dim=-1)
            lin, _ = linear_attention(
                fq, fk_old, v_old, scale=1.0, chunk_size=self.chunk_size, backend="torch"
            )
            lam = self.log_linear_weight.exp().to(q.dtype)[None, None, :, None]
            num = num + lam * lin[..., :d]
            den = den + lam * lin[..., d:]
        return num / den

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised weights ``Ahat [B, H, T, T]`` (zero above the diagonal), ``O(T^2)``.

        ``forward(x) = W_o [Ahat V]`` (heads concatenated) up to rounding: the quadratic
        reference for the tests and for the ``"weights"`` loss of :func:`attention_transfer`.
        """
        _check_input("x", x, self.d_model)
        q, k, _, fq, fk = self.features(x)
        t = x.shape[1]
        i = torch.arange(t, device=x.device)[:, None]
        j = torch.arange(t, device=x.device)[None, :]
        causal = j <= i
        lin = torch.einsum("bihf,bjhf->bhij", fq, fk)
        if self.window is None:
            lin = lin.masked_fill(~causal, 0.0)
            return lin / lin.sum(dim=-1, keepdim=True)
        in_window = causal & (j > i - self.window)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * self.head_dim**-0.5
        scores = scores.masked_fill(~in_window, float("-inf"))
        a = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        lam = self.log_linear_weight.exp().to(q.dtype)[None, :, None, None]
        b = (lam * lin).masked_fill(~(causal & ~in_window), 0.0)
        return (a + b) / (a + b).sum(dim=-1, keepdim=True)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"feature_map={self.feature_map!r}, window={self.window}"
        )


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA, Hu et al., 2022).

    ``y = base(x) + (alpha / r) (x A^T) B^T`` with ``A: [r, in]`` (small random) and
    ``B: [out, r]`` (zeros), so the wrapped layer starts out equal to ``base``. Only ``A`` and
    ``B`` are trained: ``r (in + out)`` parameters instead of ``in * out``.

    Args:
        base: the linear layer to adapt (its parameters are frozen).
        rank: ``r``.
        alpha: scale numerator (default ``r``, i.e. scale 1).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_positive_int("rank", rank)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank must be at most min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}, got {rank}"
            )
        check_positive_number("alpha", alpha, allow_none=True)
        self.base, self.rank = base, rank
        self.scaling = (rank if alpha is None else float(alpha)) / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(
            torch.randn(rank, base.in_features, dtype=w.dtype, device=w.device)
            * base.in_features**-0.5
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + (alpha / r) B A``."""
        return self.base.weight + self.scaling * self.lora_b @ self.lora_a

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_a.T) @ self.lora_b.T

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def add_lora(
    module: nn.Module,
    rank: int,
    *,
    targets: Sequence[str] = PROJECTIONS,
    alpha: float | None = None,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Wrap ``module``'s linear layers named in ``targets`` in :class:`LoRALinear`, in place.

    Returns the new trainable parameters (``A`` and ``B`` of each adapter). Layers already
    wrapped are left as they are (their adapters are returned). The adapters' random ``A`` is
    drawn from ``seed``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_positive_int("rank", rank)
    check_positive_int("seed", seed, allow_zero=True)
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise TypeError(f"targets must be a non-empty sequence of names, got {targets!r}")
    params: list[nn.Parameter] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in targets:
            sub = getattr(module, name, None) if isinstance(name, str) else None
            if isinstance(sub, LoRALinear):
                params += [sub.lora_a, sub.lora_b]
                continue
            if not isinstance(sub, nn.Linear):
                raise ValueError(
                    f"targets must name nn.Linear attributes of the module; {name!r} is "
                    f"{type(sub).__name__}"
                )
            adapted = LoRALinear(sub, rank, alpha)
            setattr(module, name, adapted)
            params += [adapted.lora_a, adapted.lora_b]
    return params


# --------------------------------------------------------------------------------------------
# Attention transfer and low-rank fine-tuning
# --------------------------------------------------------------------------------------------


@dataclass
class TransferResult:
    """What a training run of :func:`attention_transfer` or :func:`low_rank_finetune` gives.

    ``steps`` and ``error`` are the evaluation points: ``error[i]`` is the relative output
    error (:func:`linearization_error`'s ``rel_l1``) on the evaluation data after
    ``steps[i]`` optimiser steps (``0``: before training). ``loss`` holds the training loss of
    every step; ``seconds`` the wall time of the whole run, evaluations included.
    """

    steps: list[int] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def initial_error(self) -> float:
        return self.error[0]

    @property
    def final_error(self) -> float:
        return self.error[-1]

    def records(self) -> list[dict[str, float]]:
        """``[{"step": s, "error": e}, ...]``: one row per evaluation, for tables and plots."""
        return [{"step": s, "error": e} for s, e in zip(self.steps, self.error, strict=True)]


def linearization_error(
    layer: nn.Module, linearized: nn.Module, x: torch.Tensor
) -> dict[str, float]:
    """Error of ``linearized(x)`` against ``layer(x)`` (both ``[B, T, d_model]``).

    The metrics of :func:`effarch.attention.attention_error`: ``rel_l1``
    (``sum |y - y_ref| / sum |y_ref|``, the number reported everywhere in this module),
    ``max_abs``, ``mean_abs`` and ``cos_sim``.
    """
    if not isinstance(layer, nn.Module) or not isinstance(linearized, nn.Module):
        raise TypeError(
            f"layer and linearized must be nn.Modules, got {type(layer).__name__} and "
            f"{type(linearized).__name__}"
        )
    check_tensor("x", x, ndim=3, floating=True)
    with torch.no_grad():
        return attention_error(linearized(x), layer(x))


def _weights_loss(ref: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Hedgehog's loss, as ``KL(A || Ahat)`` averaged over rows: the cross-entropy
    ``-sum_j A_ij log Ahat_ij`` minus the (constant) entropy of ``A``, so that 0 is perfect."""
    tiny = torch.finfo(approx.dtype).tiny
    log_ratio = torch.log(ref.clamp_min(tiny)) - torch.log(approx.clamp_min(tiny))
    return (torch.where(ref > 0, ref, 0.0) * log_ratio).sum(dim=-1).mean()


def _batches(
    layer: MultiHeadAttention,
    data: torch.Tensor | Callable[[], torch.Tensor],
    loss: str,
    batch_size: int,
    seed: int,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A function returning the next training batch ``x [b, T, d]`` and the teacher's target.

    The target is ``layer(x)`` (``loss="output"``) or the softmax weights ``[b, H, T, T]``.
    For a tensor ``data`` and the output loss the teacher runs once, on all of ``data``.
    """

    def target(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(x) if loss == "output" else softmax_attention_weights(layer, x)

    if not isinstance(data, torch.Tensor):

        def call() -> tuple[torch.Tensor, torch.Tensor]:
            x = _check_input("data()", data(), layer.d_model)
            return x, target(x)

        return call

    gen = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    cached = None
    if loss == "output":
        cached = torch.cat([target(c) for c in data.split(64)])

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(data.device)
        x = data[idx]
        return x, (cached[idx] if cached is not None else target(x))

    return sample


def _check_training_args(
    layer: Any,
    linearized: Any,
    data: Any,
    steps: Any,
    lr: Any,
    batch_size: Any,
    eval_data: Any,
    eval_every: Any,
    progress: Any,
    seed: Any,
) -> None:
    _check_attention_layer(layer)
    if not isinstance(linearized, LinearizedAttention):
        raise TypeError(
            f"linearized must be a LinearizedAttention, got {type(linearized).__name__}"
        )
    if (linearized.d_model, linearized.n_heads, linearized.head_dim) != (
        layer.d_model, layer.n_heads, layer.head_dim,
    ):  # fmt: skip
        raise ValueError(
            "linearized must have the layer's d_model, n_heads and head_dim: got "
            f"{(linearized.d_model, linearized.n_heads, linearized.head_dim)}, expected "
            f"{(layer.d_model, layer.n_heads, layer.head_dim)}"
        )
    if isinstance(data, torch.Tensor):
        _check_input("data", data, layer.d_model)
    elif not callable(data):
        raise TypeError(
            f"data must be a [N, T, d_model] tensor or a callable returning a batch, "
            f"got {type(data).__name__}"
        )
    check_positive_int("steps", steps)
    check_positive_number("lr", lr)
    check_positive_int("batch_size", batch_size)
    if eval_data is not None:
        _check_input("eval_data", eval_data, layer.d_model)
    if eval_every is not None:
        check_positive_int("eval_every", eval_every)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__} ({progress!r})")
    check_positive_int("seed", seed, allow_zero=True)


def _train(
    layer: MultiHeadAttention,
    linearized: LinearizedAttention,
    params: list[nn.Parameter],
    data: torch.Tensor | Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    loss: str,
    batch_size: int,
    eval_data: torch.Tensor | None,
    eval_every: int | None,
    progress: bool,
    seed: int,
    desc: str,
) -> TransferResult:
    """Adam on ``params`` (everything else frozen) to match ``layer`` on ``data``."""
    if not params:
        raise ValueError(
            f"linearized has nothing to train (feature_map={linearized.feature_map!r} has no "
            "parameters and there is no window); use feature_map='hedgehog'"
        )
    start = time.perf_counter()
    next_batch = _batches(layer, data, loss, batch_size, seed)
    if eval_data is None:
        eval_data = data[:32] if isinstance(data, torch.Tensor) else next_batch()[0]
    with torch.no_grad():
        eval_ref = layer(eval_data)

    def evaluate() -> float:
        with torch.no_grad():
            return attention_error(linearized(eval_data), eval_ref)["rel_l1"]

    every = eval_every if eval_every is not None else max(1, steps // 20)
    trainable = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in linearized.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.Adam(params, lr=lr)
    result = TransferResult(steps=[0], error=[evaluate()])
    try:
        for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
            x, target = next_batch()
            if loss == "output":
                value = F.mse_loss(linearized(x), target)
            else:
                value = _weights_loss(target, linearized.attention_weights(x))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            result.loss.append(value.item())
            if step % every == 0 or step == steps:
                result.steps.append(step)
                result.error.append(evaluate())
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
    result.seconds = time.perf_counter() - start
    return result


def attention_transfer(
    layer: MultiHeadAttention,
    linearized: LinearizedAttention,
    data: torch.Tensor | Callable[[], torch.Tensor],
    *,
    steps: int = 200,
    lr: float = 3e-2,
    loss: str = "output",
    batch_size: int = 4,
    eval_data: torch.Tensor | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> TransferResult:
    r"""Train ``linearized``'s feature maps to reproduce the softmax ``layer`` (stage 1).

    Only :meth:`LinearizedAttention.transfer_parameters` are trained (Adam, learning rate
    ``lr``); the projections and ``layer`` stay fixed. Per step, on a batch ``x``:

    * ``loss="output"`` (LoLCATs): ``mean (linearized(x) - layer(x))^2``;
    * ``loss="weights"`` (Hedgehog): ``mean_i KL(A_i || Ahat_i)`` between the softmax weights
      and the linearized layer's normalised weights (equal, up to a constant, to the
      cross-entropy ``-sum_j A_ij log Ahat_ij``); ``O(T^2)`` memory.

    Args:
        layer: the causal softmax layer (the teacher).
        linearized: e.g. ``LinearizedAttention.from_attention(layer)``; trained in place.
        data: sample inputs ``[N, T, d_model]`` (each step draws ``batch_size`` sequences
            with replacement) or a callable returning a batch ``[b, T, d_model]``.
        steps: optimiser steps.
        lr: Adam's learning rate.
        loss: ``"output"`` or ``"weights"``.
        batch_size: sequences per step (tensor ``data`` only).
        eval_data: held-out inputs for the error history; default the first 32 sequences
            of ``data`` (or one batch of a callable's, drawn before training): a training
            error, not a held-out one.
        eval_every: steps between evaluations (default ``steps // 20``; the first and the
            last step are always evaluated).
        progress: show a tqdm progress bar.
        seed: seed of the batch sampling.

    Returns:
        :class:`TransferResult` with the error against the steps.
    """
    _check_training_args(
        layer, linearized, data, steps, lr, batch_size, eval_data, eval_every, progress, seed
    )
    check_choice("loss", loss, LOSSES)
    return _train(
        layer, linearized, linearized.transfer_parameters(), data, steps=steps, lr=lr,
        loss=loss, batch_size=batch_size, eval_data=eval_data, eval_every=eval_every,
        progress=progress, seed=seed, desc="attention transfer",
    )  # fmt: skip


def low_rank_finetune(
    layer: MultiHeadAttention,
    linearized: LinearizedAttention,
    data: torch.Tensor | Callable[[], torch.Tensor],
    *,
    rank: int = 4,
    steps: int = 100,
    lr: float = 1e-3,
    alpha: float | None = None,
    targets: Sequence[str] = PROJECTIONS,
    train_feature_maps: bool = False,
    batch_size: int = 4,
    eval_data: torch.Tensor | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> TransferResult:
    """LoRA fine-tuning of the linearized layer's projections to match ``layer``'s outputs.

    LoLCATs' second stage: :func:`add_lora` wraps the ``targets`` projections (in place, rank
    ``rank``) and their adapters are trained on the output MSE, with the feature maps frozen
    unless ``train_feature_maps``. The other arguments are those of
    :func:`attention_transfer`. Because ``B`` starts at zero, step 0 reproduces the
    transferred layer exactly.
    """
    _check_training_args(
        layer, linearized, data, steps, lr, batch_size, eval_data, eval_every, progress, seed
    )
    if not isinstance(train_feature_maps, bool):
        raise TypeError(
            f"train_feature_maps must be a bool, got {type(train_feature_maps).__name__}"
        )
    params = add_lora(linearized, rank, targets=targets, alpha=alpha, seed=seed)
    if train_feature_maps:
        params += linearized.transfer_parameters()
    return _train(
        layer, linearized, params, data, steps=steps, lr=lr, loss="output",
        batch_size=batch_size, eval_data=eval_data, eval_every=eval_every, progress=progress,
        seed=seed, desc="low-rank fine-tuning",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# A stand-in teacher and the sweeps of the notebook
# --------------------------------------------------------------------------------------------


def _mean_entropy(layer: MultiHeadAttention, x: torch.Tensor) -> float:
    """Mean entropy (nats) of the rows of ``layer``'s causal attention on ``x``."""
    with torch.no_grad():
        a = softmax_attention_weights(layer, x)
        return float(-(torch.where(a > 0, a * a.clamp_min(1e-30).log(), 0.0)).sum(-1).mean())


@dataclass
class LinearizationTask:
    """A softmax teacher layer with training and held-out inputs (see :func:`linearization_task`).

    ``entropy`` is the mean entropy (nats) of the teacher's attention rows on ``test``;
    ``uniform_entropy`` that of uniform causal attention over the same rows (``mean_i log i``),
    for scale: the lower the ratio, the more peaked the attention.
    """

    layer: MultiHeadAttention
    train: torch.Tensor  # [N, T, d_model]
    test: torch.Tensor  # [N_test, T, d_model]
    entropy: float = float("nan")
    uniform_entropy: float = float("nan")
    description: str = ""


def linearization_task(
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    *,
    seq_len: int = 64,
    n_train: int = 256,
    n_test: int = 32,
    vocab: int = 48,
    sharpness: float = 1.5,
    match: float = 0.7,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LinearizationTask:
    r"""A random causal softmax layer with peaked attention, and inputs to linearize it on.

    Without a pretrained model we make a layer whose attention resembles trained heads:

    * the query weights are random and scaled by ``sharpness`` (as are the keys), so the
      scores ``q . k / sqrt(D)`` spread over several units and each row concentrates on a few
      keys instead of averaging (a random init's attention is close to uniform);
    * ``W_k = sharpness (match W_q + sqrt(1 - match^2) N)`` with fresh noise ``N``: for
      ``match > 0``, ``q_i . k_j`` is large when token ``j`` equals token ``i``, the "attend to
      earlier copies" pattern of retrieval and induction heads, which is exactly what linear
      attention finds hard; RoPE adds a dependence on the distance.

    Inputs are token embeddings (a random ``[vocab, d_model]`` table, unit variance per entry)
    of uniformly random token sequences; with ``vocab`` comparable to ``seq_len`` tokens
    repeat within a sequence. ``train`` and ``test`` are independent draws.
    """
    check_positive_int("d_model", d_model)
    check_positive_int("n_heads", n_heads)
    for name, v in (("seq_len", seq_len), ("n_train", n_train), ("n_test", n_test),
                    ("vocab", vocab)):  # fmt: skip
        check_positive_int(name, v)
    check_positive_number("sharpness", sharpness)
    check_positive_number("match", match, allow_zero=True)
    if match > 1:
        raise ValueError(f"match must lie in [0, 1], got {match}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_positive_int("seed", seed, allow_zero=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = MultiHeadAttention(d_model, n_heads, n_kv_heads)
    d, g, dh = d_model, layer.n_kv_heads, layer.head_dim
    with torch.no_grad():
        wq = torch.randn(n_heads * dh, d, generator=gen) * d**-0.5
        # the key head of group g matches the first query head of that group
        wq_kv = rearrange(wq, "(g r e) c -> g r e c", g=g, e=dh)[:, 0]
        noise = torch.randn(g, dh, d, generator=gen) * d**-0.5
        wk = match * wq_kv + math.sqrt(1 - match**2) * noise
        layer.q_proj.weight.copy_(sharpness * wq)
        layer.k_proj.weight.copy_(sharpness * rearrange(wk, "g e c -> (g e) c"))
    layer = layer.to(dtype)
    table = torch.randn(vocab, d_model, generator=gen)

    def sample(n: int) -> torch.Tensor:
        tokens = torch.randint(vocab, (n, seq_len), generator=gen)
        return table[tokens].to(dtype)

    train, test = sample(n_train), sample(n_test)
    entropy = _mean_entropy(layer, test)
    uniform = sum(math.log(i) for i in range(1, seq_len + 1)) / seq_len
    desc = (
        f"MultiHeadAttention(d_model={d_model}, n_heads={n_heads}, n_kv_heads={g}), "
        f"sharpness={sharpness}, match={match}; inputs: embeddings of random tokens "
        f"(vocab {vocab}), T={seq_len}, {n_train} train / {n_test} test sequences; "
        f"attention entropy {entropy:.2f} nats (uniform: {uniform:.2f})"
    )
    return LinearizationTask(layer, train, test, entropy, uniform, desc)


def linearization_sweep(
    task: LinearizationTask,
    feature_dims: Iterable[int] = (8, 16, 32, 64),
    windows: Iterable[int | None] = (None, 16),
    *,
    steps: int = 100,
    lr: float = 3e-2,
    loss: str = "output",
    batch_size: int = 4,
    baselines: Iterable[str] = ("elu", "performer", "window"),
    progress: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Held-out error of linearized layers against the feature dim, window and training.

    For every window in ``windows`` (``None``: pure linear attention) this measures

    * ``"hedgehog"`` for each feature dim ``F`` in ``feature_dims``, untrained (``trained``
      False, the initialisation) and after :func:`attention_transfer` with ``steps`` steps;
    * each baseline, untrained: ``"elu"`` (feature dim ``D``; with a window, ``lambda = 1``)
      and, without a window only, ``"performer"`` (``F`` random features). Performer's
      features estimate ``exp(q . k / sqrt(D))`` itself, on a different scale from the
      max-shifted window scores, so it does not fit the hybrid untrained;
    * ``"window"``: with a window only, sliding-window softmax attention alone
      (``lambda = 0``: keys older than ``w`` are dropped), recorded with ``feature_map``
      ``"none"`` and feature dim 0: what the linear part adds to the window.

    Returns one record per configuration: ``feature_map``, ``feature_dim`` (``F``),
    ``n_features`` (the state's key dim: ``2F`` for Hedgehog), ``window``, ``trained``,
    ``steps``, ``error`` (``rel_l1`` on ``task.test``), ``cos_sim`` and ``seconds`` (of the
    training run, 0 if untrained).
    """
    if not isinstance(task, LinearizationTask):
        raise TypeError(f"task must be a LinearizationTask, got {type(task).__name__}")
    if isinstance(feature_dims, (str, bytes)):
        raise TypeError("feature_dims must be a sequence of positive ints")
    dims = [check_positive_int("feature_dims[i]", f) for f in feature_dims]
    wins = list(windows)
    for w in wins:
        if w is not None:
            check_positive_int("windows[i]", w)
    if not dims or not wins:
        raise ValueError("feature_dims and windows must not be empty")
    base = list(baselines)
    for b in base:
        check_choice("baselines[i]", b, ("elu", "performer", "window"))
    check_choice("loss", loss, LOSSES)
    check_positive_int("steps", steps)
    layer, test = task.layer, task.test
    records: list[dict[str, Any]] = []

    def record(
        lin: LinearizedAttention, f: int, n_feat: int, trained: bool, secs: float, name: str = ""
    ) -> None:
        err = linearization_error(layer, lin, test)
        records.append({
            "feature_map": name or lin.feature_map, "feature_dim": f, "n_features": n_feat,
            "window": lin.window, "trained": trained, "steps": steps if trained else 0,
            "error": err["rel_l1"], "cos_sim": err["cos_sim"], "seconds": secs,
        })  # fmt: skip

    n_win = sum(w is not None for w in wins)
    total = len(wins) * (len(dims) + ("elu" in base)) + n_win * ("window" in base)
    total += ("performer" in base and None in wins) * len(dims)
    bar = tqdm(total=total, desc="linearization sweep", disable=not progress, leave=False)
    for w in wins:
        if "elu" in base:
            lin = LinearizedAttention.from_attention(layer, "elu", window=w, seed=seed)
            record(lin, layer.head_dim, layer.head_dim, False, 0.0)
            bar.update()
        if "window" in base and w is not None:
            lin = LinearizedAttention.from_attention(layer, "elu", window=w)
            with torch.no_grad():
                lin.log_linear_weight.fill_(float("-inf"))
            record(lin, 0, 0, False, 0.0, name="none")
            bar.update()
        for f in dims:
            if "performer" in base and w is None:
                lin = LinearizedAttention.from_attention(layer, "performer", f, w, seed=seed)
                record(lin, f, f, False, 0.0)
                bar.update()
            lin = LinearizedAttention.from_attention(layer, "hedgehog", f, w, seed=seed)
            record(lin, f, 2 * f, False, 0.0)
            res = attention_transfer(
                layer, lin, task.train, steps=steps, lr=lr, loss=loss, batch_size=batch_size,
                eval_data=task.test, eval_every=steps, progress=False, seed=seed,
            )  # fmt: skip
            record(lin, f, 2 * f, True, res.seconds)
            bar.update()
    bar.close()
    return records
