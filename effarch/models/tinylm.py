r"""A tiny language model with a pluggable token mixer, its trainer and the recall experiment.

:class:`TinyLM` is the smallest model in which token mixers can be compared on equal terms:
the same embedding, MLPs, norms and head around whichever mixer is plugged in::

    h_0 = Embed(x)                                     # [B, T, d]
    h_l = h_{l-1} + Mixer_l(Conv_l(RMSNorm(h_{l-1})))  # token mixing: the part that varies
    h_l = h_l + MLP_l(RMSNorm(h_l))                    # channel mixing (SwiGLU or GELU)
    logits = RMSNorm(h_L) W_E^T                        # [B, T, V], head tied to the embedding

(``Conv_l`` a short causal convolution, only before mixers that lack one; see :class:`TinyLM`.)

The mixer is a name of :data:`MIXERS` (softmax attention, sliding-window attention, the linear
models of chapter 2 with TTT-Linear, the state space models) or any callable
``(d_model, **kwargs) -> nn.Module`` whose module maps ``[B, T, d]`` to ``[B, T, d]`` (or to a
tuple whose first item is that).

:func:`mixer_state_size` gives the memory each mixer carries from token to token, the x-axis
of the recall-memory trade-off (Arora et al., 2023, *Zoology*): the KV cache for attention
(``2 T G dh`` numbers, growing with the context), a fixed state for the others (``H K V`` for
linear attention and the delta rules, ``E N`` for Mamba). :func:`train` fits a model to
multi-query associative recall (:func:`effarch.tasks.mqar`) on a CPU in seconds, and
:func:`recall_experiment` trains each mixer at several state sizes and records its recall,
state size, parameters and throughput. :data:`RECALL_CPU` and :data:`RECALL_GPU` are the two
sizes of that experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._checks import (
    check_callable,
    check_choice,
    check_positive_int,
    check_positive_number,
    check_tensor,
)
from ..attention.grouped import MultiHeadAttention
from ..attention.naive import naive_attention
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
from ..ssm.layers import S4D, Mamba, Mamba2
from ..tasks.mqar import IGNORE_INDEX, MQARBatch, mqar, recall_accuracy

__all__ = [
    "MIXERS",
    "RECALL_CPU",
    "RECALL_GPU",
    "RecallConfig",
    "SlidingWindowAttention",
    "TinyLM",
    "TokenMixer",
    "TrainResult",
    "evaluate",
    "mixer_state_size",
    "recall_experiment",
    "train",
]

MixerFactory = Callable[..., nn.Module]


# --------------------------------------------------------------------------------------------
# Mixers
# --------------------------------------------------------------------------------------------


class SlidingWindowAttention(MultiHeadAttention):
    """Causal softmax attention in which each token sees only the last ``window`` tokens.

    :class:`~effarch.attention.MultiHeadAttention` with the local mask ``t - window < s <= t``
    (Mistral's sliding window): the KV cache a decoder needs is ``window`` tokens long,
    whatever the context. Other arguments as :class:`~effarch.attention.MultiHeadAttention`.
    """

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *, window: int, **kw: Any
    ) -> None:
        check_positive_int("window", window)
        attention = functools.partial(naive_attention, window=(window - 1, 0))
        super().__init__(d_model, n_heads, n_kv_heads, attention=attention, **kw)
        self.window = window

    def extra_repr(self) -> str:
        return f"window={self.window}"


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
    """Build a Mamba2; ``headdim`` defaults to the largest divisor of ``expand d`` up to 32."""
    check_positive_int("d_model", d_model)
    expand = check_positive_int("expand", kwargs.get("expand", 2))
    kwargs.setdefault("headdim", math.gcd(expand * d_model, 32))
    return Mamba2(d_model, **kwargs)


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
#: ``"gated_deltanet"`` also takes Mamba-2's ``A_init_range``, ``dt_min``, ``dt_max``.
MIXERS: dict[str, MixerFactory] = {
    "attention": _headed(MultiHeadAttention),
    "sliding_window": _headed(SlidingWindowAttention, window=16),
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
}


def _mixes_neighbours(layer: nn.Module) -> bool:
    """Whether a mixer already mixes each token with its predecessors before its recurrence
    (a short convolution, or RWKV's token shift)."""
    return isinstance(layer, RWKV7) or any(isinstance(m, ShortConvolution) for m in layer.modules())


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

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def mixer_state_size(mixer: nn.Module, seq_len: int) -> int:
    r"""Numbers one sequence's mixer keeps from token to token after ``seq_len`` tokens.

    The recurrent memory of one layer, per sequence (batch of one), from the layer's config:

    ==============================  ==========================================  ================
    mixer                           elements                                    knob
    ==============================  ==========================================  ================
    attention (KV cache)            ``2 T G dh``                                ``T``, ``dh``
    sliding-window attention        ``2 min(T, w) G dh``                        ``window``
    linear attention                ``H K K`` (+ ``H K`` normaliser)            ``n_heads``
    RetNet, GLA, Gated DeltaNet     ``H K V``                                   ``n_heads``,
                                                                                ``expand_k/v``
    DeltaNet, RWKV-7                ``H K K``                                   ``n_heads``
    TTT-Linear                      ``2 H K K`` (weights and mini-batch anchor) ``n_heads``
    HGRN                            ``expand_ratio d``                          ``expand_ratio``
    Mamba, Mamba-2                  ``expand d N``                              ``d_state``
    S4D                             ``d N`` (``N / 2`` complex per channel)     ``d_state``
    ==============================  ==========================================  ================

    (``T = seq_len``, ``G`` key/value heads of width ``dh``, ``H`` heads with key and value
    widths ``K``, ``V``; at fixed ``d_model`` fewer heads mean a bigger state, ``H (d/H)^2 =
    d^2 / H``.) Short-convolution caches and token shifts (the last few inputs, not a memory
    of the context) are not counted. A module of another class is accepted if it has a
    ``state_size(seq_len)`` method.

    Args:
        mixer: a :class:`TokenMixer`, a layer of :data:`MIXERS`, or a :class:`TinyLM` (its
            first layer's mixer; every layer has the same).
        seq_len: ``T``, the context the state has absorbed.

    Returns:
        The number of elements.
    """
    check_positive_int("seq_len", seq_len)
    if isinstance(mixer, TinyLM):
        mixer = mixer.blocks[0].mixer
    if isinstance(mixer, TokenMixer):
        mixer = mixer.layer
    if not isinstance(mixer, nn.Module):
        raise TypeError(f"mixer must be an nn.Module, got {type(mixer).__name__}")
    if isinstance(mixer, SlidingWindowAttention):
        return 2 * min(seq_len, mixer.window) * mixer.n_kv_heads * mixer.head_dim
    if isinstance(mixer, MultiHeadAttention):
        return 2 * seq_len * mixer.n_kv_heads * mixer.head_dim
    if isinstance(mixer, LinearAttention):
        h, k = mixer.n_heads, mixer.head_dim
        return h * k * k + (h * k if mixer.normalize else 0)
    if isinstance(mixer, (RetNet, GLA, GatedDeltaNet)):
        return mixer.n_heads * mixer.head_k * mixer.head_v
    if isinstance(mixer, (DeltaNet, RWKV7)):
        return mixer.n_heads * mixer.head_dim**2
    if isinstance(mixer, HGRN):
        return mixer.hidden
    if isinstance(mixer, Mamba):
        return mixer.d_inner * mixer.d_state
    if isinstance(mixer, Mamba2):
        return mixer.nheads * mixer.headdim * mixer.d_state
    if isinstance(mixer, S4D):
        return mixer.d_model * mixer.d_state
    if callable(getattr(mixer, "state_size", None)):
        return int(mixer.state_size(seq_len))
    raise TypeError(
        f"mixer_state_size does not know {type(mixer).__name__}; give the module a "
        "state_size(seq_len) method"
    )


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


class _Block(nn.Module):
    def __init__(
        self, d_model: int, mixer: TokenMixer, d_ff: int, mlp: str, norm_eps: float,
        short_conv: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.conv = ShortConvolution(d_model, short_conv, activation=False) if short_conv else None
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=norm_eps) if d_ff else None
        self.mlp = _MLP(d_model, d_ff, mlp) if d_ff else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.mixer_norm(h)
        if self.conv is not None:
            u = self.conv(u)[0]
        h = h + self.mixer(u)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h


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
        mlp: ``"swiglu"`` or ``"gelu"``.
        tie_embeddings: the head reuses the embedding matrix.
        norm_eps: epsilon of the RMSNorms.
        short_conv: width of the convolution before the mixer, ``0`` for none; default
            (``None``) 2 for mixers without a short convolution or token shift of their own,
            0 for the others.

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
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        if short_conv is not None:
            check_positive_int("short_conv", short_conv, allow_zero=True)
        check_positive_int("d_model", d_model)
        check_positive_int("n_layers", n_layers)
        check_choice("mlp", mlp, ("swiglu", "gelu"))
        check_positive_number("norm_eps", norm_eps)
        if d_ff is None:
            d_ff = 2 * d_model if mlp == "swiglu" else 3 * d_model
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
                width = 0 if _mixes_neighbours(mixer_module.layer) else 2
            blocks.append(_Block(d_model, mixer_module, d_ff, mlp, norm_eps, width))
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
            h = block(h)
        h = self.norm(h)
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)

    def state_size(self, seq_len: int) -> int:
        """:func:`mixer_state_size` of one layer (the model keeps ``n_layers`` times this)."""
        return mixer_state_size(self.blocks[0].mixer, seq_len)

    def num_parameters(self) -> int:
        """Trainable parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer_name!r}, mixer_kwargs={self.mixer_kwargs}"


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        losses: training loss (cross-entropy over the query positions) at every step.
        accuracy: recall accuracy on ``eval_data`` after training (``None`` without it).
        eval_history: ``(step, accuracy)`` at every evaluation during training.
        steps, tokens: optimiser steps taken and tokens processed (``steps * B * T``).
        train_seconds: wall time of the training steps (data, forward, backward, update).
        tokens_per_s: training throughput, ``tokens / train_seconds`` (the first step,
            which pays one-time setup costs, is left out of both).
    """

    losses: list[float]
    accuracy: float | None
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_pair(batch: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, MQARBatch):
        return batch.inputs, batch.targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        check_tensor(f"{name} inputs", inputs, ndim=2)
        check_tensor(f"{name} targets", targets, ndim=2, dtypes=(torch.long,))
        if inputs.shape != targets.shape:
            raise ValueError(
                f"{name} inputs and targets must have the same shape [N, T], got "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        return inputs, targets
    raise TypeError(f"{name} must be an MQARBatch or a pair (inputs, targets), got {type(batch)}")


@torch.no_grad()
def evaluate(model: nn.Module, data: MQARBatch | tuple[torch.Tensor, torch.Tensor], *,
             batch_size: int = 256) -> float:  # fmt: skip
    """Recall accuracy of ``model`` on ``data`` (:func:`~effarch.tasks.recall_accuracy`).

    Args:
        model: maps ``input_ids [B, T]`` to ``logits [B, T, V]``.
        data: an :class:`~effarch.tasks.MQARBatch` or ``(inputs, targets)``, both ``[N, T]``.
        batch_size: examples per forward pass.

    Returns:
        The fraction of query positions answered right. The model's train/eval mode is
        restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs, targets = _as_pair(data, "data")
    check_positive_int("batch_size", batch_size)
    device, was_training = _model_device(model), model.training
    model.eval()
    try:
        preds = [
            model(inputs[s : s + batch_size].to(device)).argmax(dim=-1).cpu()
            for s in range(0, inputs.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return recall_accuracy(torch.cat(preds), targets.cpu())


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices of linear and embedding layers only (not on norms,
    biases, convolutions or the SSM parameters ``A_log``, ``D``, ``dt_bias``)."""
    decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            decay[id(module.weight)] = module.weight
    rest = [p for p in model.parameters() if id(p) not in decay and p.requires_grad]
    groups = [{"params": [p for p in decay.values() if p.requires_grad],
               "weight_decay": weight_decay}]  # fmt: skip
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from 1 down to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    data: MQARBatch | Callable[[int], Any],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    eval_data: MQARBatch | tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> TrainResult:
    r"""Train ``model`` on next-token targets with AdamW, warmup + cosine decay and clipping.

    The loss is the cross-entropy over the positions whose target is not ``-100``
    (for MQAR: the queries). Learning rate at step ``s``: ``lr (s + 1) / warmup`` during the
    warmup, then ``lr (1 + cos(pi (s - warmup) / (steps - warmup))) / 2``. Weight decay applies
    to the linear and embedding matrices only.

    Args:
        model: maps ``input_ids [B, T]`` to ``logits [B, T, V]``; trained where its parameters
            are.
        data: an :class:`~effarch.tasks.MQARBatch` to draw minibatches of ``batch_size`` from
            (a fresh random order every pass, from ``seed``), or a callable ``step ->`` batch
            (an ``MQARBatch`` or ``(inputs, targets)``).
        steps: optimiser steps.
        batch_size: examples per step (ignored when ``data`` is a callable).
        lr, weight_decay: AdamW's (``betas = (0.9, 0.98)``).
        warmup: warmup steps, default ``steps // 10``.
        grad_clip: maximum global gradient norm, ``None`` for no clipping.
        seed: seed of the minibatch order.
        eval_data: held-out examples; the final accuracy on them is reported.
        eval_every: also evaluate every this many steps (into ``eval_history``).
        progress: show a progress bar.
        desc: its label.

    Returns:
        A :class:`TrainResult` with the loss history, final accuracy and throughput.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_number("lr", lr)
    check_positive_number("weight_decay", weight_decay, allow_zero=True)
    warmup = (
        steps // 10 if warmup is None else check_positive_int("warmup", warmup, allow_zero=True)
    )
    check_positive_number("grad_clip", grad_clip, allow_none=True)
    check_positive_int("seed", seed, allow_zero=True)
    if eval_every is not None:
        check_positive_int("eval_every", eval_every)
    if eval_data is not None:
        _as_pair(eval_data, "eval_data")
    if isinstance(data, MQARBatch):
        pool = data
        gen = torch.Generator().manual_seed(seed)
        order, cursor = torch.randperm(len(pool), generator=gen), 0

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal order, cursor
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(pool), generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            return pool.inputs[idx], pool.targets[idx]

        if len(pool) < batch_size:
            raise ValueError(
                f"data must hold at least batch_size={batch_size} examples, got {len(pool)}"
            )
    elif callable(data):

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            return _as_pair(data(step), "data(step)")

    else:
        raise TypeError(f"data must be an MQARBatch or a callable step -> batch, got {type(data)}")

    device = _model_device(model)
    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    result = TrainResult(losses=[], accuracy=None)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    start, timed_tokens = None, 0
    for step in bar:
        inputs, targets = next_batch(step)
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        value = loss.item()  # also waits for the device, so the clock below is honest
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step}; lower lr")
        result.losses.append(value)
        result.tokens += inputs.numel()
        if start is None:
            start = time.perf_counter()
        else:
            timed_tokens += inputs.numel()
        if eval_data is not None and eval_every and (step + 1) % eval_every == 0:
            t0 = time.perf_counter()
            result.eval_history.append((step + 1, evaluate(model, eval_data)))
            start += time.perf_counter() - t0  # evaluation is not training time
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{value:.3f}")
    result.steps = steps
    elapsed = time.perf_counter() - start if start is not None else 0.0
    result.train_seconds = elapsed
    result.tokens_per_s = timed_tokens / elapsed if elapsed > 0 else float("nan")
    if eval_data is not None:
        result.accuracy = evaluate(model, eval_data)
    return result


# --------------------------------------------------------------------------------------------
# The recall experiment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallConfig:
    """One size of the recall experiment (see :func:`recall_experiment`).

    Attributes:
        seq_len, n_pairs, vocab_size: the MQAR task (:func:`effarch.tasks.mqar`).
        d_model, n_layers, d_ff: the :class:`TinyLM` around each mixer (``d_ff`` ``None``:
            the model's default).
        steps, batch_size, lr, weight_decay, warmup: training (:func:`train`); ``lr`` may
            be overridden per mixer in ``lr_by_mixer``.
        n_train: training examples (default ``steps * batch_size``: every step sees new ones).
        n_eval: held-out examples for the accuracy.
        mixers: mixer name -> the ``mixer_kwargs`` of each state size to train.
        seed: seeds the data and every model's initialisation.
    """

    seq_len: int
    n_pairs: int
    vocab_size: int
    d_model: int
    n_layers: int
    steps: int
    batch_size: int
    lr: float
    mixers: Mapping[str, Sequence[Mapping[str, Any]]]
    weight_decay: float = 0.1
    warmup: int | None = None
    d_ff: int | None = None
    n_train: int | None = None
    n_eval: int = 1000
    lr_by_mixer: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """The ``(mixer, mixer_kwargs)`` pairs to train, in order."""
        return [(name, dict(kw)) for name, variants in self.mixers.items() for kw in variants]


#: The CPU size: 7 mixers, 13 runs, two layers of width 32 recalling 8 key-value pairs in
#: 32 tokens. The recurrent mixers have a small state (128 numbers per layer: 8 heads of
#: width 4, or ``d_state = 2``) and a large one (1024: one head of width 32, or
#: ``d_state = 16``); attention's state is its KV cache, ``2 * 32 * 32 = 2048`` numbers at
#: the full context. The decays of the gated mixers start slow (GLA's gate temperature 64,
#: Gated DeltaNet's and Mamba-2's ``A dt`` near 0.005) so that a binding survives the
#: 32 tokens while the model is still learning to use it.
RECALL_CPU = RecallConfig(
    seq_len=32,
    n_pairs=8,
    vocab_size=64,
    d_model=32,
    n_layers=2,
    steps=300,
    batch_size=32,
    lr=1e-2,
    n_eval=1000,
    mixers={
        "attention": [{"n_heads": 1}],
        "linear_attention": [{"n_heads": h, "normalize": False} for h in (8, 1)],
        "gla": [
            {"n_heads": h, "expand_k": 1.0, "gate_logit_normalizer": 64, "chunk_size": 16}
            for h in (8, 1)
        ],
        "deltanet": [{"n_heads": h} for h in (8, 1)],
        "gated_deltanet": [
            {"n_heads": h, "expand_v": 1, "A_init_range": (1.0, 1.0), "dt_min": 1e-3,
             "dt_max": 1e-2}
            for h in (8, 1)
        ],
        "mamba": [{"d_state": n} for n in (2, 16)],
        "mamba2": [
            {"d_state": n, "A_init_range": (0.01, 0.1), "dt_min": 0.05, "dt_max": 0.5}
            for n in (2, 16)
        ],
    },
)  # fmt: skip

#: The GPU size: 256 tokens holding 32 key-value pairs from an 8192-token vocabulary
#: (Zoology's setting), width 128, three state sizes per recurrent mixer (1024, 4096 and
#: 16384 numbers per layer: 16, 4 or 1 heads, or ``d_state`` 4, 16, 64) and longer training.
#: Attention's KV cache is ``2 * 256 * 128 = 65536`` numbers.
RECALL_GPU = RecallConfig(
    seq_len=256,
    n_pairs=32,
    vocab_size=8192,
    d_model=128,
    n_layers=2,
    steps=6000,
    batch_size=128,
    lr=3e-3,
    n_eval=2000,
    mixers={
        "attention": [{"n_heads": 2}],
        "linear_attention": [{"n_heads": h, "normalize": False} for h in (16, 4, 1)],
        "gla": [
            {"n_heads": h, "expand_k": 1.0, "gate_logit_normalizer": 256} for h in (16, 4, 1)
        ],
        "deltanet": [{"n_heads": h} for h in (16, 4, 1)],
        "gated_deltanet": [
            {"n_heads": h, "expand_v": 1, "A_init_range": (1.0, 1.0), "dt_min": 1e-3,
             "dt_max": 1e-2}
            for h in (16, 4, 1)
        ],
        "mamba": [{"d_state": n} for n in (4, 16, 64)],
        "mamba2": [
            {"d_state": n, "A_init_range": (0.01, 0.1), "dt_min": 0.01, "dt_max": 0.1}
            for n in (4, 16, 64)
        ],
    },
)  # fmt: skip

_SIZES = {"cpu": RECALL_CPU, "small": RECALL_CPU, "gpu": RECALL_GPU, "large": RECALL_GPU}


def recall_experiment(
    config: RecallConfig | str = "cpu",
    *,
    mixers: Sequence[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train a :class:`TinyLM` per (mixer, state size) on MQAR and measure its recall.

    Every run uses the same data (training stream and held-out set, from ``config.seed``)
    and the same initialisation seed, so runs differ only in the mixer.

    Args:
        config: a :class:`RecallConfig`, or ``"cpu"`` / ``"gpu"`` (also ``"small"`` /
            ``"large"``, the book's profiles) for :data:`RECALL_CPU` / :data:`RECALL_GPU`.
        mixers: restrict to these mixer names of the config, or replace its mixers by a
            mapping name -> list of ``mixer_kwargs``.
        device: where to train (default CPU).
        progress: progress bars (one over the runs, one per run's training).
        **overrides: fields of the config to change, e.g. ``steps=100``.

    Returns:
        One record (a dict) per run: ``mixer``, ``mixer_kwargs``, ``state_size`` (elements
        per layer and sequence at ``seq_len``), ``params``, ``accuracy``, ``final_loss``,
        ``train_tokens_per_s``, ``infer_tokens_per_s`` (forward passes over the held-out
        set), ``wall_s`` (the whole run), and the task and model sizes.
    """
    if isinstance(config, str):
        check_choice("config", config, tuple(_SIZES))
        config = _SIZES[config]
    if not isinstance(config, RecallConfig):
        raise TypeError(f"config must be a RecallConfig or a size name, got {type(config)}")
    try:
        config = dataclasses.replace(config, **overrides)
    except TypeError as err:
        names = [f.name for f in dataclasses.fields(RecallConfig)]
        raise TypeError(f"overrides must be fields of RecallConfig {names}: {err}") from None
    if mixers is not None:
        if isinstance(mixers, Mapping):
            chosen = dict(mixers)
        elif isinstance(mixers, Sequence) and not isinstance(mixers, str):
            unknown = [m for m in mixers if m not in config.mixers]
            if unknown:
                raise ValueError(
                    f"mixers must be names of the config's mixers {list(config.mixers)}, "
                    f"got unknown {unknown}; pass a mapping name -> kwargs list for others"
                )
            chosen = {m: config.mixers[m] for m in mixers}
        else:
            raise TypeError(f"mixers must be a list of names or a mapping, got {type(mixers)}")
        config = dataclasses.replace(config, mixers=chosen)
    for name in config.mixers:
        if name not in MIXERS:
            raise ValueError(f"mixer names must be in {sorted(MIXERS)}, got {name!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    c = config
    task = {"seq_len": c.seq_len, "n_pairs": c.n_pairs, "vocab_size": c.vocab_size}
    n_train = c.n_train if c.n_train is not None else c.steps * c.batch_size
    train_set = mqar(n_train, seed=c.seed, **task)
    eval_set = mqar(c.n_eval, seed=c.seed + 1_000_003, **task)  # another stream: held out

    records: list[dict[str, Any]] = []
    runs = c.runs()
    outer = tqdm(runs, desc="recall experiment", disable=not progress)
    for name, kwargs in outer:
        label = f"{name} {kwargs}" if kwargs else name
        outer.set_postfix_str(label)
        t0 = time.perf_counter()
        torch.manual_seed(c.seed)
        model = TinyLM(c.vocab_size, c.d_model, c.n_layers, name, mixer_kwargs=kwargs,
                       d_ff=c.d_ff).to(dev)  # fmt: skip
        result = train(
            model, train_set, steps=c.steps, batch_size=c.batch_size,
            lr=c.lr_by_mixer.get(name, c.lr), weight_decay=c.weight_decay, warmup=c.warmup,
            seed=c.seed, progress=progress, desc=name,
        )  # fmt: skip
        t1 = time.perf_counter()
        accuracy = evaluate(model, eval_set)
        infer_s = time.perf_counter() - t1
        records.append(
            {
                "mixer": name,
                "mixer_kwargs": kwargs,
                "state_size": model.state_size(c.seq_len),
                "params": model.num_parameters(),
                "accuracy": accuracy,
                "final_loss": result.losses[-1],
                "train_tokens_per_s": result.tokens_per_s,
                "infer_tokens_per_s": c.n_eval * c.seq_len / infer_s,
                "wall_s": time.perf_counter() - t0,
                "steps": c.steps,
                "batch_size": c.batch_size,
                "d_model": c.d_model,
                "n_layers": c.n_layers,
                "device": str(dev),
                **task,
            }
        )
    return records
