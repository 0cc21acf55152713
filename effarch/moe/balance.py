r"""Load balance: auxiliary losses, the auxiliary-loss-free bias, and balance metrics
(chapter 5.1).

With ``N`` tokens, ``E`` experts and ``k`` choices per token, let ``f_e`` be the fraction of
the ``N k`` assignments that go to expert ``e`` and ``P_e`` the mean router probability of
``e`` over the tokens.

- :func:`load_balancing_loss` (Switch Transformer, GShard): ``E * sum_e f_e P_e``, 1 when
  both are uniform. Its gradient flows through ``P`` only (``f`` counts are not
  differentiable). *Per layer*, with padding tokens excluded by ``mask``. ``transformers``'
  ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, OLMoE) counts ``f`` as assignments per
  token (summing to ``k``) and pools all layers' counts and probabilities before the
  product: for one layer it equals ``k`` times this loss (tested); for several, it is not the
  mean of the per-layer losses.
- :func:`router_z_loss` (ST-MoE): ``mean_t (logsumexp_e logits_te)^2``, keeps logits small.
- :func:`sequence_balance_loss` (DeepSeek-V3's complementary sequence-wise loss):
  ``sum_e f_e P_e`` per sequence with ``f_e = E / (k T) * #{t: e chosen}`` and ``P_e`` the
  mean of the token-normalised sigmoid scores ``s_te / sum_e' s_te'``; 1 when uniform; mean
  over sequences.
- :func:`update_bias` (DeepSeek-V3's auxiliary-loss-free balancing): after each step,
  ``b_e <- b_e + gamma * sign(mean load - load_e)``: overloaded experts become less likely to
  be chosen, underloaded ones more, and the gating weights are untouched.

Metrics: :func:`expert_load` (assignments per expert), :func:`max_violation` (MaxVio,
``(max_e load_e - mean load) / mean load``, Wang et al., 2024), :func:`coefficient_of_variation`
(``std / mean`` of the loads) and :func:`dropped_fraction`.
"""

from __future__ import annotations

import torch

from .._checks import check_positive_int, check_same, check_tensor
from .routing import router_scores

__all__ = [
    "coefficient_of_variation",
    "dropped_fraction",
    "expert_load",
    "load_balancing_loss",
    "max_violation",
    "router_z_loss",
    "sequence_balance_loss",
    "update_bias",
]


def _check_mask(mask: torch.Tensor | None, ref_name: str, ref: torch.Tensor, layout: str) -> None:
    """A token mask must have exactly the shape ``ref.shape[:-1]`` (``layout``) and ``ref``'s
    device: broadcasting it (``[N, 1]`` against ``[N]``) would scale the losses silently."""
    if mask is None:
        return
    check_tensor("mask", mask)
    if mask.shape != ref.shape[:-1]:
        raise ValueError(
            f"mask must have shape {layout} = {tuple(ref.shape[:-1])} (that of {ref_name} "
            f"without its last dim), got {tuple(mask.shape)}"
        )
    check_same((ref_name, "mask"), (ref, mask), dtype=False)


def expert_load(
    experts: torch.Tensor, n_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignments per expert: ``[..., k]`` indices (the sentinel ``E`` ignored), optionally
    weighted by a token ``mask [...]``; returns float ``[E]``."""
    check_tensor("experts", experts, dtypes=(torch.int64,))
    check_positive_int("n_experts", n_experts)
    _check_mask(mask, "experts", experts, "[...]")
    w = torch.ones_like(experts, dtype=torch.float32)
    if mask is not None:
        w = w * mask.to(torch.float32).unsqueeze(-1)
    counts = torch.zeros(n_experts + 1, dtype=torch.float32, device=experts.device)
    counts.scatter_add_(0, experts.flatten(), w.flatten())
    return counts[:n_experts]


def load_balancing_loss(
    logits: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard's auxiliary loss for one layer: ``E * sum_e f_e P_e`` (module docstring).

    Args:
        logits: ``[N, E]`` router logits (softmax probabilities ``P`` come from them).
        experts: ``[N, k]`` the chosen experts.
        mask: ``[N]`` bool or 0/1, ``False`` for padding tokens (excluded from ``f`` and ``P``).

    Returns:
        a scalar, differentiable through ``logits``.
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    n, e = logits.shape
    if experts.ndim != 2 or experts.shape[0] != n:
        raise ValueError(f"experts must be [N={n}, k], got shape {tuple(experts.shape)}")
    _check_mask(mask, "logits", logits, "[N]")
    m = torch.ones(n, device=logits.device) if mask is None else mask.to(torch.float32)
    tokens = m.sum().clamp(min=1)
    f = expert_load(experts, e, m) / (tokens * experts.shape[1])
    p = (router_scores(logits) * m[:, None]).sum(0) / tokens
    return e * (f * p).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: the mean over tokens of ``logsumexp(logits)^2`` (``transformers``'
    ``router_z_loss_func`` without a mask). ``logits [..., E]``, ``mask [...]``."""
    check_tensor("logits", logits, floating=True)
    _check_mask(mask, "logits", logits, "[...]")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)).logsumexp(-1) ** 2
    if mask is None:
        return z.mean()
    m = mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp(min=1)


def sequence_balance_loss(logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (module docstring), without its ``alpha``.

    Args:
        logits: ``[B, T, E]`` router logits (sigmoid scores).
        experts: ``[B, T, k]`` the chosen experts.

    Returns:
        the mean over the ``B`` sequences of ``sum_e f_e P_e``; 1 for uniform routing.
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    b, t, e = logits.shape
    if experts.shape[:2] != (b, t) or experts.ndim != 3:
        raise ValueError(f"experts must be [B={b}, T={t}, k], got shape {tuple(experts.shape)}")
    k = experts.shape[-1]
    s = router_scores(logits, "sigmoid")
    p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
    counts = torch.zeros(b, e + 1, device=logits.device).scatter_add_(
        1, experts.flatten(1), torch.ones(b, t * k, device=logits.device)
    )[:, :e]
    f = counts * e / (k * t)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update, in place: ``bias += gamma * sign(mean(load)
    - load)``. ``bias [E]``, ``load [E]`` (assignments this step). Returns ``bias``."""
    check_tensor("bias", bias, ndim=1, floating=True)
    if load.shape != bias.shape:
        raise ValueError(
            f"load must have the shape of bias {tuple(bias.shape)}, got {tuple(load.shape)}"
        )
    if not gamma >= 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}")
    load = load.to(bias.dtype)
    return bias.add_(gamma * torch.sign(load.mean() - load))


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio: ``(max load - mean load) / mean load``; 0 for perfect balance. ``load [..., E]``."""
    mean = load.float().mean(-1)
    return (load.float().amax(-1) - mean) / mean.clamp(min=1e-12)


def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """``std / mean`` of the loads (population std); 0 for perfect balance. ``load [..., E]``."""
    load = load.float()
    return load.std(-1, unbiased=False) / load.mean(-1).clamp(min=1e-12)


def dropped_fraction(keep: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fraction of assignments dropped by capacity: ``keep [..., N, k]`` from
    :func:`~effarch.moe.apply_capacity`, padding excluded by ``mask [..., N]``."""
    kept = keep.float()
    if mask is None:
        return 1 - kept.mean()
    m = mask.float().unsqueeze(-1).expand_as(kept)
    return 1 - (kept * m).sum() / m.sum().clamp(min=1)
