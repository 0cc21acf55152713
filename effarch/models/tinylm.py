r"""A tiny language model with a pluggable token mixer.

:class:`TinyLM` is the smallest model in which token mixers can be compared on equal terms:
the same embedding, MLPs, norms and head around whichever mixer is plugged in::

    h_0 = Embed(x)                                     # [B, T, d]
    h_l = h_{l-1} + Mixer_l(Conv_l(RMSNorm(h_{l-1})))  # token mixing: the part that varies
    h_l = h_l + MLP_l(RMSNorm(h_l))                    # channel mixing (SwiGLU or GELU)
    logits = RMSNorm(h_L) W_E^T                        # [B, T, V], head tied to the embedding

(``Conv_l`` a short causal convolution, only before mixers that lack one; see :class:`TinyLM`.)

The mixer is a name of :data:`~effarch.models.MIXERS` (softmax attention, sliding-window
attention, the linear models of chapter 2 with TTT-Linear, the state space models; see
:mod:`effarch.models.mixers`) or any callable ``(d_model, **kwargs) -> nn.Module`` whose module
maps ``[B, T, d]`` to ``[B, T, d]`` (or to a tuple whose first item is that).
:meth:`TinyLM.state_size` is the memory one layer's mixer carries from token to token.

The trainer is :func:`effarch.train.train`; the recall experiment that trains a TinyLM per
mixer and state size is :mod:`effarch.experiments.recall`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    check_callable,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_tensor,
)
from ..moe import MoELayer, upcycle
from ..nn import ShortConvolution, SwiGLU
from .block import PreNormBlock
from .mixers import (
    MIXERS,
    MixerFactory,
    SlidingWindowAttention,
    mixer_state_size,
    mixes_neighbours,
)

# MIXERS, SlidingWindowAttention and mixer_state_size live in .mixers; listed here too so that
# their old import path, effarch.models.tinylm, keeps working.
__all__ = [
    "MIXERS",
    "SlidingWindowAttention",
    "TinyLM",
    "TokenMixer",
    "mixer_state_size",
    "upcycle_tinylm",
]


# --------------------------------------------------------------------------------------------
# The mixer, wrapped
# --------------------------------------------------------------------------------------------


class TokenMixer(nn.Module):
    """Adapts any mixer to ``x [B, T, d] -> y [B, T, d]``.

    The layers of :mod:`effarch.linear.layers` and :mod:`effarch.ssm.layers` return
    ``(y, state)``; attention returns ``y``. The wrapped module is ``self.layer``.
    """

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the mixer factory must return an nn.Module, got {type(layer)}")
        self.layer, self.name = layer, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if isinstance(y, tuple):
            y = y[0]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"mixer {self.name!r} must map {tuple(x.shape)} to itself, got {got}")
        return y

    def state_size(self, seq_len: int) -> int:
        """The wrapped layer's :func:`~effarch.models.mixer_state_size` after ``seq_len`` tokens."""
        return mixer_state_size(self.layer, seq_len)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    """``W_2 (silu(W_1 x) * W_3 x)`` (SwiGLU) or ``W_2 gelu(W_1 x)``."""

    def __init__(self, d_model: int, d_ff: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, (2 if kind == "swiglu" else 1) * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class TinyLM(nn.Module):
    r"""A small pre-norm language model whose token mixer is chosen by name.

    ``logits = head(RMSNorm(h_L))`` with ``h_l = h'_l + MLP(RMSNorm(h'_l))`` and
    ``h'_l = h_{l-1} + Mixer(Conv(RMSNorm(h_{l-1})))``, ``h_0 = Embed(x)``. There are no
    positional embeddings: attention gets its positions from RoPE, the recurrent mixers from
    the order of their updates.

    ``Conv`` is a causal depthwise convolution over the last ``short_conv`` tokens (a learned
    token shift, as in H3, Based and Zoology's models), placed before mixers that do not
    already have one. It lets a single layer see a key beside the value that follows it, the
    step associative recall needs first; without it softmax attention must first grow a
    previous-token head in another layer, which takes far longer to learn. The mixers with a
    short convolution of their own (DeltaNet, Gated DeltaNet, Mamba, Mamba-2) or a token shift
    (RWKV-7) get none by default: a second one slows their learning.

    Args:
        vocab_size: ``V``.
        d_model: width ``d``.
        n_layers: number of blocks.
        mixer: a name of :data:`MIXERS` or a callable ``(d_model, **mixer_kwargs) -> module``.
        mixer_kwargs: keyword arguments of the mixer (heads, state size, ...).
        d_ff: hidden width of the MLP; default ``2 d`` for SwiGLU and ``3 d`` for GELU (both
            ``6 d^2`` weights), ``0`` for no MLP.
        mlp: ``"swiglu"``, ``"gelu"`` or ``"moe"`` (a :class:`~effarch.moe.MoELayer` of
            SwiGLU experts, each ``d_ff`` wide, configured by ``moe_kwargs``: ``n_experts``
            and ``k`` at least; the layers' routing of the last call is in
            :meth:`moe_layers`'s ``routing``).
        tie_embeddings: the head reuses the embedding matrix.
        norm_eps: epsilon of the RMSNorms.
        short_conv: width of the convolution before the mixer, ``0`` for none; default
            (``None``) 2 for mixers without a short convolution or token shift of their own,
            0 for the others.
        moe_kwargs: keyword arguments of :class:`~effarch.moe.MoELayer` for ``mlp="moe"``.

    ``forward(input_ids [B, T] long) -> logits [B, T, V]``; ``state_size(seq_len)`` gives
    :func:`mixer_state_size` of one layer.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        mixer: str | MixerFactory = "attention",
        *,
        mixer_kwargs: Mapping[str, Any] | None = None,
        d_ff: int | None = None,
        mlp: str = "swiglu",
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        short_conv: int | None = None,
        moe_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        if short_conv is not None:
            check_positive_int("short_conv", short_conv, allow_zero=True)
        check_positive_int("d_model", d_model)
        check_positive_int("n_layers", n_layers)
        check_choice("mlp", mlp, ("swiglu", "gelu", "moe"))
        moe = dict(moe_kwargs or {})
        if mlp == "moe" and not {"n_experts", "k"} <= moe.keys():
            raise ValueError(f"mlp='moe' needs moe_kwargs with n_experts and k, got {moe}")
        check_positive_number("norm_eps", norm_eps)
        if d_ff is None:
            d_ff = 3 * d_model if mlp == "gelu" else 2 * d_model
        check_positive_int("d_ff", d_ff, allow_zero=True)
        if mixer_kwargs is None:
            mixer_kwargs = {}
        if not isinstance(mixer_kwargs, Mapping):
            raise TypeError(
                f"mixer_kwargs must be a mapping or None, got {type(mixer_kwargs).__name__}"
            )
        if isinstance(mixer, str):
            if mixer not in MIXERS:
                raise ValueError(
                    f"mixer must be one of {sorted(MIXERS)} or a callable, got {mixer!r}"
                )
            name, factory = mixer, MIXERS[mixer]
        else:
            factory = check_callable("mixer", mixer)
            name = getattr(mixer, "__name__", type(mixer).__name__)
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.mixer_name, self.mixer_kwargs = name, dict(mixer_kwargs)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        blocks = []
        for _ in range(n_layers):
            mixer_module = TokenMixer(factory(d_model, **mixer_kwargs), name)
            width = short_conv
            if width is None:
                width = 0 if mixes_neighbours(mixer_module.layer) else 2
            # built in this order (convolution, then FFN) so that a seed gives the weights
            # it always gave
            conv = ShortConvolution(d_model, width, activation=False) if width else None
            ffn: nn.Module | None = None
            if d_ff and mlp == "moe":
                ffn = MoELayer(d_model, d_ff, **moe)
            elif d_ff:
                ffn = _MLP(d_model, d_ff, mlp)
            blocks.append(PreNormBlock(d_model, mixer_module, ffn, conv=conv, eps=norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = None if tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long, torch.int32))
        if input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must hold at least one token, got {tuple(input_ids.shape)}"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.vocab_size}), got values in "
                f"[{lo}, {hi}]"
            )
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)[0]
        h = self.norm(h)
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)

    def state_size(self, seq_len: int) -> int:
        """:func:`mixer_state_size` of one layer (the model keeps ``n_layers`` times this)."""
        return mixer_state_size(self.blocks[0].mixer, seq_len)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE feed-forward layers, first block first (empty unless ``mlp="moe"``)."""
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def num_parameters(self) -> int:
        """Trainable parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer_name!r}, mixer_kwargs={self.mixer_kwargs}"


@torch.no_grad()
def upcycle_tinylm(
    model: TinyLM, n_experts: int, k: int, *, noise: float = 0.0, seed: int = 0
) -> TinyLM:
    """A copy of ``model`` whose SwiGLU MLPs are upcycled into MoE layers (chapter 5.3).

    Every block's MLP becomes :func:`effarch.moe.upcycle` of it: ``n_experts`` copies of the
    trained FFN (each ``d_ff`` wide, times ``1 + noise N(0, 1)``), a fresh router choosing
    ``k`` (Mixtral's: softmax, top-k, renormalised); everything else is copied. With
    ``noise=0`` the copy computes exactly what ``model`` computes. ``model`` is unchanged.
    """
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    new = copy.deepcopy(model)
    for i, block in enumerate(new.blocks):
        mlp = block.mlp
        if not isinstance(mlp, _MLP) or mlp.kind != "swiglu":
            got = "no MLP" if mlp is None else type(mlp).__name__ + getattr(mlp, "kind", "")
            raise ValueError(f"model must have SwiGLU MLPs (mlp='swiglu'), block {i} has {got}")
        d_ff, d = mlp.down.weight.shape[1], mlp.down.weight.shape[0]
        ffn = SwiGLU(d, d_ff).to(mlp.down.weight)
        gate, up = mlp.up.weight.chunk(2, dim=0)
        ffn.gate_proj.weight.copy_(gate)
        ffn.up_proj.weight.copy_(up)
        ffn.down_proj.weight.copy_(mlp.down.weight)
        block.mlp = upcycle(ffn, n_experts, k, noise=noise, seed=seed + i)
    return new
