r"""The forward (masking) process of masked diffusion and its training loss (chapter 7.1).

A clean sequence ``x_0`` of ``L`` tokens is corrupted by replacing each token, independently,
with the mask token ``M`` with probability ``1 - alpha_t``; ``alpha_t`` (the *schedule*)
falls from ``alpha_0 = 1`` (clean) to ``alpha_1 = 0`` (all masked)::

    q(x_t^i = M | x_0) = 1 - alpha_t,        q(x_t^i = x_0^i | x_0) = alpha_t

A network ``p_theta(x_0^i | x_t)`` predicts every masked token from the unmasked ones (a
transformer *without* the causal mask). Its negative ELBO bounds the negative
log-likelihood (MDLM, Sahoo et al., 2024; LLaDA, Nie et al., 2025)::

    -log p_theta(x_0) <= E_{t ~ U(0, 1)} E_{x_t ~ q(.|x_0)}
                         [ w(t) sum_{i: x_t^i = M} -log p_theta(x_0^i | x_t) ],
    w(t) = -alpha_t' / (1 - alpha_t)          (= 1 / t for the linear alpha_t = 1 - t)

The weight is what turns "cross-entropy on the masked tokens" into a likelihood bound: at
small ``t`` few tokens are masked and each counts ``1 / t`` times. The bound does not
depend on the schedule (substitute ``s = 1 - alpha_t``); the variance of its Monte-Carlo
estimate does.

Names follow LLaDA's reference code: ``forward_process`` draws ``t`` and masks with
``p_mask = (1 - eps) t + eps``; the loss is the masked tokens' cross-entropy divided by
``p_mask``, summed and divided by ``B L`` (:func:`masked_diffusion_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_positive_int, check_tensor

__all__ = [
    "SCHEDULES",
    "elbo_samples",
    "forward_process",
    "logits_of",
    "mask_prob",
    "masked_diffusion_loss",
    "loss_weight",
]

SCHEDULES = ("linear", "cosine")
"""``linear``: ``alpha_t = 1 - t`` (LLaDA, MDLM); ``cosine``: ``alpha_t = cos(pi t / 2)``,
which masks slowly at first (MaskGIT's cosine mask ratio over decoding progress is its mirror
image in continuous time, ``alpha_t = 1 - sin(pi t / 2)``)."""


def _check_t(t: Any) -> torch.Tensor:
    check_tensor("t", t, floating=True)
    if t.numel() and not bool(((t > 0) & (t <= 1)).all()):
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"t must lie in (0, 1], got values in [{lo}, {hi}]")
    return t


def mask_prob(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """The probability ``1 - alpha_t`` that a token is masked at time ``t`` (any shape)."""
    check_choice("schedule", schedule, SCHEDULES)
    _check_t(t)
    return t if schedule == "linear" else 1 - torch.cos(math.pi / 2 * t)


def loss_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    r"""The ELBO's weight ``w(t) = -alpha_t' / (1 - alpha_t)`` of a masked token at time ``t``.

    ``1 / t`` for ``linear``; ``(pi / 2) sin(pi t / 2) / (1 - cos(pi t / 2))`` for ``cosine``.
    """
    check_choice("schedule", schedule, SCHEDULES)
    _check_t(t)
    if schedule == "linear":
        return 1 / t
    half = math.pi / 2 * t
    return (math.pi / 2) * torch.sin(half) / (1 - torch.cos(half))


def forward_process(
    x0: torch.Tensor,
    mask_id: int,
    *,
    t: torch.Tensor | None = None,
    eps: float = 1e-3,
    schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token of ``x0`` independently with probability ``p_mask = 1 - alpha_t``.

    Args:
        x0: ``[B, L]`` int64 clean tokens.
        mask_id: the mask token ``M`` (LLaDA: 126336).
        t: ``[B]`` times in (0, 1]; default drawn ``U(0, 1)`` and moved to
            ``(1 - eps) t + eps`` as in LLaDA, so that ``t > 0`` and the ELBO weight
            ``1 / t`` stays finite (a row can still come out with nothing masked).
        schedule: one of :data:`SCHEDULES`.
        generator: for the draws.

    Returns:
        ``x_t [B, L]`` (masked tokens set to ``mask_id``), ``masked [B, L]`` bool and
        ``t [B]``. LLaDA's ``forward_process`` returns ``(noisy_batch, masked_indices,
        p_mask)``; here ``p_mask = mask_prob(t, schedule)``.
    """
    check_tensor("x0", x0, ndim=2, dtypes=(torch.long,))
    check_positive_int("mask_id", mask_id, allow_zero=True)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    b = x0.shape[0]
    if t is None:
        u = torch.rand(b, generator=generator, dtype=torch.float64).to(x0.device)
        t = ((1 - eps) * u + eps).float()
    else:
        check_tensor("t", t, ndim=1, floating=True)
        if t.shape[0] != b:
            raise ValueError(f"t must hold one time per row ({b}), got {t.shape[0]}")
    p = mask_prob(_check_t(t), schedule)[:, None]
    draw = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    masked = draw < p
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked, t


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or its ``.logits`` (transformers)."""
    out = getattr(output, "logits", output)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model must return logits or an object with .logits, got {type(output)}"
        )
    return out


def masked_diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    schedule: str = "linear",
    reduction: str = "elbo",
) -> torch.Tensor:
    r"""The training loss of a masked diffusion model, per token.

    ``elbo`` (LLaDA, MDLM): ``sum_{b, i masked} w(t_b) CE(logits[b, i], x0[b, i]) / (B L)``,
    a Monte-Carlo estimate of the negative ELBO per token (nats), an upper bound on the
    model's negative log-likelihood per token. ``masked_mean``: the plain mean cross-entropy
    over masked tokens, no weight; it trains a denoiser too but is not a likelihood bound
    (it weights every noise level by how many tokens it masks, so low ``t`` counts little).

    Args:
        logits: ``[B, L, V]`` the model's predictions from ``x_t``.
        x0: ``[B, L]`` the clean tokens; masked: ``[B, L]`` bool; t: ``[B]`` floating, one
            time per row (checked, also for ``"masked_mean"``, which does not use it).
        schedule: one of :data:`SCHEDULES`; reduction: ``"elbo"`` or ``"masked_mean"``.
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    check_tensor("x0", x0, ndim=2, dtypes=(torch.long,))
    check_tensor("masked", masked, ndim=2, dtypes=(torch.bool,))
    check_tensor("t", t, ndim=1, floating=True)
    check_choice("reduction", reduction, ("elbo", "masked_mean"))
    if logits.shape[:2] != x0.shape or masked.shape != x0.shape:
        raise ValueError(
            f"logits [B, L, V], x0 and masked [B, L] must agree, got {tuple(logits.shape)}, "
            f"{tuple(x0.shape)} and {tuple(masked.shape)}"
        )
    if t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must hold one time per row of x0 ({x0.shape[0]}), got {t.shape[0]}")
    ce = F.cross_entropy(logits.float().flatten(0, 1), x0.flatten(), reduction="none")
    ce = ce.view_as(x0) * masked
    if reduction == "masked_mean":
        return ce.sum() / masked.sum().clamp(min=1)
    w = loss_weight(t.float(), schedule)[:, None]
    return (ce * w).sum() / x0.numel()


