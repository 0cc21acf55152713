r"""The token mixers a :class:`~effarch.models.TinyLM` can be built with, and their state sizes.

:data:`MIXERS` maps a name to a factory ``(d_model, **kwargs) -> nn.Module``: softmax attention,
:class:`SlidingWindowAttention`, the linear models of chapter 2 with TTT-Linear, the state
space models, and the two intra-layer hybrids of chapter 6.2 (:class:`ParallelHybrid`:
attention and SSM heads side by side; :class:`LinearizedMixer`: a window plus a linear
memory). Every layer they build answers ``state_size(seq_len)``, the number of elements one
sequence's memory holds after ``seq_len`` tokens (each layer states its own formula);
:func:`mixer_state_size` asks any module for it, the x-axis of the recall-memory trade-off
(Arora et al., 2023, *Zoology*).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int, check_positive_number
from ..attention.grouped import MultiHeadAttention, WindowKVCache
from ..attention.mla import MultiHeadLatentAttention
from ..attention.naive import sdpa_attention
from ..linear import LinearizedAttention
from ..linear.layers import (
    GLA,
    HGRN,
    RWKV7,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    RetNet,
    TTTLinear,
)
from ..nn import ShortConvolution, init_dt_bias
from ..sparse import NativeSparseAttention
from ..ssm.layers import S4D, Mamba, Mamba2

__all__ = [
    "MIXERS",
    "LinearizedMixer",
    "MixerFactory",
    "ParallelHybrid",
    "SlidingWindowAttention",
    "carries_state",
    "mixer_state_size",
    "mixes_neighbours",
]

MixerFactory = Callable[..., nn.Module]


# --------------------------------------------------------------------------------------------
# Sliding-window attention
# --------------------------------------------------------------------------------------------


class SlidingWindowAttention(MultiHeadAttention):
    """Causal softmax attention in which each token sees only the last ``window`` tokens.

    :class:`~effarch.attention.MultiHeadAttention` with the local mask ``t - window < s <= t``
    (Mistral's sliding window, flash-attn's ``window_size=(window - 1, 0)``), run by PyTorch's
    fused attention with that mask (:func:`~effarch.attention.sdpa_attention`): the KV cache
    a decoder needs is ``window`` tokens long, whatever the context; a prefill still scores
    every pair before masking (block-sparse attention, chapter 3.4, skips the empty tiles).
    Other arguments as
    :class:`~effarch.attention.MultiHeadAttention`.
    """

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, window: int, **kw: Any
    ) -> None:
        check_positive_int("window", window)
        attention = functools.partial(sdpa_attention, window=(window - 1, 0))
        super().__init__(d_model, n_heads, n_kv_heads, attention=attention, **kw)
        self.window = window

    def new_cache(self, batch: int, max_len: int | None = None) -> WindowKVCache:
        """A :class:`~effarch.attention.WindowKVCache` of the last ``window - 1`` tokens
        (``max_len`` is accepted for :class:`~effarch.attention.KVCache`'s signature and
        ignored: the buffer never grows past the window)."""
        w = self.k_proj.weight
        return WindowKVCache(batch, self.window, self.n_kv_heads, self.head_dim, dtype=w.dtype,
                             device=w.device)  # fmt: skip

    def state_size(self, seq_len: int) -> int:
        """KV-cache elements one sequence needs after ``seq_len = T`` tokens: ``2 min(T, w) G dh``.

        Keys and values of the last ``w = window`` tokens, ``G = n_kv_heads`` heads of width
        ``dh = head_dim``: what the ``T``-th token attends to. Older entries are never read
        again; between steps the window buffer carries ``w - 1`` of them (the next token adds
        its own).
        """
        check_positive_int("seq_len", seq_len)
        return 2 * min(seq_len, self.window) * self.n_kv_heads * self.head_dim

    def extra_repr(self) -> str:
        return f"window={self.window}"


def mixes_neighbours(layer: nn.Module) -> bool:
    """Whether a mixer already mixes each token with its predecessors before its recurrence
    (a short convolution of its own, or RWKV's token shift): models put a short convolution
    before the mixers that do not (:class:`~effarch.models.TinyLM`,
    :class:`~effarch.models.HybridLM`)."""
    return isinstance(layer, RWKV7) or any(isinstance(m, ShortConvolution) for m in layer.modules())


def carries_state(layer: nn.Module) -> bool:
    """Whether ``layer.forward`` takes and returns a recurrent ``state`` (the linear and SSM
    mixers: ``forward(x, state=None) -> (y, state)``)."""
    return "state" in inspect.signature(layer.forward).parameters


# --------------------------------------------------------------------------------------------
# Attention and SSM heads in one layer (intra-layer hybrids, chapter 6.2)
# --------------------------------------------------------------------------------------------


class ParallelHybrid(nn.Module):
    r"""Attention and an SSM side by side on the same input, their outputs combined.

    ``combine="mean"`` (Hymba): ``y = (beta_a * RMSNorm(attn(x)) + beta_s * RMSNorm(ssm(x))) / 2``
    with learnable ``beta`` vectors: the two branches' outputs differ in scale, so each is
    normalised first (Hymba's Eq. 3; its output projection is each branch's own here).
    ``combine="sum"`` (Falcon-H1): ``y = attn_multiplier * attn(x) + ssm_multiplier * ssm(x)``,
    the config's ``attention_out_multiplier`` and ``ssm_out_multiplier``.

    Args:
        d_model: width.
        n_heads, n_kv_heads: the attention branch's heads.
        window: sliding-window attention of this width (Hymba uses it in most layers),
            ``None`` for global attention.
        ssm: the SSM branch, a name of :data:`MIXERS` (``"mamba"`` in Hymba, ``"mamba2"`` in
            Falcon-H1), with ``ssm_kwargs``.
        rope_base: the attention branch's RoPE base (``theta``; Falcon-H1's
            ``rope_parameters["rope_theta"]``).

    ``forward(x [B, T, d], state=None) -> (y, state)``: ``state`` holds the attention's
    key/value buffer (``"kv"``, a :class:`~effarch.attention.WindowKVCache`, growing without
    a window) and the SSM's state (``"ssm"``), so decoding continues where a call ended.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        window: int | None = None,
        ssm: str = "mamba2",
        ssm_kwargs: dict[str, Any] | None = None,
        combine: str = "mean",
        attn_multiplier: float = 1.0,
        ssm_multiplier: float = 1.0,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {combine!r}")
        if ssm not in MIXERS:
            raise ValueError(f"ssm must be a name of {sorted(MIXERS)}, got {ssm!r}")
        rope_base = check_positive_number("rope_base", rope_base)
        if window is None:
            self.attn: MultiHeadAttention = MultiHeadAttention(
                d_model, n_heads, n_kv_heads, rope_base=rope_base
            )
        else:
            self.attn = SlidingWindowAttention(
                d_model, n_heads, n_kv_heads, window=window, rope_base=rope_base
            )
        self.ssm = MIXERS[ssm](d_model, **(ssm_kwargs or {}))
        if not carries_state(self.ssm):
            raise ValueError(f"ssm must name a mixer that carries a state, got {ssm!r}")
        self.window, self.combine = window, combine
        self.attn_multiplier, self.ssm_multiplier = attn_multiplier, ssm_multiplier
        if combine == "mean":
            self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
            self.ssm_norm = nn.RMSNorm(d_model, eps=norm_eps)
            self.beta_attn = nn.Parameter(torch.ones(d_model))
            self.beta_ssm = nn.Parameter(torch.ones(d_model))

    def forward(
        self, x: torch.Tensor, state: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if state is None:
            w = self.attn.k_proj.weight
            kv = WindowKVCache(x.shape[0], self.window, self.attn.n_kv_heads, self.attn.head_dim,
                               dtype=w.dtype, device=w.device)  # fmt: skip
            ssm_state = None
        else:
            kv, ssm_state = state["kv"], state["ssm"]
        a = self.attn(x, kv)
        m, ssm_state = self.ssm(x, state=ssm_state)
        if self.combine == "mean":
            y = (self.beta_attn * self.attn_norm(a) + self.beta_ssm * self.ssm_norm(m)) / 2
        else:
            y = self.attn_multiplier * a + self.ssm_multiplier * m
        return y, {"kv": kv, "ssm": ssm_state}

    def state_size(self, seq_len: int) -> int:
        """The attention branch's cache plus the SSM's state (each layer's own formula)."""
        return self.attn.state_size(seq_len) + self.ssm.state_size(seq_len)

    @classmethod
    def from_falcon_h1(cls, cfg: Any) -> ParallelHybrid:
        """The ``combine="sum"`` layer a ``transformers`` ``FalconH1Config`` describes: its
        widths, heads, Mamba-2 fields, output multipliers and RoPE base
        (``rope_parameters["rope_theta"]``, or ``rope_theta`` on older configurations;
        10000 when neither is set). The input multipliers scale bias-free projections, so a
        checkpoint loader could fold them into the weights (the output multipliers too: they
        scale the bias-free output projections; they are kept as arguments by choice); this
        reads only the configuration and ignores them (no checkpoint loader is provided).
        ``mamba_d_ssm=None`` means ``mamba_expand * hidden_size``, as in ``transformers``.
        ``rms_norm_eps`` is the epsilon of the Mamba-2 branch's gated RMSNorm
        (``ssm_kwargs["norm_eps"]``); Falcon-H1 uses it for its blocks' RMSNorms too, which
        are :class:`HybridLM`'s ``norm_eps``.

        Not modelled: Falcon-H1's Mamba-2 applies its gated RMSNorm only when
        ``mamba_rms_norm`` is set (default ``False``: the scan output is only gated,
        ``y * silu(z)``), normalising before the gate by default
        (``mamba_norm_before_gate=True``); the Mamba-2 built here always applies its gated
        RMSNorm after the gate (as ``norm_before_gate=False``), whatever these two fields say.
        RoPE scaling types other than the default (``rope_parameters["rope_type"]``) and the
        multipliers on the embeddings, the head and the FFN are not modelled either.

        Raises:
            ValueError: the configuration's attention head width (``head_dim``, which the
                modelling code reads when present) is not ``hidden_size / num_attention_heads``,
                or ``mamba_d_ssm`` is set and is not ``mamba_expand * hidden_size``: this
                layer derives both from ``d_model`` and would build other shapes; or the
                configuration asks for biases on the projections (``attention_bias``,
                ``projectors_bias``, ``mamba_proj_bias``), which this layer does not have.
        """
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            raise ValueError(f"head_dim {head_dim} x {cfg.num_attention_heads} heads must be "
                             f"hidden_size {cfg.hidden_size} here")  # fmt: skip
        biases = [f for f in ("attention_bias", "projectors_bias", "mamba_proj_bias")
                  if getattr(cfg, f, False)]  # fmt: skip
        if biases:
            raise ValueError(f"this layer's projections have no biases; the configuration sets "
                             f"{', '.join(f'{f}=True' for f in biases)}")  # fmt: skip
        d_ssm = getattr(cfg, "mamba_d_ssm", None)
        if d_ssm is not None and d_ssm != cfg.mamba_expand * cfg.hidden_size:
            raise ValueError(f"mamba_d_ssm {d_ssm} must be None or mamba_expand x hidden_size "
                             f"= {cfg.mamba_expand * cfg.hidden_size} here")  # fmt: skip
        rope = getattr(cfg, "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("rope_theta") is not None:
            rope_base = rope["rope_theta"]
        elif getattr(cfg, "rope_theta", None) is not None:
            rope_base = cfg.rope_theta
        else:
            rope_base = 10000.0
        ssm = {"d_state": cfg.mamba_d_state, "headdim": cfg.mamba_d_head,
               "expand": cfg.mamba_expand, "ngroups": cfg.mamba_n_groups,
               "d_conv": cfg.mamba_d_conv, "chunk_size": cfg.mamba_chunk_size,
               "conv_bias": cfg.mamba_conv_bias, "norm_eps": cfg.rms_norm_eps}  # fmt: skip
        return cls(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            ssm="mamba2", ssm_kwargs=ssm, combine="sum",
            attn_multiplier=cfg.attention_out_multiplier,
            ssm_multiplier=cfg.ssm_out_multiplier, rope_base=float(rope_base),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"window={self.window}, combine={self.combine!r}"


class LinearizedMixer(nn.Module):
    r"""Sliding-window softmax plus a linear memory of older keys, as a mixer with a state.

    The sequence-wise intra-layer hybrid (LoLCATs' window + linear attention; LoLA adds a
    sparse cache beside it, Liger mixes the two parts' outputs instead of sharing one
    normalisation): a :class:`~effarch.linear.LinearizedAttention` (``self.attn``) with
    ``window=w``, whose query ``i`` scores the last ``w`` keys by softmax and every older
    key through Hedgehog features, in one normalisation. ``window=None`` is linear attention
    alone. Arguments as :class:`~effarch.linear.LinearizedAttention`.

    ``forward(x [B, T, d], state=None) -> (y, state)`` is the layer's
    :meth:`~effarch.linear.LinearizedAttention.step`: the last ``min(T, w)`` keys and
    values and the linear state ``(S, z)``, so decoding holds ``state_size(T)`` numbers,
    constant once ``T >= w``.
    """

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
        window: int | None = 16, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self.attn = LinearizedAttention(d_model, n_heads, n_kv_heads, window=window, **kwargs)

    def forward(
        self, x: torch.Tensor, state: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.attn.step(x, state)

    def state_size(self, seq_len: int) -> int:
        """:meth:`~effarch.linear.LinearizedAttention.state_size`: ``G (F' D + F')`` plus
        ``2 min(T, w) G D``."""
        return self.attn.state_size(seq_len)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def _default_heads(d_model: int) -> int:
    """Heads of width about 32: the largest ``H <= d_model / 32`` dividing ``d_model``."""
    h = max(1, d_model // 32)
    while d_model % h:
        h -= 1
    return h


def _headed(cls: type[nn.Module], **defaults: Any) -> MixerFactory:
    """A factory ``(d_model, **kwargs) -> cls(d_model, n_heads=..., **kwargs)``."""

    def make(d_model: int, **kwargs: Any) -> nn.Module:
        check_positive_int("d_model", d_model)
        kwargs = {**defaults, **kwargs}
        kwargs.setdefault("n_heads", _default_heads(d_model))
        return cls(d_model, **kwargs)

    make.__name__ = make.__qualname__ = cls.__name__
    make.__doc__ = f"Build a {cls.__name__}; ``n_heads`` defaults to ``d_model / 32``."
    return make


def _mamba2(d_model: int, **kwargs: Any) -> nn.Module:
    """Build a Mamba2; ``headdim`` defaults to ``gcd(expand d, 32)``: the largest power of
    two up to 32 that divides ``expand d`` (for ``expand d = 48``: 16, not the divisor 24)."""
    check_positive_int("d_model", d_model)
    expand = check_positive_int("expand", kwargs.get("expand", 2))
    kwargs.setdefault("headdim", math.gcd(expand * d_model, 32))
    return Mamba2(d_model, **kwargs)


def _mla(d_model: int, **kwargs: Any) -> nn.Module:
    """Build a MultiHeadLatentAttention with DeepSeek-V2's proportions at this width.

    ``n_heads`` defaults to ``d_model / 32``, ``qk_nope_head_dim = v_head_dim`` to the head
    width ``d_model / n_heads`` and ``qk_rope_head_dim`` to half of it (DeepSeek-V2: 128 and
    64), and ``kv_lora_rank`` to ``d_model / 2`` (DeepSeek-V2's 512 is 4 head widths; at
    small widths that would exceed the model's own width). The cache then holds
    ``d/2 + d_h/2`` numbers per token where multi-head attention holds ``2 d``.
    """
    check_positive_int("d_model", d_model)
    kwargs.setdefault("n_heads", _default_heads(d_model))
    head = d_model // check_positive_int("n_heads", kwargs["n_heads"])
    kwargs.setdefault("qk_nope_head_dim", head)
    kwargs.setdefault("v_head_dim", head)
    kwargs.setdefault("qk_rope_head_dim", max(2, head // 4 * 2))  # even, for RoPE
    kwargs.setdefault("kv_lora_rank", max(1, d_model // 2))
    return MultiHeadLatentAttention(d_model, **kwargs)


def _gated_deltanet(
    d_model: int,
    *,
    A_init_range: tuple[float, float] | None = None,
    dt_min: float | None = None,
    dt_max: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a GatedDeltaNet, optionally with Mamba-2's decay initialisation arguments.

    The layer draws ``A = exp(A_log)`` uniform in ``[1, 16]`` and ``softplus(dt_bias)``
    log-uniform in ``[0.001, 0.1]``; ``A_init_range``, ``dt_min`` and ``dt_max`` (as in
    :class:`~effarch.ssm.Mamba2`) redraw them, e.g. for slower decays on short tasks.
    """
    check_positive_int("d_model", d_model)
    kwargs.setdefault("n_heads", _default_heads(d_model))
    layer = GatedDeltaNet(d_model, **kwargs)
    if A_init_range is not None or dt_min is not None or dt_max is not None:
        rng = (1.0, 16.0) if A_init_range is None else A_init_range
        ok = isinstance(rng, (tuple, list)) and len(rng) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
        if not ok or not 0 < rng[0] <= rng[1]:
            raise ValueError(
                f"A_init_range must be a pair (low, high) with 0 < low <= high, got {rng!r}"
            )
        lo, hi = float(rng[0]), float(rng[1])
        dt_lo = 0.001 if dt_min is None else check_positive_number("dt_min", dt_min)
        dt_hi = 0.1 if dt_max is None else check_positive_number("dt_max", dt_max)
        if dt_lo > dt_hi:
            raise ValueError(f"dt_min ({dt_lo}) must not exceed dt_max ({dt_hi})")
        h = layer.n_heads
        with torch.no_grad():
            layer.A_log.copy_(torch.log(torch.empty(h).uniform_(lo, hi)))
            layer.dt_bias.copy_(init_dt_bias(h, dt_lo, dt_hi, 1e-4))
    return layer


#: Token mixers by name: each a callable ``(d_model, **kwargs) -> nn.Module``. Head-based
#: layers default to heads of width 32 (``n_heads = d_model / 32``); pass ``n_heads`` (or the
#: layer's own state knob, see :func:`mixer_state_size`) in ``mixer_kwargs`` to change it.
#: Every layer built here answers ``state_size(seq_len)``.
#: ``"gated_deltanet"`` also takes Mamba-2's ``A_init_range``, ``dt_min``, ``dt_max``.
MIXERS: dict[str, MixerFactory] = {
    "attention": _headed(MultiHeadAttention),
    "mla": _mla,
    "sliding_window": _headed(SlidingWindowAttention, window=16),
    "nsa": _headed(NativeSparseAttention, block=8, top_n=2, window=16),
    "linear_attention": _headed(LinearAttention),
    "retnet": _headed(RetNet),
    "gla": _headed(GLA),
    "deltanet": _headed(DeltaNet),
    "gated_deltanet": _gated_deltanet,
    "hgrn": HGRN,
    "rwkv7": _headed(RWKV7),
    "ttt_linear": _headed(TTTLinear),
    "mamba": Mamba,
    "mamba2": _mamba2,
    "s4d": S4D,
    "parallel_hybrid": _headed(ParallelHybrid),
    "linearized": _headed(LinearizedMixer),
}


def mixer_state_size(mixer: nn.Module, seq_len: int) -> int:
    r"""Numbers one sequence's mixer keeps from token to token after ``seq_len`` tokens.

    The recurrent memory of one layer, per sequence (batch of one): the module's own
    ``state_size(seq_len)``. The layers of :data:`MIXERS` answer:

    ==============================  ============================================  ================
    mixer                           elements                                      knob
    ==============================  ============================================  ================
    attention (KV cache)            ``2 T G dh``                                  ``T``, ``dh``
    MLA (latent cache)              ``T (d_c + d_r)``                             ``kv_lora_rank``
    sliding-window attention        ``2 min(T, w) G dh``                          ``window``
    NSA (KV cache + block means)    ``2 (T + T // l) G dh``                       ``block``
    linear attention                ``H K K`` (+ ``H K`` normaliser)              ``n_heads``
    RetNet, GLA, Gated DeltaNet     ``H K V``                                     ``n_heads``,
                                                                                  ``expand_k/v``
    DeltaNet, RWKV-7                ``H K K``                                     ``n_heads``
    TTT-Linear                      ``2 H K K`` (weights and mini-batch anchor)   ``n_heads``
    HGRN                            ``expand_ratio d``                            ``expand_ratio``
    Mamba, Mamba-2                  ``expand d N``                                ``d_state``
    S4D                             ``d N`` (``N / 2`` complex per channel)       ``d_state``
    parallel hybrid                 its attention's plus its SSM's                both
    linearized (window + linear)    ``G (F dh + F) + 2 min(T, w) G dh``           ``window``
    ==============================  ============================================  ================

    (``T = seq_len``, ``G`` key/value heads of width ``dh``, ``H`` heads with key and value
    widths ``K``, ``V``, ``F`` features per head; at fixed ``d_model`` fewer heads mean a
    bigger state, ``H (d/H)^2 = d^2 / H``.) Short-convolution caches, token shifts and
    position counters (the last few inputs or a count, not a memory of the context) are not
    counted. The formulas live with the layers; this table only gathers them.

    Args:
        mixer: any module with a ``state_size(seq_len)`` method: a layer of :data:`MIXERS`, a
            :class:`~effarch.models.TokenMixer` or a :class:`~effarch.models.TinyLM` (one
            layer's mixer; every layer has the same).
        seq_len: ``T``, the context the state has absorbed.

    Returns:
        The number of elements.
    """
    check_positive_int("seq_len", seq_len)
    if not isinstance(mixer, nn.Module):
        raise TypeError(f"mixer must be an nn.Module, got {type(mixer).__name__}")
    state_size = getattr(mixer, "state_size", None)
    if not callable(state_size):
        raise TypeError(
            f"mixer_state_size does not know {type(mixer).__name__}; give the module a "
            "state_size(seq_len) method"
        )
    return int(state_size(seq_len))
