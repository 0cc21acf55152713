r"""Experts routed by modality (survey section 8.3): one expert pool for every token, or one
pool per modality.

A multimodal model feeds image tokens and text tokens through the same layers. Its MoE
feed-forward can route them two ways:

* ``pools="shared"``: one router over all ``E`` experts for every token (MoE-LLaVA,
  Lin et al., 2024): the router may or may not learn to separate the modalities;
* ``pools="separate"``: the experts are split into ``M`` groups of ``E / M``, and a token of
  modality ``m`` is routed top-``k`` within group ``m`` only, by that group's rows of the
  router (modality-aware experts: VL-MoE, Shen et al., 2023; MoMa, Lin et al., 2024):
  the separation is built in.

:class:`ModalityMoE` is :class:`~effarch.moe.MoELayer`'s SwiGLU experts with either routing;
``forward(x [..., d], modality [...]) -> [..., d]``. With ``"separate"`` it equals, for each
modality, an ``E / M``-expert ``MoELayer`` holding that group's router rows and experts
applied to that modality's tokens (tested); with ``"shared"`` it is ``MoELayer`` itself.
:func:`modality_load` counts which experts each modality uses, the statistic MoE-LLaVA plots
per modality.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from ..nn import SwiGLU
from .balance import expert_load, load_balancing_loss
from .layer import Experts, Router, Routing, add_shared, experts_loop
from .routing import route

__all__ = ["POOLS", "ModalityMoE", "modality_load"]

POOLS = ("shared", "separate")
"""How :class:`ModalityMoE` routes: one pool for all tokens, or one pool per modality."""


def modality_load(
    experts: torch.Tensor, modality: torch.Tensor, n_experts: int, n_modalities: int
) -> torch.Tensor:
    """Fraction of each modality's assignments that go to each expert.

    Args:
        experts: ``[N, k]`` chosen experts (index ``n_experts`` for a dropped slot: ignored).
        modality: ``[N]`` int64 modality of each token, ``0 .. n_modalities - 1``.

    Returns:
        ``[n_modalities, n_experts]`` float32; each row sums to 1 (a modality with no
        token: zeros).
    """
    check_tensor("experts", experts, ndim=2, dtypes=(torch.int64,))
    check_tensor("modality", modality, ndim=1, dtypes=(torch.int64,))
    if modality.shape[0] != experts.shape[0]:
        raise ValueError(
            f"modality must have one entry per row of experts ({experts.shape[0]}), got "
            f"{modality.shape[0]}"
        )
    rows = [expert_load(experts, n_experts, modality == m) for m in range(n_modalities)]
    load = torch.stack(rows)
    return load / load.sum(-1, keepdim=True).clamp_min(1e-20)


class ModalityMoE(nn.Module):
    """A SwiGLU mixture-of-experts FFN whose routing knows each token's modality (module
    docstring).

    Args:
        d_model, d_ff, n_experts, k, n_shared: as :class:`~effarch.moe.MoELayer` (softmax
            scores, top-``k`` renormalised, no capacity limit).
        n_modalities: ``M``.
        pools: ``"shared"`` or ``"separate"`` (:data:`POOLS`); ``"separate"`` needs ``M`` to
            divide ``n_experts`` and ``k <= n_experts / M``.

    ``forward(x [..., d], modality [...] int64) -> [..., d]``. After a call, ``routing``
    holds the :class:`~effarch.moe.Routing` over the flattened tokens (``experts`` as global
    expert indices) and ``modality`` their modalities; :meth:`balance_loss` is the
    Switch load-balancing loss over the pool each token was routed in.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        k: int,
        *,
        n_modalities: int = 2,
        pools: str = "shared",
        n_shared: int = 0,
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("k", k)):
            check_positive_int(name, v)
        check_positive_int("n_modalities", n_modalities)
        check_positive_int("n_shared", n_shared, allow_zero=True)
        self.pools = check_choice("pools", pools, POOLS)
        per_pool = n_experts // n_modalities if pools == "separate" else n_experts
        if pools == "separate" and n_experts % n_modalities:
            raise ValueError(
                f'pools="separate" needs n_modalities={n_modalities} to divide '
                f"n_experts={n_experts}"
            )
        if k > per_pool:
            raise ValueError(f"k must be at most the {per_pool} experts of a pool, got {k}")
        self.d_model, self.d_ff, self.n_experts, self.k = d_model, d_ff, n_experts, k
        self.n_modalities, self.per_pool = n_modalities, per_pool
        self.gate = Router(d_model, n_experts)
        self.experts = Experts(n_experts, d_model, d_ff)
        self.shared_experts = SwiGLU(d_model, n_shared * d_ff) if n_shared else None
        self.routing: Routing | None = None
        self.modality: torch.Tensor | None = None

    def pool(self, m: int) -> range:
        """The global indices of the experts modality ``m`` may use."""
        if self.pools == "shared":
            return range(self.n_experts)
        return range(m * self.per_pool, (m + 1) * self.per_pool)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., d_model={self.d_model}], got {got}")
        check_tensor("modality", modality, dtypes=(torch.int64,))
        if modality.shape != x.shape[:-1]:
            raise ValueError(
                f"modality must have x's shape without its last dimension "
                f"{tuple(x.shape[:-1])}, got {tuple(modality.shape)}"
            )
        mod = modality.reshape(-1)
        if mod.numel() and (mod.min() < 0 or mod.max() >= self.n_modalities):
            raise ValueError(
                f"modality must lie in 0..{self.n_modalities - 1}, got values "
                f"{mod.min().item()}..{mod.max().item()}"
            )
        shape = x.shape
        h = x.reshape(-1, self.d_model)
        logits = self.gate(h)  # [N, E]
        n = h.shape[0]
        weights = torch.zeros(n, self.k, dtype=logits.dtype, device=h.device)
        experts = torch.zeros(n, self.k, dtype=torch.long, device=h.device)
        if self.pools == "shared":
            weights, experts = route(logits, self.k)
        else:  # each modality routes within its own group, by its group's router rows
            for m in range(self.n_modalities):
                rows = torch.where(mod == m)[0]
                if rows.numel() == 0:
                    continue
                g = self.pool(m)
                w_m, e_m = route(logits[rows][:, g.start : g.stop], self.k)
                weights[rows], experts[rows] = w_m, e_m + g.start
        self.routing = Routing(logits, weights, experts, torch.ones_like(experts, dtype=torch.bool))
        self.modality = mod
        out = experts_loop(h, experts, weights, self.experts.gate_up_proj, self.experts.down_proj)
        return add_shared(h, out, self.shared_experts, None).view(shape)

    def balance_loss(self) -> torch.Tensor:
        """Switch's ``E sum_e f_e P_e`` (:func:`~effarch.moe.load_balancing_loss`) of the last
        call: over all tokens and experts (``"shared"``), or the mean over modalities of the
        loss within each modality's pool (``"separate"``)."""
        if self.routing is None or self.modality is None:
            raise RuntimeError("balance_loss() needs a forward call first")
        r, mod = self.routing, self.modality
        if self.pools == "shared":
            return load_balancing_loss(r.logits, r.experts)
        losses = []
        for m in range(self.n_modalities):
            rows = torch.where(mod == m)[0]
            if rows.numel():
                g = self.pool(m)
                logits = r.logits[rows][:, g.start : g.stop]
                losses.append(load_balancing_loss(logits, r.experts[rows] - g.start))
        return torch.stack(losses).mean()

    def active_parameters(self) -> int:
        """Parameters used per token: the router rows of its pool, ``k`` experts, shared."""
        shared = (
            sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts else 0
        )
        return self.per_pool * self.d_model + self.k * 3 * self.d_model * self.d_ff + shared

    def extra_repr(self) -> str:
        return (
            f"pools={self.pools!r}, n_experts={self.n_experts}, k={self.k}, "
            f"n_modalities={self.n_modalities}"
        )