@torch.no_grad()
def elbo_samples(
    model: Callable[[torch.Tensor], Any],
    x0: torch.Tensor,
    mask_id: int,
    n_samples: int,
    *,
    estimator: str = "count",
    schedule: str = "linear",
    prompt_len: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""``n_samples`` independent Monte-Carlo estimates of ``-log p(x_0)`` (nats per sequence).

    Each is an unbiased estimate of the negative ELBO, so their mean bounds the negative
    log-likelihood from above and their spread is the estimator's noise:

    * ``"time"``: draw ``t ~ U(0, 1)``, mask each token with ``1 - alpha_t``, score
      ``w(t) sum_{masked} -log p(x_0^i | x_t)`` (the training loss, per sequence);
    * ``"count"``: draw the number of masked tokens ``l ~ U{1..L}`` and mask exactly ``l``
      positions chosen uniformly, score ``(L / l) sum_{masked} -log p(x_0^i | x_t)``
      (LLaDA's likelihood evaluation, Algorithm 3: the same bound with less variance).

    With ``prompt_len = P`` the first ``P`` tokens stay unmasked and ``L`` counts the rest:
    the estimate bounds ``-log p(x_0[P:] | x_0[:P])``.

    Args:
        model: ``[B, L] -> [B, L, V]`` logits (or an output with ``.logits``).
        x0: ``[B, L]`` int64 sequences.

    Returns:
        ``[n_samples, B]`` float64 estimates.
    """
    check_tensor("x0", x0, ndim=2, dtypes=(torch.long,))
    check_positive_int("n_samples", n_samples)
    check_choice("estimator", estimator, ("time", "count"))
    check_positive_int("prompt_len", prompt_len, allow_zero=True)
    b, total = x0.shape
    n = total - prompt_len
    if n < 1:
        raise ValueError(
            f"prompt_len must leave at least one token of the {total}, got {prompt_len}"
        )
    dev = x0.device
    out = torch.empty(n_samples, b, dtype=torch.float64)
    for s in range(n_samples):
        u = torch.rand(b, n, generator=generator, dtype=torch.float64).to(dev)
        if estimator == "time":
            t = torch.rand(b, generator=generator, dtype=torch.float64).to(dev).clamp_min(1e-6)
            masked = u < mask_prob(t, schedule)[:, None]
            weight = loss_weight(t, schedule)
        else:
            count = torch.randint(1, n + 1, (b,), generator=generator).to(dev)
            rank = u.argsort(dim=1).argsort(dim=1)  # a uniformly random order of positions
            masked = rank < count[:, None]
            weight = n / count.double()
        masked = F.pad(masked, (prompt_len, 0), value=False)
        xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
        logp = logits_of(model(xt)).double().log_softmax(-1)
        nll = -logp.gather(-1, x0[..., None])[..., 0] * masked
        out[s] = (weight * nll.sum(1)).cpu()
    return out
