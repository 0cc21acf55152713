r"""The linearization experiment (survey section 2.6): teach a linear layer to be a softmax one.

:class:`~effarch.linear.LinearizedAttention` keeps a trained softmax layer's projections and
replaces its kernel by learnable feature maps (Hedgehog, Zhang et al., 2024; LoLCATs, Zhang et
al., 2025). This module trains it, in two stages:

1. **Attention transfer** (:func:`attention_transfer`): only the feature maps (and, with a
   window, the per-head weight of the linear part) are trained, with the projections frozen,
   so that the linear layer reproduces the softmax layer on sample inputs: its outputs (mean
   squared error, LoLCATs) or its attention weights (``KL(A || Ahat)``, Hedgehog). The
   teacher is the layer itself: no labels are needed.
2. **Low-rank fine-tuning** (:func:`low_rank_finetune`, LoLCATs' second stage): LoRA adapters
   (:func:`effarch.nn.add_lora`) on the projections close the remaining gap. LoLCATs trains
   them on the language-modelling loss of the whole model; with a single layer here the
   target is again the softmax layer's output.

Both return a :class:`TransferResult` (held-out error against the steps). The training loop is
its own (Adam at a constant learning rate on a regression to the teacher), not
:func:`effarch.train.train`, which fits next-token targets.

There is no pretrained LLM in this package, so :func:`linearization_task` builds a stand-in
teacher: a random :class:`~effarch.attention.MultiHeadAttention` with sharpened query/key
weights (peaked attention like trained heads) and partly matched ``W_q``, ``W_k`` (heads that
attend to earlier copies of the current token), fed token embeddings of random sequences drawn
from a small vocabulary so that tokens repeat. The errors measured on it show the method at
work, not what a real model's layers would give. :func:`linearization_sweep` measures the
held-out error against the feature dimension, the window and training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from .._checks import (
    check_choice,
    check_positive_int,
    check_positive_number,
    check_sequences,
)
from ..attention import MultiHeadAttention, attention_error
from ..linear.linearize import (
    LinearizedAttention,
    check_causal_attention_layer,
    linearization_error,
    softmax_attention_weights,
)
from ..nn import add_lora
from ..nn.lora import ATTENTION_PROJECTIONS

__all__ = [
    "LinearizationTask",
    "TransferResult",
    "attention_transfer",
    "linearization_sweep",
    "linearization_task",
    "low_rank_finetune",
]

LOSSES = ("output", "weights")


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
            x = check_sequences("data()", data(), layer.d_model)
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
    check_causal_attention_layer(layer)
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
        check_sequences("data", data, layer.d_model)
    elif not callable(data):
        raise TypeError(
            f"data must be a [N, T, d_model] tensor or a callable returning a batch, "
            f"got {type(data).__name__}"
        )
    check_positive_int("steps", steps)
    check_positive_number("lr", lr)
    check_positive_int("batch_size", batch_size)
    if eval_data is not None:
        check_sequences("eval_data", eval_data, layer.d_model)
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
    targets: Sequence[str] = ATTENTION_PROJECTIONS,
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
