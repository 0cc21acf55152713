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
2. **Attention transfer** (:func:`effarch.experiments.attention_transfer`). Train only the
   feature maps, with the projections frozen, so that the linear layer reproduces the softmax
   layer on sample inputs: either its outputs (mean squared error, LoLCATs) or its attention
   weights (the cross-entropy ``-sum_j A_ij log Ahat_ij``, Hedgehog). The teacher is the layer
   itself, so no labels and only a few parameters (about ``2 H D F`` per layer) are needed.
3. **Low-rank fine-tuning** (:func:`effarch.experiments.low_rank_finetune`, LoLCATs' second
   stage). Add LoRA adapters (:class:`effarch.nn.LoRALinear`) to the projections and train
   them to close the remaining gap.

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
``lambda_h = exp(log_linear_weight_h)`` is a learnt per-head weight of the linear part
(LoLCATs puts its learnt factor ``gamma`` on the window's terms instead: the same layer with
``lambda = 1 / gamma``). With ``w >= T`` nothing is linear and the layer *is* the softmax
layer; with ``lambda = 0`` it is sliding-window attention.

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

This module holds the layer (:class:`LinearizedAttention`, its feature maps) and the two
measures it is trained and judged by (:func:`softmax_attention_weights`,
:func:`linearization_error`); the training, the stand-in teacher and the sweeps are the
experiment of :mod:`effarch.experiments.linearization`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .._checks import (
    check_choice,
    check_heads,
    check_layer_state,
    check_positive_int,
    check_positive_number,
    check_sequences,
    check_tensor,
)
from ..attention.grouped import MultiHeadAttention, project_qkv
from ..attention.quantized import attention_error
from ..nn.heads import repeat_kv
from ..nn.lora import ATTENTION_PROJECTIONS
from .feature_maps import HedgehogFeatureMap, PerformerFeatureMap, elu_plus_one
from .ops import linear_attention

__all__ = ["LinearizedAttention", "linearization_error", "softmax_attention_weights"]

FEATURE_MAPS = ("hedgehog", "elu", "performer")


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


