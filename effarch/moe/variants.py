r"""Variations on the expert layer (chapter 5.2): Soft MoE, Mixture-of-Depths, and MoE++'s
zero-computation experts.

**Soft MoE** (Puigcerver et al., 2024). No discrete choice: each of the ``E S`` slots is a
convex combination of *all* tokens, ``x~_s = sum_t D_ts x_t`` with ``D = softmax_t(X Phi)``
(over tokens, per slot), expert ``s // S`` processes its ``S`` slots, and each token takes a
convex combination of the slot outputs, ``y_t = sum_s C_ts y~_s`` with ``C = softmax_s(X Phi)``
(over slots, per token). Fully differentiable and balanced, but every slot reads every token
of the sequence: not causal, so it does not decode token by token.

**Mixture-of-Depths** (Raposo et al., 2024). A router scores every token with ``r_t = w . x_t``;
only the ``capacity`` highest-scoring tokens of a sequence go through the block, scaled by
their score, the rest skip it on the residual: ``y_t = x_t + r_t f(x)_t`` if chosen, else
``x_t``. Top-k over the sequence is not causal; for decoding, a small *predictor* is trained
(binary cross-entropy, on stopped gradients) to guess from ``x_t`` alone whether ``t`` would
have been chosen, and decoding routes by ``predictor(x_t) > 0``.

**MoE++** (Jin et al., 2024). Besides the FFN experts, the router may choose experts that cost
(almost) nothing: a *zero* expert (outputs 0: the token skips the layer's FFN), a *copy*
expert (outputs ``x``) and *constant* experts (``a_1 x + a_2 v_j`` with a learned vector
``v_j`` and ``(a_1, a_2) = softmax(W_j x)``). Tokens that choose them spend fewer FLOPs: the
number of FFN experts a token uses becomes adaptive.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from .layer import Experts, Router, experts_grouped
from .routing import route

__all__ = ["MixtureOfDepths", "MoEPlusPlus", "SoftMoE"]


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class SoftMoE(nn.Module):
    """Soft MoE over each sequence (module docstring): ``x [B, T, d] -> [B, T, d]``.

    ``phi [d, E S]`` are the slot parameters (the paper normalises ``x`` and ``phi`` and
    learns a scale; here plain products, to keep the formula visible).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, slots_per_expert: int = 1) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts),
                        ("slots_per_expert", slots_per_expert)):  # fmt: skip
            check_positive_int(name, v)
        self.n_experts, self.slots = n_experts, slots_per_expert
        self.phi = nn.Parameter(torch.randn(d_model, n_experts * slots_per_expert) * d_model**-0.5)
        self.experts = Experts(n_experts, d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.phi.shape[0]:
            raise ValueError(f"x must be [B, T, d_model={self.phi.shape[0]}], got {tuple(x.shape)}")
        logits = x @ self.phi  # [B, T, E S]
        dispatch = logits.softmax(dim=1)  # over tokens: each slot is a mix of the tokens
        combine = logits.softmax(dim=2)  # over slots: each token is a mix of the slot outputs
        slots = dispatch.transpose(1, 2) @ x  # [B, E S, d]
        slots = slots.unflatten(1, (self.n_experts, self.slots))  # [B, E, S, d]
        out = torch.stack(
            [_swiglu(slots[:, e], self.experts.gate_up_proj[e], self.experts.down_proj[e])
             for e in range(self.n_experts)], dim=1,
        )  # fmt: skip
        return combine @ out.flatten(1, 2)


class MixtureOfDepths(nn.Module):
    """Mixture-of-Depths around any block ``f: [B, n, d] -> [B, n, d]`` (module docstring).

    Args:
        block: the wrapped computation (for example an attention + FFN residual branch).
        d_model: width.
        capacity: fraction of each sequence's tokens that go through the block (0, 1].

    ``forward(x [B, T, d]) -> [B, T, d]`` routes by top-``capacity`` of the sequence
    (training, not causal); ``forward(x, causal=True)`` routes each token by the predictor's
    sign alone (decoding). After a forward pass, ``self.chosen [B, T]`` holds the routing it
    used (the predictor's in causal mode) and :meth:`predictor_loss` the predictor's binary
    cross-entropy against the top-k choice over that ``x``'s sequences, in either mode (a
    causal call on a single token has a top-k of that one token: train the predictor on
    whole sequences).
    """

    def __init__(self, block: Callable[[torch.Tensor], torch.Tensor], d_model: int,
                 capacity: float = 0.125) -> None:  # fmt: skip
        super().__init__()
        check_positive_int("d_model", d_model)
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        self.block, self.capacity = block, capacity
        self.router = nn.Linear(d_model, 1, bias=False)
        self.predictor = nn.Sequential(
            nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, 1)
        )
        self.chosen: torch.Tensor | None = None
        self._pred_logits: torch.Tensor | None = None
        self._topk: torch.Tensor | None = None  # the predictor's target, in both modes

    def forward(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, d], got {tuple(x.shape)}")
        b, t, d = x.shape
        r = self.router(x)[..., 0]  # [B, T]
        self._pred_logits = self.predictor(x.detach())[..., 0]
        n = max(1, int(round(self.capacity * t)))
        topk = torch.zeros_like(r, dtype=torch.bool)
        topk.scatter_(1, r.topk(n, dim=1).indices, True)
        self._topk = topk
        chosen = self._pred_logits > 0 if causal else topk
        self.chosen = chosen
        out = x.clone()
        for i in range(b):  # the chosen tokens of each sequence, in their order, through f
            idx = chosen[i].nonzero()[:, 0]
            if len(idx):
                y = self.block(x[i, idx][None])[0]
                out[i, idx] = x[i, idx] + r[i, idx, None] * y
        return out

    def predictor_loss(self) -> torch.Tensor:
        """Binary cross-entropy of the predictor against the top-k routing of the last call's
        input (also after ``forward(x, causal=True)``, which routes by the predictor)."""
        if self._pred_logits is None or self._topk is None:
            raise RuntimeError("call forward first")
        return F.binary_cross_entropy_with_logits(self._pred_logits, self._topk.float())


