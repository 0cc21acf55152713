"""What the registry shows: the chapter's table rendered from :data:`RULES`, and a probe of
how long each memory keeps one binding."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .._checks import check_choice
from ..linear.ops import (
    retention_log_decays,
)
from .memory import memory_scan
from .rule import Tensor, UpdateRule
from .rules import RULES

__all__ = ["RETENTION_RULES", "registry_table", "retention_curve"]


def registry_table(
    rules: Mapping[str, UpdateRule] | None = None,
    *,
    d_k: int = 128,
    d_v: int = 128,
    context: int = 4096,
) -> str:
    """The unified table as Markdown (LaTeX in ``$...$``), one row per rule.

    Columns: method, class, update rule, objective, memory per head (the formula, and its
    value at ``d_k``, ``d_v`` after ``context`` tokens), cost of training on a sequence of
    ``T`` tokens and of decoding one token. Notes follow the table.
    """
    rules = RULES if rules is None else rules
    for name, value in (("d_k", d_k), ("d_v", d_v), ("context", context)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    head = (
        "| Method | Class | Update | Objective (one step of GD on it) | Memory per head "
        f"(at $d_k$={d_k}, $d_v$={d_v}, t={context}) | Training | Decoding / token |"
    )
    lines = [head, "|" + " --- |" * 7]
    notes = []
    for r in rules.values():
        n = r.state_elements(d_k, d_v, context)
        lines.append(
            f"| {r.name} | {r.cls} | ${r.update}$ | ${r.objective}$ | ${r.state}$ = {n:,} | "
            f"${r.train}$ | ${r.decode}$ |"
        )
        if r.note:
            notes.append(f"- {r.note}")
    return "\n".join(lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------------------------
# A probe: how long does a memory keep one binding?
# --------------------------------------------------------------------------------------------

RETENTION_RULES = ("linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "titans")


def retention_curve(
    rule: str,
    *,
    steps: int = 200,
    overlap: float = 0.0,
    log_decay: float = -0.02,
    beta: float = 1.0,
    d_key: int = 32,
    d_value: int = 32,
    seed: int = 0,
) -> Tensor:
    r"""How much of one stored binding a memory still returns, step after step.

    Step 0 writes ``(k_0, v_0)``; steps ``1..steps`` write random pairs whose unit keys have
    cosine ``overlap`` with ``k_0``; every step reads ``k_0``. Returns ``[steps + 1]``, the
    retained fraction ``<o_t, v_0> / ||v_0||^2``. Right after the write (step 0) it is, in
    exact arithmetic, the write strength: 1 for ``"linear_attention"``, ``"retnet"`` and
    ``"gla"``, ``beta`` for ``"deltanet"``, ``"gated_deltanet"`` and ``"titans"``.

    Rules: ``"linear_attention"`` and ``"retnet"`` (its head-0 decay ``1 - 2^-5``) take no
    parameter; ``"gla"`` decays every key row by ``exp(log_decay)``; ``"deltanet"`` writes
    with strength ``beta``, ``"gated_deltanet"`` with ``beta`` and decay ``exp(log_decay)``;
    ``"titans"`` uses learning rate ``beta``, forgetting ``1 - exp(log_decay)`` and no
    momentum. With ``overlap = 0`` later writes never touch ``k_0``: linear attention and
    the delta rule keep all of ``v_0``, and only a decay forgets it.
    """
    check_choice("rule", rule, RETENTION_RULES)
    for name, value in (("steps", steps), ("d_key", d_key), ("d_value", d_value)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(overlap, (int, float)) or not -1 <= overlap <= 1:
        raise ValueError(f"overlap must be a cosine in [-1, 1], got {overlap!r}")
    if not isinstance(log_decay, (int, float)) or log_decay > 0:
        raise ValueError(f"log_decay must be <= 0 (a decay exp(log_decay) <= 1), got {log_decay!r}")
    if not isinstance(beta, (int, float)) or not 0 < beta <= 2:
        raise ValueError(f"beta must lie in (0, 2], got {beta!r}")
    gen = torch.Generator().manual_seed(seed)
    t = steps + 1
    k0 = F.normalize(torch.randn(d_key, generator=gen, dtype=torch.float64), dim=0)
    other = torch.randn(steps, d_key, generator=gen, dtype=torch.float64)
    other = F.normalize(other - (other @ k0)[:, None] * k0, dim=-1)  # orthogonal to k_0
    keys = torch.cat([k0[None], overlap * k0 + (1 - overlap**2) ** 0.5 * other])
    values = torch.randn(t, d_value, generator=gen, dtype=torch.float64)
    q = k0.expand(t, d_key)[None, :, None]  # [1, T, 1, K]
    k, v = keys[None, :, None], values[None, :, None]
    ones = torch.ones(1, t, 1, dtype=torch.float64)
    inputs: dict[str, Tensor] = {}
    if rule == "retnet":
        inputs["log_gamma"] = retention_log_decays(1, dtype=torch.float64)
    elif rule == "gla":
        inputs["g"] = torch.full((1, t, 1, d_key), float(log_decay), dtype=torch.float64)
    elif rule in ("deltanet", "gated_deltanet"):
        inputs["beta"] = beta * ones
        if rule == "gated_deltanet":
            inputs["g"] = float(log_decay) * ones
    elif rule == "titans":
        inputs = {"theta": beta * ones, "eta": 0 * ones, "alpha": (1 - math.exp(log_decay)) * ones}
    o, _ = memory_scan(rule, q, k, v, scale=1.0, **inputs)
    v0 = values[0]
    return (o[0, :, 0] @ v0) / (v0 @ v0)