def check_causal_attention_layer(layer: Any) -> MultiHeadAttention:
    """Check that ``layer`` is a causal :class:`~effarch.attention.MultiHeadAttention` (the
    teacher a linearised layer starts from); return it."""
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
    check_causal_attention_layer(layer)
    check_sequences("x", x, layer.d_model)
    q, k, _ = project_qkv(layer, x)
    k = repeat_kv(k, layer.n_heads)
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
        g, head_dim = check_heads(d_model, n_heads, n_kv_heads, head_dim)
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
        check_causal_attention_layer(layer)
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze must be a bool, got {type(freeze).__name__} ({freeze!r})")
        w = layer.q_proj.weight
        new = cls(
            layer.d_model, layer.n_heads, layer.n_kv_heads, head_dim=layer.head_dim,
            rope=layer.rope, rope_base=layer.rope_base, bias=layer.q_proj.bias is not None,
            feature_map=feature_map, feature_dim=feature_dim, window=window,
            chunk_size=chunk_size, seed=seed,
        ).to(device=w.device, dtype=w.dtype)  # fmt: skip
        for name in ATTENTION_PROJECTIONS:
            setattr(new, name, copy.deepcopy(getattr(layer, name)))
            for p in getattr(new, name).parameters():
                p.requires_grad_(not freeze)
        return new

    @property
    def n_features(self) -> int:
        """``F'``, the features of ``phi_q`` and ``phi_k``: the key dim of the linear state
        (``2F`` for Hedgehog, ``D`` for ``elu(x) + 1``, ``F`` for Performer)."""
        if self.feature_map == "hedgehog":
            return 2 * self.phi_k.feature_dim
        if self.feature_map == "performer":
            return self.phi_k.map.num_features
        return self.head_dim

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries from token to token after ``seq_len = T`` tokens.

        Per key/value head (``G`` of them, shared by their query heads) the linear state
        ``S: [F', D]`` and normaliser ``z: [F']``: ``G (F' D + F')``; with a window ``w`` also
        the keys and values of the last ``min(T, w)`` tokens, ``2 min(T, w) G D``.
        """
        check_positive_int("seq_len", seq_len)
        g, d, f = self.n_kv_heads, self.head_dim, self.n_features
        window = 0 if self.window is None else 2 * min(seq_len, self.window) * g * d
        return g * (f * d + f) + window

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
        return q, repeat_kv(k, h), repeat_kv(v, h), fq, repeat_kv(fk, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_sequences("x", x, self.d_model)
        q, k, v, fq, fk = self.features(x)
        if self.window is None:
            o, _ = linear_attention(
                fq, fk, v, scale=1.0, normalize=True, chunk_size=self.chunk_size
            )
        else:
            o = self._window_linear(q, k, v, fq, fk)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

    def step(
        self, x: torch.Tensor, state: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        r"""Continue a sequence from ``state``: the recurrent form of :meth:`forward`.

        ``x [B, t, d_model]`` are the next ``t`` tokens (a prompt, a chunk of one, or a single
        token when decoding) after the ``T`` tokens ``state`` summarises (``None``: none);
        returns ``(y [B, t, d_model], state)``. Any split of a sequence into calls gives
        :meth:`forward` on the whole of it. Per key/value head the state holds::

            k, v: [B, n, G, D]    keys (RoPE applied) and values of the last n = min(T, w)
            S: [B, G, F', D]      sum over the older keys j of phi_k(k_j) v_j^T
            z: [B, G, F']         sum over the older keys j of phi_k(k_j)
            offset: T

        so its elements are :meth:`state_size` ``(T)`` per sequence, whatever ``T``. A call
        first scores each query ``i`` against the window ``i - w < j <= i`` (held keys and
        new ones), then reads older keys through ``S`` plus the held and new keys that have
        left ``i``'s window (linear attention on keys delayed by ``w - n``), and keeps the last
        ``w`` keys, moving the rest into ``S`` and ``z``. Without a window nothing is held:
        every key goes into ``S`` and ``z`` at once (normalised linear attention).
        """
        check_sequences("x", x, self.d_model)
        b, t, _ = x.shape
        g, d, f, w = self.n_kv_heads, self.head_dim, self.n_features, self.window or 0
        if state is None:
            empty = x.new_zeros(b, 0, g, d)
            state = {"k": empty, "v": empty, "S": x.new_zeros(b, g, f, d),
                     "z": x.new_zeros(b, g, f), "offset": 0}  # fmt: skip
        held = state.get("k") if isinstance(state, Mapping) else None
        n = held.shape[1] if isinstance(held, torch.Tensor) and held.ndim == 4 else -1
        st = check_layer_state(state, {"k": (b, n, g, d), "v": (b, n, g, d), "S": (b, g, f, d),
                                       "z": (b, g, f)}, "LinearizedAttention")  # fmt: skip
        offset = st.get("offset")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"state['offset'] must be a non-negative int, got {offset!r}")
        if n != min(offset, w):
            raise ValueError(f"state must hold the last min(offset, window) = "
                             f"{min(offset, w)} keys, got {n}")  # fmt: skip
        q, k, v = project_qkv(self, x, offset)  # [B, t, H, D], [B, t, G, D]
        k_all = torch.cat([st["k"], k], dim=1)  # held keys, then the new ones: [B, n + t, G, D]
        v_all = torch.cat([st["v"], v], dim=1)
        # keys that leave the window by the last new query: they go into the linear memory
        gone = max(0, n + t - w)
        fk_gone = self.phi_k(k_all[:, :gone])  # [B, gone, G, F']
        v_gone = torch.cat([v_all[:, :gone], torch.ones_like(v_all[:, :gone, :, :1])], dim=-1)
        # query r reads, linearly, the keys gone up to index r - (w - n): delay them
        delay = (0, 0, 0, 0, w - n, 0)
        fk_del = F.pad(fk_gone, delay)[:, :t]
        v_del = F.pad(v_gone, delay)[:, :t]
        s0 = torch.cat([st["S"], st["z"][..., None]], dim=-1)  # [B, G, F', D + 1]
        h = self.n_heads
        lin, _ = linear_attention(
            self.phi_q(q), repeat_kv(fk_del, h), repeat_kv(v_del, h), scale=1.0,
            initial_state=repeat(s0, "b g f e -> b (g r) f e", r=h // g),
            chunk_size=self.chunk_size, backend="torch",
        )  # fmt: skip
        num, den = lin[..., :d], lin[..., d:]
        if w:
            # the window of query r: keys n + r - w + 1 .. n + r of k_all (absent ones masked)
            pad = (0, 0, 0, 0, w - n - 1, 0)
            k_win = repeat_kv(F.pad(k_all, pad), h).unfold(1, w, 1).transpose(-1, -2)
            v_win = repeat_kv(F.pad(v_all, pad), h).unfold(1, w, 1).transpose(-1, -2)
            slot = torch.arange(t, device=x.device)[:, None] + torch.arange(w, device=x.device)
            scores = torch.einsum("bthd,bthwd->bthw", q, k_win) * d**-0.5
            scores = scores.masked_fill((slot < w - n - 1)[None, :, None, :], float("-inf"))
            a = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            lam = self.log_linear_weight.exp().to(q.dtype)[None, None, :, None]
            num = torch.einsum("bthw,bthwd->bthd", a, v_win) + lam * num
            den = a.sum(dim=-1, keepdim=True) + lam * den
        y = self.o_proj(rearrange(num / den, "b t h d -> b t (h d)"))
        s1 = s0 + torch.einsum("bjgf,bjge->bgfe", fk_gone, v_gone)
        new = {"k": k_all[:, gone:], "v": v_all[:, gone:], "S": s1[..., :d], "z": s1[..., d],
               "offset": offset + t}  # fmt: skip
        return y, new

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
        reference for the tests and for the ``"weights"`` loss of
        :func:`effarch.experiments.attention_transfer`.
        """
        check_sequences("x", x, self.d_model)
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
