r"""One trainer for every experiment: next-token cross-entropy with AdamW, warmup and cosine.

:func:`train` fits any model that maps ``input_ids [B, T]`` to ``logits [B, T, V]`` to targets
``[B, T]`` (positions whose target is ``-100`` are ignored: for MQAR, every position but the
queries), from a pool of examples or from a callable that returns the next batch.
:func:`evaluate` measures recall accuracy on held-out examples, and :class:`TrainResult`
holds what a run measured (losses, accuracy, throughput).

Its pieces are public so that an experiment with another loop can reuse them:
:func:`param_groups` (weight decay on the matrices only) and :func:`warmup_cosine` (the
learning-rate factor at a step).

The trainer knows nothing of the models it trains: it imports no model, so every experiment
(and :mod:`effarch.models`, for compatibility) can import it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_positive_int, check_positive_number, check_tensor
from .tasks.mqar import IGNORE_INDEX, MQARBatch, recall_accuracy

__all__ = ["TrainResult", "evaluate", "param_groups", "train", "warmup_cosine"]


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        losses: training loss (cross-entropy over the query positions) at every step.
        accuracy: recall accuracy on ``eval_data`` after training (``None`` without it).
        eval_history: ``(step, accuracy)`` at every evaluation during training.
        steps: optimiser steps taken.
        tokens: tokens processed (``steps * B * T``).
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


def _as_pair(
    batch: Any, name: str, *, any_shape: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, MQARBatch):
        return batch.inputs, batch.targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if any_shape:  # a loss_fn reads them: images and labels, say
            check_tensor(f"{name} inputs", inputs)
            check_tensor(f"{name} targets", targets)
            return inputs, targets
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on the matrices of linear and embedding layers only.

    Norms, biases, convolutions and the SSM parameters (``A_log``, ``D``, ``dt_bias``) are
    not decayed. Frozen parameters (``requires_grad=False``) are left out.

    Args:
        model: the model to optimise.
        weight_decay: the decay of the matrices (``>= 0``).

    Returns:
        A list of the group ``{"params": matrices, "weight_decay": weight_decay}``, then
        ``{"params": rest, "weight_decay": 0.0}`` if there is a rest.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_number("weight_decay", weight_decay, allow_zero=True)
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


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    r"""The learning-rate factor at ``step``: linear warmup, then a cosine down to 0.

    ``(step + 1) / warmup`` for ``step < warmup``, then
    ``(1 + cos(pi (step - warmup) / (steps - warmup))) / 2``, which reaches 0 at ``steps``
    (and stays there after it).

    Args:
        step: the optimiser step, from 0.
        steps: the total number of steps.
        warmup: warmup steps (0 for none).
    """
    check_positive_int("step", step, allow_zero=True)
    check_positive_int("steps", steps)
    check_positive_int("warmup", warmup, allow_zero=True)
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
    aux_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    r"""Train ``model`` on next-token targets with AdamW, warmup + cosine decay and clipping.

    The loss is the cross-entropy over the positions whose target is not ``-100``
    (for MQAR: the queries). Learning rate at step ``s``: ``lr * warmup_cosine(s, steps,
    warmup)``, i.e. ``lr (s + 1) / warmup`` during the warmup, then
    ``lr (1 + cos(pi (s - warmup) / (steps - warmup))) / 2``. Weight decay applies to the
    linear and embedding matrices only (:func:`param_groups`).

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
        aux_loss: ``model -> scalar`` added to the cross-entropy after each forward pass
            (for example an MoE balance loss read from the layers' last routing); the
            recorded losses stay the cross-entropy alone.
        after_step: ``(model, step) -> None`` called after each optimiser step (for example
            the auxiliary-loss-free bias update of an MoE router).
        loss_fn: ``(model, inputs, targets) -> scalar`` replacing the forward pass and the
            next-token cross-entropy (for example a masked diffusion model's weighted loss,
            :func:`effarch.diffusion.masked_diffusion_loss`, or an image classifier's
            cross-entropy); recorded as the loss. With it, a callable ``data`` may return
            tensors of any shape.

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
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
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
            return _as_pair(data(step), "data(step)", any_shape=loss_fn is not None)

    else:
        raise TypeError(f"data must be an MQARBatch or a callable step -> batch, got {type(data)}")

    device = _model_device(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8
    )
    factor = functools.partial(warmup_cosine, steps=steps, warmup=warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    result = TrainResult(losses=[], accuracy=None)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    start, timed_tokens = None, 0
    for step in bar:
        inputs, targets = next_batch(step)
        inputs, targets = inputs.to(device), targets.to(device)
        if loss_fn is None:
            logits = model(inputs)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )  # fmt: skip
        else:
            loss = loss_fn(model, inputs, targets)
        total = loss if aux_loss is None else loss + aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(model, step)
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
