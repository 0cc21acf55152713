r"""Routers: which experts each token goes to, and with what weight (chapter 5.1).

**Token choice** (:func:`route`): every token picks its ``k`` best experts. One function
covers the routers of the field, selected by its arguments; for the same logits it gives the
weights and indices of these ``transformers`` modules (tested):

=========================================  ===================================================
``route(l, k)``                            ``MixtralTopKRouter``: softmax over all experts
                                           (float32), top-k, renormalised to sum 1
``route(l, k, renormalize=False)``         ``Qwen2MoeTopKRouter`` / ``OlmoeTopKRouter`` with
                                           ``norm_topk_prob=False`` (True: the line above)
``route(l, k, score="sigmoid", ...)``      ``DeepseekV3TopkRouter``, with ``n_group=G,
                                           topk_group=M, bias=b, scaling=s``: sigmoid scores;
                                           the ``topk_group`` groups with the largest sum of
                                           their top-2 scores (plus bias) are eligible; top-k
                                           of ``score + bias`` among them; weights from the
                                           score *without* bias, renormalised
                                           (``norm_topk_prob``), times ``routed_scaling_factor``
``route(l, 1, renormalize=False)``         ``SwitchTransformersTop1Router``, followed by
                                           :func:`apply_capacity`: top-1 softmax probability,
                                           tokens beyond an expert's capacity dropped in
                                           position order within a group
=========================================  ===================================================

The bias of DeepSeek-V3 (``e_score_correction_bias``) only changes *which* experts are
chosen, never the weights: that is what lets :func:`~effarch.moe.update_bias` balance the
load without a loss term.

**Other routers.** :func:`expert_choice` (experts pick their top-``capacity`` tokens, Zhou et
al., 2022), :func:`hash_route` (a fixed hash of the token id, Roller et al., 2021),
:func:`balanced_assignment` (BASE layers, Lewis et al., 2021: every expert gets exactly
``N / E`` tokens, here by Sinkhorn iterations and a capacity-respecting rounding) and
:func:`null_expert_route` (adaptive top-k with null experts that cost nothing, AdaMoE).
Expert choice and balanced assignment decide from *all* tokens of a batch, so a token's
route depends on later tokens: they cannot decode token by token as they are (the tests show
it with :func:`effarch.sparse.future_leaks`); token choice and hashing are causal.

Dropped or null slots carry the expert index ``E`` (``n_experts``, ``transformers``'
sentinel: ``one_hot(..., E + 1)`` then ignore the last class) and weight 0.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_positive_int, check_positive_number, check_tensor

__all__ = [
    "apply_capacity",
    "balanced_assignment",
    "expert_capacity",
    "expert_choice",
    "hash_route",
    "null_expert_route",
    "route",
    "router_scores",
]


def _check_logits(logits: torch.Tensor) -> None:
    check_tensor("logits", logits, ndim=2, floating=True)


def router_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """The router's scores in float32 (or float64 for float64 logits): ``softmax`` over the
    experts, or an independent ``sigmoid`` per expert (DeepSeek-V3). ``[N, E] -> [N, E]``."""
    check_choice("score", score, ("softmax", "sigmoid"))
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return x.softmax(-1) if score == "softmax" else x.sigmoid()


def route(
    logits: torch.Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Token-choice top-k routing (see the module docstring for which router each setting is).

    With scores ``s = softmax(logits)`` or ``sigmoid(logits)``: the chosen experts are the
    top-``k`` of ``s + bias`` (among the ``topk_group`` best groups when ``n_group`` is set, a
    group scored by the sum of its two best ``s + bias``), and their weights are
    ``scaling * s_e / sum_{e' chosen} s_e'`` (``renormalize``) or ``scaling * s_e``.

    Args:
        logits: ``[N, E]`` router logits, one row per token.
        k: experts per token.
        score: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the chosen weights by their sum.
        bias: ``[E]`` added to the scores for the choice only.
        n_group, topk_group: group-limited routing; both or neither.
        scaling: the routed scaling factor.

    Returns:
        ``(weights [N, k], experts [N, k] int64)``, the weights in float32, or float64 for
        float64 logits (as :func:`router_scores`), experts in descending order of
        ``s + bias`` (ties to the lower index, as ``torch.topk``).
    """
    _check_logits(logits)
    n, e = logits.shape
    check_positive_int("k", k)
    if k > e:
        raise ValueError(f"k must be at most the number of experts {e}, got {k}")
    s = router_scores(logits, score)
    choice = s
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != e:
            raise ValueError(f"bias must have {e} entries (one per expert), got {bias.shape[0]}")
        choice = s + bias.to(s.dtype)
    if (n_group is None) != (topk_group is None):
        raise ValueError(
            f"n_group and topk_group go together, got n_group={n_group}, topk_group={topk_group}"
        )
    if n_group is not None:
        check_positive_int("n_group", n_group)
        check_positive_int("topk_group", topk_group)
        if e % n_group or topk_group > n_group:
            raise ValueError(
                f"n_group must divide the {e} experts and topk_group <= n_group, got "
                f"n_group={n_group}, topk_group={topk_group}"
            )
        if k > topk_group * (e // n_group):
            raise ValueError(f"k={k} exceeds the experts of {topk_group} groups of {e // n_group}")
        grouped = choice.view(n, n_group, e // n_group)
        group_score = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # [N, n_group]
        best = group_score.topk(topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(e // n_group, 1), float("-inf"))
    experts = choice.topk(k, dim=-1).indices
    weights = s.gather(1, experts)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return (weights * scaling).to(torch.promote_types(logits.dtype, torch.float32)), experts


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * n_tokens * k / n_experts)`` (GShard, Switch;
    ``capacity_factor = 1`` is exactly the even share)."""
    for name, v in (("n_tokens", n_tokens), ("n_experts", n_experts), ("k", k)):
        check_positive_int(name, v)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def apply_capacity(
    experts: torch.Tensor, n_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the assignments that overflow an expert's ``capacity``.

    Priority: the first choices of all tokens before any second choice (GShard), and within a
    choice, earlier tokens first (Switch Transformer's ``cumsum`` over the sequence). Groups
    (sequences, or devices) are leading dimensions and are counted separately.

    Args:
        experts: ``[..., N, k]`` int64 expert indices.
        n_experts: ``E``.
        capacity: slots per expert and group.

    Returns:
        ``(experts, keep)``: the indices with dropped slots set to ``E`` (the sentinel), and
        ``keep [..., N, k]`` bool.
    """
    check_tensor("experts", experts, dtypes=(torch.int64,))
    if experts.ndim < 2:
        raise ValueError(f"experts must be [..., N, k], got shape {tuple(experts.shape)}")
    check_positive_int("n_experts", n_experts)
    check_positive_int("capacity", capacity, allow_zero=True)
    n, k = experts.shape[-2:]
    order = experts.transpose(-1, -2).reshape(*experts.shape[:-2], k * n)  # choice-major
    onehot = torch.nn.functional.one_hot(order, n_experts + 1)
    position = (onehot.cumsum(-2) * onehot).sum(-1)  # 1-based rank in its expert's queue
    keep = (position <= capacity) & (order < n_experts)
    keep = keep.view(*experts.shape[:-2], k, n).transpose(-1, -2)
    return torch.where(keep, experts, n_experts), keep


def expert_choice(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al., 2022): each expert takes its ``capacity`` tokens
    with the highest softmax score (softmax over experts, per token).

    Perfect balance by construction; a token may get any number of experts, zero included.
    Not causal: an expert ranks all tokens of the batch.

    Args:
        logits: ``[N, E]``.
        capacity: tokens per expert (``<= N``).

    Returns:
        ``(weights [E, capacity], tokens [E, capacity] int64)``: the tokens each expert takes
        and their scores.
    """
    _check_logits(logits)
    check_positive_int("capacity", capacity)
    if capacity > logits.shape[0]:
        raise ValueError(f"capacity must be at most N={logits.shape[0]}, got {capacity}")
    s = router_scores(logits).T  # [E, N]
    weights, tokens = s.topk(capacity, dim=-1)
    return weights, tokens


def hash_route(token_ids: torch.Tensor, n_experts: int, *, seed: int = 0) -> torch.Tensor:
    """Hash routing (Roller et al., 2021): expert ``= h(token id) mod E`` for a fixed seeded
    hash ``h`` (an integer mix of the id), weight 1, nothing to learn.

    ``token_ids [...] int64 -> experts [...] int64``.
    """
    check_tensor("token_ids", token_ids, dtypes=(torch.int64, torch.int32))
    check_positive_int("n_experts", n_experts)
    x = token_ids.to(torch.int64) * 2654435761 + seed * 40503 + 12345
    x = (x ^ (x >> 13)) * 1274126177
    return (x ^ (x >> 16)) % n_experts


def balanced_assignment(
    logits: torch.Tensor, *, iterations: int = 50, temperature: float = 0.05
) -> torch.Tensor:
    r"""BASE layers' routing: one expert per token, every expert exactly ``N / E`` tokens,
    total score as large as possible.

    BASE solves the linear assignment exactly (an auction algorithm); here Sinkhorn
    iterations on ``exp(logits / temperature)`` find the plan with row sums 1 and column sums
    ``N / E`` (the entropic relaxation, exact as ``temperature -> 0``), and a greedy rounding
    assigns tokens in order of decreasing plan weight, each to its best expert with room left.

    Args:
        logits: ``[N, E]`` token-expert affinities, ``N`` a multiple of ``E``.
        iterations: Sinkhorn iterations (positive).
        temperature: the entropic temperature (a finite positive number; smaller is closer
            to the exact assignment).

    Returns:
        ``experts [N]`` int64; each expert appears exactly ``N / E`` times.
    """
    _check_logits(logits)
    check_positive_int("iterations", iterations)
    check_positive_number("temperature", temperature)
    n, e = logits.shape
    if n % e:
        raise ValueError(f"N must be a multiple of the {e} experts for an even split, got {n}")
    log_p = logits.double() / temperature
    log_cols = math.log(n / e)
    for _ in range(iterations):  # alternate the two marginals in log space
        log_p = log_p - log_p.logsumexp(1, keepdim=True)
        log_p = log_p - log_p.logsumexp(0, keepdim=True) + log_cols
    room = torch.full((e,), n // e, dtype=torch.int64)
    experts = torch.full((n,), -1, dtype=torch.int64)
    # visit (token, expert) pairs by decreasing plan weight; take the pair if both are free
    order = log_p.flatten().argsort(descending=True).tolist()
    left = n
    for flat in order:
        t, x = divmod(flat, e)
        if experts[t] < 0 and room[x] > 0:
            experts[t] = x
            room[x] -= 1
            left -= 1
            if left == 0:
                break
    return experts.to(logits.device)


def null_expert_route(
    logits: torch.Tensor, k: int, n_null: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive top-k with null experts (AdaMoE): the last ``n_null`` columns of ``logits``
    are experts that output zero and cost nothing; a token whose top-k includes ``j`` of them
    uses only ``k - j`` real experts.

    The weights are renormalised over *all* ``k`` choices (nulls included, as AdaMoE's
    softmax top-k does), so a null choice also shrinks the real experts' contribution.

    Args:
        logits: ``[N, E + n_null]``.

    Returns:
        ``(weights [N, k], experts [N, k])`` with null choices as expert ``E`` (the sentinel)
        and weight 0.
    """
    _check_logits(logits)
    check_positive_int("n_null", n_null)
    e = logits.shape[1] - n_null
    if e < 1:
        raise ValueError(f"logits must have more than n_null={n_null} columns, got {e + n_null}")
    weights, experts = route(logits, k, renormalize=renormalize)
    null = experts >= e
    return weights.masked_fill(null, 0.0), experts.masked_fill(null, e)
