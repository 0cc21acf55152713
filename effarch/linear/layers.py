r"""Token-mixing layers built on the linear-attention ops, each with a step-by-step decode path.

Every layer here is an ``nn.Module`` with the same interface::

    y, new_state = layer(x, state=None)  # x, y: [B, T, d_model]

``state`` is ``None`` at the start of a sequence, and otherwise the ``new_state`` returned by
the previous call: a ``dict`` of tensors holding all that is needed to continue, i.e. the
recurrent state ``S: [B, H, K, V]`` of the op and, for layers with short convolutions, the last
``conv_size - 1`` inputs of each convolution (``[B, conv_size - 1, channels]``). Hence

    layer(x)  ==  layer(x[:, :n]) then layer(x[:, n:], state)  ==  T calls on single tokens,

which is what makes these layers usable for autoregressive decoding at ``O(1)`` cost per token.
Sequences of more than one token run the ops' chunkwise-parallel form (``mode="chunk"``), single
tokens the recurrent form (``mode="recurrent"``); both compute the same recurrence.

Layers, following the flash-linear-attention (fla) layers of the same names:

* :class:`LinearAttention`: ``fla.layers.LinearAttention`` (Katharopoulos et al., 2020).
* :class:`RetNet`: ``fla.layers.MultiScaleRetention`` (Sun et al., 2023).
* :class:`GLA`: ``fla.layers.GatedLinearAttention`` (Yang et al., 2024).
* :class:`DeltaNet`: ``fla.layers.DeltaNet`` (Yang et al., 2024).
* :class:`GatedDeltaNet`: ``fla.layers.GatedDeltaNet`` (Yang et al., 2025).
* :class:`HGRN`: ``fla.layers.HGRNAttention`` (Qin et al., 2023).
* :class:`RWKV7`: a simplified ``fla.layers.RWKV7Attention`` (Peng et al., 2025).
* :class:`TTTLinear`: TTT-Linear (Sun et al., 2024), after the layer of its reference code
  (in :mod:`effarch.linear.ttt_layer`, re-exported here).

The parameters follow the dtype of the module (``layer.double()`` for float64); ``x`` must have
that dtype. The building blocks (:class:`~effarch.nn.ShortConvolution`, the gated RMSNorm, the
step-size initialisation) live in :mod:`effarch.nn`, shared with :mod:`effarch.ssm.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    State,
    check_choice,
    check_divides,
    check_layer_input,
    check_layer_state,
    check_positive_int,
    check_positive_number,
)
from ..attention.rope import apply_rope
from ..nn import GatedRMSNorm, ShortConvolution, init_dt_bias, l2norm, merge_heads, split_heads
from .conv_qkv import ConvQKV
from .feature_maps import elu_plus_one, relu
from .hgrn import hgrn
from .ops import delta_rule, dplr_delta_rule, gated_delta_rule, gla, linear_attention, retention
from .ttt_layer import TTTLinear

__all__ = [
    "GLA",
    "HGRN",
    "RWKV7",
    "DeltaNet",
    "GatedDeltaNet",
    "LinearAttention",
    "RetNet",
    "ShortConvolution",
    "TTTLinear",
]


# --------------------------------------------------------------------------------------------
# Shared by the layers below
# --------------------------------------------------------------------------------------------


def _op_mode(t: int) -> str:
    return "recurrent" if t == 1 else "chunk"


def _expanded_width(name: str, d_model: int, expand: float) -> int:
    """``d_model * expand`` (the argument ``name``) as an int; a ValueError unless the product
    is a whole number (``int()`` would silently truncate it)."""
    width = d_model * expand
    if not math.isclose(width, round(width), rel_tol=0.0, abs_tol=1e-9):
        raise ValueError(
            f"d_model * {name} must be a whole number (a layer width), got "
            f"{d_model} * {expand!r} = {width!r}"
        )
    return round(width)


# --------------------------------------------------------------------------------------------
# Linear attention
# --------------------------------------------------------------------------------------------

_FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": elu_plus_one,
    "relu": relu,
    "identity": lambda x: x,
}


class LinearAttention(nn.Module):
    r"""Causal linear attention as a token mixer (fla's ``LinearAttention``).

    With ``phi`` the feature map, per head ``h`` (dims ``K = V = d_model / H``)::

        q_t, k_t, v_t = phi(W_q x_t), phi(W_k x_t), W_v x_t          # [H, K], [H, K], [H, V]
        S_t = S_{t-1} + k_t v_t^T                                    # [K, V]
        z_t = z_{t-1} + k_t                                          # [K]   (normalize only)
        o_t = S_t^T q_t / (q_t . z_t)       (normalize=True)
        o_t = S_t^T q_t K^-1/2              (normalize=False)
        y_t = W_o [RMSNorm(o_t^(1)), ..., RMSNorm(o_t^(H))]          # per-head RMSNorm

    ``normalize=True`` divides by the sum of the (positive) attention weights
    ``q_t . k_s`` over ``s <= t``, as in Katharopoulos et al.; it needs positive features, so it
    is only allowed with ``feature_map="elu"`` (``elu(x) + 1 > 0``). Without it the output is the
    raw, scaled sum, which fla's layer gets with ``do_feature_map_norm=False``; the per-head
    RMSNorm (fla's ``output_norm="rmsnorm"``) keeps its scale in check either way.

    The defaults differ from fla's: here ``feature_map="elu"`` and ``normalize=True``
    (Katharopoulos et al.'s layer); fla's ``LinearAttention`` defaults to
    ``feature_map='elementwise_product'`` (a learned ``W_1 x * W_2 x``, which is not offered
    here) and ``do_feature_map_norm=False`` (no normaliser).

    Args:
        d_model: model width; ``n_heads`` must divide it.
        n_heads: ``H``.
        feature_map: ``"elu"`` (``elu(x) + 1``), ``"relu"`` or ``"identity"``.
        normalize: divide by the running normaliser (see above).
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V]}``, plus ``"z": [B, H, K]`` with ``normalize``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        feature_map: str = "elu",
        *,
        normalize: bool = True,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_choice("feature_map", feature_map, tuple(_FEATURE_MAPS))
        check_positive_int("chunk_size", chunk_size)
        if normalize and feature_map != "elu":
            raise ValueError(
                f"normalize=True needs positive features, i.e. feature_map='elu', got "
                f"{feature_map!r}; pass normalize=False"
            )
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = check_divides("d_model", d_model, "n_heads", n_heads)
        self.feature_map, self.normalize, self.chunk_size = feature_map, normalize, chunk_size
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K K`` (``S``), plus ``H K`` (``z``) with
        ``normalize``; ``K = d_model / H``, whatever ``seq_len``."""
        check_positive_int("seq_len", seq_len)
        h, k = self.n_heads, self.head_dim
        return h * k * k + (h * k if self.normalize else 0)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h, d = self.n_heads, self.head_dim
        shapes = {"S": (b, h, d, d)}
        if self.normalize:
            shapes["z"] = (b, h, d)
        st = check_layer_state(state, shapes, type(self).__name__)
        phi = _FEATURE_MAPS[self.feature_map]
        q = phi(split_heads(self.q_proj(x), h))
        k = phi(split_heads(self.k_proj(x), h))
        v = split_heads(self.v_proj(x), h)
        s0: Any = None
        if st:
            s0 = (st["S"], st["z"]) if self.normalize else st["S"]
        o, final = linear_attention(
            q, k, v, normalize=self.normalize, initial_state=s0, output_final_state=True,
            mode=_op_mode(t), chunk_size=self.chunk_size,
        )  # fmt: skip
        new = {"S": final[0], "z": final[1]} if self.normalize else {"S": final}
        return self.o_proj(merge_heads(self.o_norm(o))), new


# --------------------------------------------------------------------------------------------
# RetNet
# --------------------------------------------------------------------------------------------


class RetNet(nn.Module):
    r"""Multi-scale retention (RetNet, Sun et al., 2023; fla's ``MultiScaleRetention``).

    Per head ``h`` with the fixed decay ``gamma_h = 1 - 2^(-5-h)`` (dims ``K = d_model / H``,
    ``V = expand_v d_model / H``)::

        q_t, k_t = RoPE(W_q x_t, p_t), RoPE(W_k x_t, p_t)            # [H, K]
        v_t, g_t = W_v x_t, W_g x_t                                  # [H, V], [H V]
        S_t = gamma_h S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t K^-1/2  # retention
        y_t = W_o ( GroupNorm_H(o_t) * swish(g_t) )

    ``p_t`` is the absolute position (RoPE in the rotate-half layout of
    :mod:`effarch.attention.rope`; RetNet's xPos adds a length extrapolation factor on top of
    that rotation, fla uses plain RoPE, as here). ``GroupNorm_H`` normalises each head's ``V``
    outputs separately (RetNet's group norm, one group per head: ``nn.GroupNorm(H, H V)``) with
    a learned affine map over all ``H V`` channels. fla's ``MultiScaleRetention`` differs
    here: it uses ``FusedRMSNormGated(head_v_dim)``, a per-head RMSNorm (no mean subtracted,
    no bias) with one weight of ``V`` entries shared by all heads, fused with the swish gate.

    Args:
        d_model, n_heads: width and heads ``H`` (``H`` divides ``d_model``; with RoPE the head
            dim must be even).
        expand_v: value width ``expand_v * d_model`` (RetNet and fla use 2).
        rope: rotate ``q`` and ``k`` by their position.
        rope_base: RoPE's base.
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V], "offset": int}``, ``offset`` the tokens seen so far.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        expand_v: int = 2,
        rope: bool = True,
        rope_base: float = 10000.0,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("expand_v", expand_v)
        check_positive_number("rope_base", rope_base)
        check_positive_int("chunk_size", chunk_size)
        self.d_model, self.n_heads = d_model, n_heads
        self.head_k = check_divides("d_model", d_model, "n_heads", n_heads)
        if rope and self.head_k % 2:
            raise ValueError(f"RoPE needs an even head dim, got d_model / n_heads = {self.head_k}")
        self.value_dim = expand_v * d_model
        self.head_v = self.value_dim // n_heads
        self.rope, self.rope_base, self.chunk_size = rope, rope_base, chunk_size
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_norm = nn.GroupNorm(n_heads, self.value_dim, eps=1e-5)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K V`` (``S``), whatever ``seq_len``; the position
        ``offset`` is not counted."""
        check_positive_int("seq_len", seq_len)
        return self.n_heads * self.head_k * self.head_v

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h = self.n_heads
        st = check_layer_state(state, {"S": (b, h, self.head_k, self.head_v)}, "RetNet")
        if st and "offset" not in st:  # without it RoPE would restart at position 0
            raise ValueError(
                "state of RetNet must hold the keys ['S', 'offset'] (the dict RetNet.forward "
                f"returns), missing ['offset']; got the keys {sorted(st)}"
            )
        offset = st.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"state['offset'] must be a non-negative int, got {offset!r}")
        q = split_heads(self.q_proj(x), h)
        k = split_heads(self.k_proj(x), h)
        v = split_heads(self.v_proj(x), h)
        if self.rope:
            pos = torch.arange(offset, offset + t, device=x.device)
            q = apply_rope(q, pos, base=self.rope_base)
            k = apply_rope(k, pos, base=self.rope_base)
        o, s = retention(
            q, k, v, initial_state=st.get("S"), output_final_state=True, mode=_op_mode(t),
            chunk_size=self.chunk_size,
        )  # fmt: skip
        o = self.g_norm(merge_heads(o).reshape(b * t, self.value_dim)).reshape(b, t, -1)
        y = self.o_proj(o * F.silu(self.g_proj(x)))
        return y, {"S": s, "offset": offset + t}


# --------------------------------------------------------------------------------------------
# Gated linear attention
# --------------------------------------------------------------------------------------------


class GLA(nn.Module):
    r"""Gated linear attention (Yang et al., 2024; fla's ``GatedLinearAttention``).

    Per head (``K = expand_k d_model / H``, ``V = expand_v d_model / H``, ``r`` the gate rank)::

        q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t                     # [H, K], [H, K], [H, V]
        alpha_t = logsigmoid(W_2 W_1 x_t + b) / tau                   # [H, K], W_1: r x d
        S_t = diag(exp(alpha_t)) S_{t-1} + k_t v_t^T                  # [K, V] per head
        o_t = S_t^T q_t K^-1/2
        y_t = W_o ( RMSNorm(o_t) * swish(W_g x_t) )                   # per-head RMSNorm

    The key gates are data dependent and low rank (``gate_low_rank = r = 16``), and the
    temperature ``tau = gate_logit_normalizer = 16`` keeps the decays ``exp(alpha)`` close to 1,
    as in the paper: ``alpha`` lies in ``(-inf, 0]``, and at init, with unit-variance inputs,
    the gate logits are small and centred at 0, so ``alpha`` is centred at ``-log(2)/16``
    (about half of it in ``[-log(2)/16, 0]``) and nearly all of it lies in
    ``[-log(2)/8, 0]``: decays between about 0.92 and 1.

    Args:
        d_model, n_heads: width and heads.
        gate_low_rank: ``r``.
        expand_k, expand_v: key and value widths relative to ``d_model`` (fla: 0.5 and 1);
            ``d_model * expand_k`` and ``d_model * expand_v`` must be whole numbers (fla
            truncates them with ``int``; a ValueError here).
        gate_logit_normalizer: ``tau``.
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V]}``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        gate_low_rank: int = 16,
        *,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_logit_normalizer: float = 16.0,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("gate_low_rank", gate_low_rank)
        check_positive_number("expand_k", expand_k)
        check_positive_number("expand_v", expand_v)
        check_positive_number("gate_logit_normalizer", gate_logit_normalizer)
        check_positive_int("chunk_size", chunk_size)
        self.d_model, self.n_heads = d_model, n_heads
        self.key_dim = _expanded_width("expand_k", d_model, expand_k)
        self.value_dim = _expanded_width("expand_v", d_model, expand_v)
        check_positive_int("key dim (d_model * expand_k)", self.key_dim)
        check_positive_int("value dim (d_model * expand_v)", self.value_dim)
        self.head_k = check_divides(
            "key dim (d_model * expand_k)", self.key_dim, "n_heads", n_heads
        )
        self.head_v = check_divides(
            "value dim (d_model * expand_v)", self.value_dim, "n_heads", n_heads
        )
        self.gate_logit_normalizer, self.chunk_size = float(gate_logit_normalizer), chunk_size
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, gate_low_rank, bias=False),
            nn.Linear(gate_low_rank, self.key_dim, bias=True),
        )
        self.g_norm = GatedRMSNorm(self.head_v)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K V`` (``S``), whatever ``seq_len``."""
        check_positive_int("seq_len", seq_len)
        return self.n_heads * self.head_k * self.head_v

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h = self.n_heads
        st = check_layer_state(state, {"S": (b, h, self.head_k, self.head_v)}, "GLA")
        q = split_heads(self.q_proj(x), h)
        k = split_heads(self.k_proj(x), h)
        v = split_heads(self.v_proj(x), h)
        gk = split_heads(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer, h)
        o, s = gla(
            q, k, v, gk, initial_state=st.get("S"), output_final_state=True, mode=_op_mode(t),
            chunk_size=self.chunk_size,
        )  # fmt: skip
        g = split_heads(self.g_proj(x), h)
        return self.o_proj(merge_heads(self.g_norm(o, g))), {"S": s}


# --------------------------------------------------------------------------------------------
# DeltaNet and Gated DeltaNet
# --------------------------------------------------------------------------------------------


class DeltaNet(nn.Module):
    r"""DeltaNet (Schlag et al., 2021; Yang et al., 2024; fla's ``DeltaNet``).

    Per head (``K = V = d_model / H``; ``conv`` a causal depthwise convolution of width
    ``conv_size`` over time)::

        q_t = L2norm(silu(conv(W_q x))_t),  k_t = L2norm(silu(conv(W_k x))_t)   # [H, K]
        v_t = silu(conv(W_v x))_t                                                # [H, V]
        beta_t = sigmoid(W_b x_t)                                                # [H]
        S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T                       # delta rule
        o_t = S_t^T q_t K^-1/2
        y_t = W_o RMSNorm(o_t)                                                   # per head

    With ``allow_neg_eigval`` the write strength is ``2 sigmoid(.)`` in ``(0, 2)``, so that the
    transition ``I - beta k k^T`` may have a negative eigenvalue (Grazzi et al., 2025).

    Args:
        d_model, n_heads: width and heads.
        conv_size: width of the short convolutions (fla's default 4).
        allow_neg_eigval: see above.
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V], "conv_q": [B, W-1, d], "conv_k": ..., "conv_v": ...}``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        conv_size: int = 4,
        *,
        allow_neg_eigval: bool = False,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("chunk_size", chunk_size)
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = check_divides("d_model", d_model, "n_heads", n_heads)
        self.allow_neg_eigval, self.chunk_size = allow_neg_eigval, chunk_size
        self.qkv = ConvQKV(d_model, d_model, d_model, conv_size)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        self.o_norm = GatedRMSNorm(self.head_dim)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K K`` (``S``), whatever ``seq_len``; the
        convolution caches are not counted."""
        check_positive_int("seq_len", seq_len)
        return self.n_heads * self.head_dim**2

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h, d = self.n_heads, self.head_dim
        st = check_layer_state(state, {"S": (b, h, d, d), **self.qkv.state_shapes(b)}, "DeltaNet")
        q, k, v, conv = self.qkv(x, st)
        q, k = l2norm(split_heads(q, h)), l2norm(split_heads(k, h))
        beta = torch.sigmoid(self.b_proj(x))
        if self.allow_neg_eigval:
            beta = 2 * beta
        o, s = delta_rule(
            q, k, split_heads(v, h), beta, initial_state=st.get("S"), output_final_state=True,
            mode=_op_mode(t), chunk_size=self.chunk_size,
        )  # fmt: skip
        return self.o_proj(merge_heads(self.o_norm(o))), {"S": s, **conv}


class GatedDeltaNet(nn.Module):
    r"""Gated DeltaNet (Yang et al., 2025; fla's ``GatedDeltaNet``): DeltaNet with a decay.

    As :class:`DeltaNet` (``K = d_model / H``, ``V = expand_v K``), plus a scalar decay per head
    and step in Mamba-2's parameterisation and an output gate::

        g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)                  # [H], log decay <= 0
        S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
        o_t = S_t^T q_t K^-1/2
        y_t = W_o ( RMSNorm(o_t) * silu(W_g x_t) )                       # per head

    ``A = exp(A_log)`` starts uniform in ``[1, 16]`` (Mamba-2's ``A_init_range``) and
    ``softplus(dt_bias)`` log-uniform in ``[0.001, 0.1]``, so ``exp(g)`` starts close to 1.
    fla's ``GatedDeltaNet`` layer draws ``A`` with ``uniform_(0, 16)`` instead, which allows
    values near 0 (heads that barely decay).

    Args:
        d_model, n_heads: width and heads.
        conv_size: width of the short convolutions.
        expand_v: value head dim relative to the key head dim (fla's default 2).
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` as in :class:`DeltaNet`.
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V], "conv_q", "conv_k", "conv_v"}`` as in :class:`DeltaNet`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        conv_size: int = 4,
        *,
        expand_v: int = 2,
        allow_neg_eigval: bool = False,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("expand_v", expand_v)
        check_positive_int("chunk_size", chunk_size)
        self.d_model, self.n_heads = d_model, n_heads
        self.head_k = check_divides("d_model", d_model, "n_heads", n_heads)
        self.head_v = expand_v * self.head_k
        self.value_dim = n_heads * self.head_v
        self.allow_neg_eigval, self.chunk_size = allow_neg_eigval, chunk_size
        self.qkv = ConvQKV(d_model, d_model, self.value_dim, conv_size)
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1.0, 16.0)))
        self.dt_bias = nn.Parameter(init_dt_bias(n_heads, 0.001, 0.1, 1e-4))
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K V`` (``S``), whatever ``seq_len``; the
        convolution caches are not counted."""
        check_positive_int("seq_len", seq_len)
        return self.n_heads * self.head_k * self.head_v

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h = self.n_heads
        shapes = {"S": (b, h, self.head_k, self.head_v), **self.qkv.state_shapes(b)}
        st = check_layer_state(state, shapes, "GatedDeltaNet")
        q, k, v, conv = self.qkv(x, st)
        q, k = l2norm(split_heads(q, h)), l2norm(split_heads(k, h))
        g = -torch.exp(self.A_log) * F.softplus(self.a_proj(x) + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x))
        if self.allow_neg_eigval:
            beta = 2 * beta
        o, s = gated_delta_rule(
            q, k, split_heads(v, h), g, beta, initial_state=st.get("S"),
            output_final_state=True, mode=_op_mode(t), chunk_size=self.chunk_size,
        )  # fmt: skip
        o = self.o_norm(o, split_heads(self.g_proj(x), h))
        return self.o_proj(merge_heads(o)), {"S": s, **conv}


# --------------------------------------------------------------------------------------------
# HGRN
# --------------------------------------------------------------------------------------------


class HGRN(nn.Module):
    r"""HGRN's gated linear recurrence as a token mixer (Qin et al., 2023; fla's ``HGRNAttention``).

    Elementwise over ``D = expand_ratio d_model`` channels::

        f_t = lb + (1 - lb) sigmoid(W_f x_t)          # forget gate in (lb, 1)
        i_t = silu(W_i x_t) * (1 - f_t)               # input, tied to the forget gate
        h_t = f_t * h_{t-1} + i_t                     # the hgrn op, with g_t = log f_t
        y_t = W_o ( RMSNorm(h_t) * silu(W_g x_t) )

    ``lb = lower_bound`` keeps the forget gate away from 0 (HGRN raises it from layer to layer so
    that upper layers model long-range dependencies); ``None`` means ``lb = 0``, where
    ``log f = logsigmoid(W_f x)`` and ``1 - f = sigmoid(-W_f x)`` are used directly.

    Args:
        d_model: width.
        expand_ratio: recurrence width relative to ``d_model``.
        lower_bound: ``lb`` in ``[0, 1)`` or ``None``.

    State: ``{"h": [B, D]}``.
    """

    def __init__(
        self, d_model: int, *, expand_ratio: int = 1, lower_bound: float | None = None
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("expand_ratio", expand_ratio)
        if lower_bound is not None:
            check_positive_number("lower_bound", lower_bound, allow_zero=True)
            if lower_bound >= 1:
                raise ValueError(f"lower_bound must lie in [0, 1), got {lower_bound!r}")
        self.d_model, self.lower_bound = d_model, lower_bound
        self.hidden = expand_ratio * d_model
        self.i_proj = nn.Linear(d_model, self.hidden, bias=False)
        self.f_proj = nn.Linear(d_model, self.hidden, bias=False)
        self.g_proj = nn.Linear(d_model, self.hidden, bias=False)
        self.g_norm = GatedRMSNorm(self.hidden)
        self.o_proj = nn.Linear(self.hidden, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``D = expand_ratio d_model`` (``h``), whatever
        ``seq_len``."""
        check_positive_int("seq_len", seq_len)
        return self.hidden

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        st = check_layer_state(state, {"h": (b, self.hidden)}, "HGRN")
        f_logit = self.f_proj(x)
        if self.lower_bound is None:
            log_f, one_minus_f = F.logsigmoid(f_logit), torch.sigmoid(-f_logit)
        else:
            lb = self.lower_bound
            f = lb + (1 - lb) * torch.sigmoid(f_logit)
            log_f, one_minus_f = torch.log(f), (1 - lb) * torch.sigmoid(-f_logit)
        i = F.silu(self.i_proj(x)) * one_minus_f
        o, h = hgrn(
            i, log_f, initial_state=st.get("h"), output_final_state=True,
            mode="recurrent" if t == 1 else "scan",
        )  # fmt: skip
        return self.o_proj(self.g_norm(o, self.g_proj(x))), {"h": h}


# --------------------------------------------------------------------------------------------
# RWKV-7 (simplified)
# --------------------------------------------------------------------------------------------


class _LoRA(nn.Module):
    """``x -> W_2 act(W_1 x) (+ b)``: RWKV's low-rank maps."""

    def __init__(self, d_in: int, rank: int, d_out: int, act: nn.Module, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.act = act
        self.up = nn.Linear(rank, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class RWKV7(nn.Module):
    r"""A simplified RWKV-7 time mix (Peng et al., 2025), after fla's ``RWKV7Attention``.

    Token shift mixes each input with the previous one, ``x^c_t = x_t + mu_c (x_{t-1} - x_t)``
    with a learned ``mu_c: [d]`` for each of ``c = r, w, k, v, a, g``. Then, per head
    (``K = V = d_model / H``)::

        r_t, k~_t, v_t = W_r x^r_t, W_k x^k_t, W_v x^v_t
        w_t = -exp(-1/2) sigmoid(w0 + LoRA_w(x^w_t))              # log decay in (-0.61, 0)
        a_t = sigmoid(a0 + LoRA_a(x^a_t))                         # in-context learning rate
        kappa_t = L2norm(k~_t * k_k)                              # removal key, per head
        k_t = k~_t * (1 + (a_t - 1) k_a)                          # replacement key
        S_t = (diag(exp(w_t)) - (a_t * kappa_t) kappa_t^T) S_{t-1} + k_t v_t^T   # [K, V]
        o_t = GroupNorm_H(S_t^T r_t) + ((r_t * k_t * r_k) . 1) v_t   # plus the "bonus"
        y_t = W_o ( o_t * LoRA_g(x^g_t) ),    LoRA_g = W_2 sigmoid(W_1 .)

    The transition is the op :func:`~effarch.linear.ops.dplr_delta_rule` with ``a = -kappa``,
    ``b = kappa * a_t`` and ``gk = w_t``, with ``scale = 1`` (RWKV does not scale ``r``).

    Simplified with respect to RWKV-7: no value residual (the first layer's ``v`` mixed into
    later layers), plain learned token-shift weights (no data-dependent ``ddlerp``), no
    channel-mix block, and ordinary PyTorch initialisation rather than RWKV's layer-dependent
    one. The recurrence itself is RWKV-7's generalised delta rule.

    Args:
        d_model, n_heads: width and heads.
        decay_low_rank, a_low_rank, gate_low_rank: ranks of the LoRA maps.
        chunk_size: chunk length of the op's chunk mode.

    State: ``{"S": [B, H, K, V], "shift": [B, d_model]}`` (the last input token).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        decay_low_rank: int = 16,
        a_low_rank: int = 16,
        gate_low_rank: int = 16,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        for name, r in (("decay_low_rank", decay_low_rank), ("a_low_rank", a_low_rank),
                        ("gate_low_rank", gate_low_rank), ("chunk_size", chunk_size)):  # fmt: skip
            check_positive_int(name, r)
        self.chunk_size = chunk_size
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = check_divides("d_model", d_model, "n_heads", n_heads)
        self.mu = nn.Parameter(torch.rand(6, d_model))  # r, w, k, v, a, g
        self.r_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.w_lora = _LoRA(d_model, decay_low_rank, d_model, nn.Tanh(), bias=True)
        self.a_lora = _LoRA(d_model, a_low_rank, d_model, nn.Identity(), bias=True)
        self.g_lora = _LoRA(d_model, gate_low_rank, d_model, nn.Sigmoid(), bias=False)
        self.k_k = nn.Parameter(torch.full((d_model,), 0.85))
        self.k_a = nn.Parameter(torch.ones(d_model))
        self.r_k = nn.Parameter(0.1 * torch.randn(n_heads, self.head_dim))
        self.g_norm = nn.GroupNorm(n_heads, d_model, eps=self.head_dim * 1e-5)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries: ``H K K`` (``S``), whatever ``seq_len``; the token
        shift (the last input) is not counted."""
        check_positive_int("seq_len", seq_len)
        return self.n_heads * self.head_dim**2

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h, d = self.n_heads, self.head_dim
        st = check_layer_state(state, {"S": (b, h, d, d), "shift": (b, self.d_model)}, "RWKV7")
        prev = x.new_zeros(b, 1, self.d_model) if not st else st["shift"][:, None].to(x.dtype)
        delta = torch.cat([prev, x[:, :-1]], dim=1) - x
        xr, xw, xk, xv, xa, xg = (x + delta * m for m in self.mu)
        r = split_heads(self.r_proj(xr), h)
        k = split_heads(self.k_proj(xk), h)
        v = split_heads(self.v_proj(xv), h)
        w = split_heads(-math.exp(-0.5) * torch.sigmoid(self.w_lora(xw)), h)
        a = split_heads(torch.sigmoid(self.a_lora(xa)), h)
        kappa = l2norm(k * split_heads(self.k_k.view(1, 1, -1), h))
        k = k * (1 + (a - 1) * split_heads(self.k_a.view(1, 1, -1), h))
        o, s = dplr_delta_rule(
            r, k, v, -kappa, kappa * a, w, scale=1.0, initial_state=st.get("S"),
            output_final_state=True, mode=_op_mode(t), chunk_size=self.chunk_size,
        )  # fmt: skip
        o = self.g_norm(merge_heads(o).reshape(b * t, self.d_model)).reshape(b, t, h, d)
        o = o + (r * k * self.r_k).sum(-1, keepdim=True) * v
        y = self.o_proj(merge_heads(o) * self.g_lora(xg))
        return y, {"S": s, "shift": x[:, -1]}
