r"""From a dense feed-forward block to a mixture of experts (chapter 5.3).

**Sparse upcycling** (Komatsuzaki et al., 2023): every expert starts as a copy of the trained
dense FFN, the router starts fresh. With identical experts and weights that sum to one, the
MoE computes exactly the dense FFN at initialisation (:func:`upcycle`, tested), so training
continues from the dense model's quality instead of from scratch; small noise on the copies
(``noise``) lets them drift apart sooner.

**MoEfication** (Zhang et al., 2022) and **LLaMA-MoE** (Zhu et al., 2024) instead *split* the
dense FFN: its ``d_ff`` hidden neurons are partitioned into ``E`` groups, expert ``e`` keeps
the gate/up rows and down columns of group ``e``, and since the SwiGLU output is a sum over
neurons, ``FFN(x) = sum_e expert_e(x)`` exactly. Computing only ``k`` groups per token
approximates it; the error depends on how the neurons are grouped (:func:`neuron_groups`:
at random, or by balanced k-means on the neurons' firing patterns, so that neurons that fire
together share a group) and on how the groups are chosen per token (:func:`moefied_ffn`: here
the oracle, the groups with the largest activation mass, which a trained router imitates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_positive_int
from ..nn import SwiGLU
from .layer import MoELayer
from .routing import balanced_assignment

__all__ = ["moefied_ffn", "neuron_groups", "split_ffn", "upcycle"]


def _check_ffn(ffn: SwiGLU) -> None:
    if not isinstance(ffn, SwiGLU):
        raise TypeError(f"ffn must be an effarch.nn.SwiGLU, got {type(ffn).__name__}")


@torch.no_grad()
def upcycle(ffn: SwiGLU, n_experts: int, k: int, *, noise: float = 0.0, seed: int = 0) -> MoELayer:
    """An :class:`~effarch.moe.MoELayer` whose ``n_experts`` experts are copies of ``ffn``.

    Args:
        ffn: the trained dense block (its width becomes every expert's ``d_ff``).
        n_experts, k: experts and experts per token (Mixtral's router: softmax, top-k,
            renormalised, so the weights sum to one).
        noise: each copy's weights are multiplied by ``1 + noise * N(0, 1)`` (0: exact copies).
        seed: of the noise and of the router's initialisation (the global RNG is seeded
            inside ``torch.random.fork_rng``, so the caller's random stream is untouched).

    Returns:
        the MoE layer, on ``ffn``'s device and dtype; with ``noise=0`` it equals ``ffn``.
    """
    _check_ffn(ffn)
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    d_ff, d = ffn.gate_proj.weight.shape
    w = ffn.gate_proj.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeds the router, leaves the caller's RNG as is
        torch.manual_seed(seed)
        moe = MoELayer(d, d_ff, n_experts, k)
    moe = moe.to(device=w.device, dtype=w.dtype)
    gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])  # [2F, d], gate rows first
    down = ffn.down_proj.weight
    for e in range(n_experts):
        for dst, src in ((moe.experts.gate_up_proj[e], gate_up), (moe.experts.down_proj[e], down)):
            jitter = 1 + noise * torch.randn(src.shape, generator=gen).to(src)
            dst.copy_(src * jitter)
    return moe


def neuron_groups(
    n_experts: int,
    d_ff: int,
    *,
    method: str = "random",
    activations: torch.Tensor | None = None,
    iterations: int = 20,
    seed: int = 0,
) -> torch.Tensor:
    """Partition ``d_ff`` neurons into ``n_experts`` groups of ``d_ff / n_experts``.

    ``"random"``: a seeded permutation. ``"cluster"``: balanced k-means on the neurons'
    activation patterns ``activations [N, d_ff]`` (whether each neuron is active, ``|a| >`` its
    median, on ``N`` sample tokens): neurons that fire on the same tokens share a group.
    Balance is kept at every iteration by assigning the neurons to the centroids with
    :func:`~effarch.moe.balanced_assignment` (the same problem as BASE's tokens and experts:
    ``d_ff / E`` each, largest total affinity).

    MoEfication has two splits of its own: balanced k-means on the neurons' weight vectors
    (its parameter-clustering split), and METIS partitioning of a graph whose edges count how
    often two neurons fire together (its co-activation split). ``"cluster"`` runs balanced
    k-means on the firing patterns instead, which aims at what the co-activation split does.

    Returns:
        ``groups [n_experts, d_ff / n_experts]`` int64 neuron indices.
    """
    check_positive_int("n_experts", n_experts)
    check_positive_int("d_ff", d_ff)
    check_choice("method", method, ("random", "cluster"))
    if method == "cluster":
        check_positive_int("iterations", iterations)
    if d_ff % n_experts:
        raise ValueError(f"n_experts must divide d_ff={d_ff}, got {n_experts}")
    size = d_ff // n_experts
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(d_ff, generator=gen)
    if method == "random":
        return perm.view(n_experts, size)
    if activations is None or activations.ndim != 2 or activations.shape[1] != d_ff:
        got = None if activations is None else tuple(activations.shape)
        raise ValueError(f"method='cluster' needs activations [N, d_ff={d_ff}], got {got}")
    a = activations.abs().float()
    patterns = (a > a.median(0).values).float().T  # [d_ff, N]: which tokens each neuron serves
    patterns = F.normalize(patterns - patterns.mean(1, keepdim=True), dim=1)
    # farthest-point start (k-means++ without the sampling): each next centroid is the neuron
    # least similar to the centroids so far, so no two start in the same cluster
    chosen = [int(perm[0])]
    for _ in range(n_experts - 1):
        chosen.append(int((patterns @ patterns[chosen].T).amax(1).argmin()))
    centroids = patterns[chosen].clone()
    for _ in range(iterations):
        # neurons to centroids, d_ff / E each: the balanced assignment BASE routes tokens by
        assign = balanced_assignment(patterns @ centroids.T)  # affinities [d_ff, E]
        centroids = F.normalize(
            torch.stack([patterns[assign == g].mean(0) for g in range(n_experts)]), dim=1
        )
    return torch.stack([(assign == g).nonzero()[:, 0] for g in range(n_experts)])


def split_ffn(ffn: SwiGLU, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of a split FFN: ``gate_up [E, 2 d_ff / E, d]`` (gate rows first) and
    ``down [E, d, d_ff / E]``, expert ``e`` holding the neurons ``groups[e]``; the sum of all
    experts' outputs is ``ffn``'s output."""
    _check_ffn(ffn)
    g, u, dn = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    gate_up = torch.cat([g[groups], u[groups]], dim=1)  # [E, 2 size, d]
    down = dn[:, groups].permute(1, 0, 2)  # [E, d, size]
    return gate_up.contiguous(), down.contiguous()


def moefied_ffn(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split FFN with ``k`` of its ``E`` experts per token, chosen by the oracle: the
    groups with the largest activation mass ``sum_i |silu(g_i) u_i|``; outputs summed with
    unit weights (the split is exact at ``k = E``). Every group is computed and ``k`` kept:
    this measures the approximation, not the work a router would save.

    ``x [N, d]``; returns ``(y [N, d], chosen [N, k])``.
    """
    n_experts = gate_up.shape[0]
    check_positive_int("k", k)
    if k > n_experts:
        raise ValueError(f"k must be at most the {n_experts} experts, got {k}")
    h = torch.einsum("nd,efd->nef", x, gate_up)  # [N, E, 2 size]
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up  # [N, E, size]
    chosen = act.abs().sum(-1).topk(k, dim=-1).indices  # [N, k]
    y_all = torch.einsum("nef,edf->ned", act, down)  # [N, E, d]
    y = y_all.gather(1, chosen[..., None].expand(-1, -1, y_all.shape[-1])).sum(1)
    return y, chosen