class MoEPlusPlus(nn.Module):
    """An MoE layer with zero, copy and constant experts beside ``n_experts`` SwiGLU experts.

    The router scores ``E + n_zero + n_copy + n_constant`` experts (softmax, top-``k``,
    renormalised, as Mixtral); index ``e`` counts FFN experts first, then zero, copy and
    constant ones. ``forward(x [..., d]) -> [..., d]``; after a call, ``self.ffn_per_token``
    is the mean number of FFN experts a token used.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, k: int, *, n_zero: int = 1,
                 n_copy: int = 1, n_constant: int = 1) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("k", k)):
            check_positive_int(name, v)
        for name, v in (("n_zero", n_zero), ("n_copy", n_copy), ("n_constant", n_constant)):
            check_positive_int(name, v, allow_zero=True)
        self.n_experts, self.k = n_experts, k
        self.n_zero, self.n_copy, self.n_constant = n_zero, n_copy, n_constant
        total = n_experts + n_zero + n_copy + n_constant
        if k > total:
            raise ValueError(f"k must be at most the {total} experts, got {k}")
        self.gate = Router(d_model, total)
        self.experts = Experts(n_experts, d_model, d_ff)
        self.constant_vectors = nn.Parameter(torch.randn(n_constant, d_model) * 0.02)
        self.constant_gates = nn.Parameter(torch.zeros(n_constant, 2, d_model))
        self.ffn_per_token = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, experts = route(self.gate(h), self.k)
        weights = weights.to(h.dtype)
        e = self.n_experts
        ffn = experts < e
        self.ffn_per_token = ffn.sum(-1).float().mean().item()
        out = experts_grouped(h, torch.where(ffn, experts, e), weights.masked_fill(~ffn, 0),
                              self.experts.gate_up_proj, self.experts.down_proj)  # fmt: skip
        copy = (experts >= e + self.n_zero) & (experts < e + self.n_zero + self.n_copy)
        out = out + (weights * copy).sum(-1, keepdim=True) * h
        first_const = e + self.n_zero + self.n_copy
        for j in range(self.n_constant):
            wj = (weights * (experts == first_const + j)).sum(-1, keepdim=True)  # [N, 1]
            a = torch.einsum("nd,cd->nc", h, self.constant_gates[j]).softmax(-1)  # [N, 2]
            out = out + wj * (a[:, :1] * h + a[:, 1:] * self.constant_vectors[j])
        return out.view(shape)  # zero experts add nothing
