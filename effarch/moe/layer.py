r"""The mixture-of-experts feed-forward layer and its execution paths (chapter 5.2).

``y = shared(x) + sum_{e in top-k(x)} w_e(x) * expert_e(x)``, each expert a SwiGLU
``down_e(silu(gate_e x) * up_e x)``. Fine-grained experts (DeepSeekMoE) are many small ones
(``d_ff`` a fraction of the dense FFN's width, ``k`` larger), shared experts are always on.

Parameter names follow ``transformers`` so weights load by name: ``gate.weight [E, d]`` and
``gate.e_score_correction_bias [E]`` (DeepSeek-V3's router), ``experts.gate_up_proj
[E, 2 d_ff, d]`` and ``experts.down_proj [E, d, d_ff]`` (Mixtral, Qwen2-MoE, OLMoE,
DeepSeek-V3 experts stored as 3-D tensors, gate rows first), ``shared_experts.{gate,up,down}
_proj`` (DeepSeek-V3's ``shared_experts``; Qwen2-MoE calls it ``shared_expert``) and
``shared_expert_gate.weight [1, d]`` (Qwen2-MoE's sigmoid gate on the shared expert).

Execution paths, equal up to rounding (tested):

- ``"loop"``: one pass per expert over the tokens routed to it (``transformers``' eager
  ``MixtralExperts``): simple, ``E`` small products.
- ``"grouped"``: sort the ``N k`` assignments by expert, then two grouped matrix products
  over the sorted rows (:func:`grouped_matmul`: ``torch.nn.functional.grouped_mm`` with
  per-expert row offsets on a GPU, one padded ``bmm`` on a CPU), and un-permute with a
  weighted ``index_add``: the layout every MoE kernel uses.
- ``"triton"``: the same permute and un-permute around the book's Triton grouped-GEMM kernel
  (``effarch_kernels.grouped_gemm``, forward and backward; on a CPU it runs only under
  ``TRITON_INTERPRET=1``, as a correctness check, far slower than PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from .._kernels import use_triton
from ..nn import SwiGLU
from .routing import apply_capacity, expert_capacity, route

__all__ = [
    "add_shared",
    "route_tokens",
    "Experts",
    "MoELayer",
    "Router",
    "Routing",
    "experts_grouped",
    "experts_loop",
    "grouped_matmul",
    "row_tiles",
]

IMPLS = ("loop", "grouped", "triton")


@dataclass
class Routing:
    """What the last forward pass routed: ``logits [N, E]``, ``weights [N, k]``, ``experts
    [N, k]`` (dropped slots: ``E``) and ``keep [N, k]`` (``False`` where capacity dropped)."""

    logits: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor
    keep: torch.Tensor


class Router(nn.Module):
    """``logits = x W^T`` (``weight [E, d]``, computed in float32 or wider) and a selection
    bias ``e_score_correction_bias [E]`` (a buffer: :func:`~effarch.moe.update_bias` moves
    it, the optimiser does not)."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dt), self.weight.to(dt))


class Experts(nn.Module):
    """``E`` SwiGLU experts as two 3-D parameters (``transformers``' layout)."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        nn.init.normal_(self.gate_up_proj, std=d_model**-0.5)
        nn.init.normal_(self.down_proj, std=d_ff**-0.5)


def _check_assignments(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                       n_experts: int) -> None:  # fmt: skip
    """``experts [N, k]`` int32/int64 in ``0 .. E`` (``E``: a dropped slot, skipped) for the
    ``N`` rows of ``x``, and ``weights`` of the same shape; one read back to the host."""
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("experts", experts, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("weights", weights, floating=True)
    if experts.shape[0] != x.shape[0]:
        raise ValueError(
            f"experts must be [N, k] with N = {x.shape[0]} (the rows of x), "
            f"got {tuple(experts.shape)}"
        )
    if weights.shape != experts.shape:
        raise ValueError(
            f"weights must have the shape of experts {tuple(experts.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if experts.numel():
        low, high = torch.stack(experts.aminmax()).tolist()
        if low < 0 or high > n_experts:
            raise ValueError(
                f"experts must hold indices in 0 .. {n_experts} (E = {n_experts}: a dropped "
                f"slot), got values from {low} to {high}"
            )


def experts_loop(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``sum_j weights[n, j] expert_{experts[n, j]}(x_n)`` one expert at a time.

    ``x [N, d]``, ``experts``/``weights [N, k]`` (indices ``0 .. E``, ``E``: skipped; any
    other raises), ``gate_up [E, 2F, d]``, ``down [E, d, F]``; returns ``[N, d]``.
    """
    _check_assignments(x, experts, weights, gate_up.shape[0])
    n_experts = gate_up.shape[0]
    out = torch.zeros_like(x)
    for e in experts[experts < n_experts].unique().tolist():
        token, slot = torch.where(experts == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[token, slot, None].to(x.dtype)
        out.index_add_(0, token, y)  # in place: no copy of [N, d] per expert
    return out


def row_tiles(offs: torch.Tensor, n_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the grouped-GEMM kernel: one program per tile of ``block_m`` rows of one
    group, for groups ending at rows ``offs [G]`` (``grouped_mm``'s convention).

    Group ``g`` with ``n_g`` rows needs ``ceil(n_g / block_m)`` tiles, at most
    ``ceil(n_rows / block_m) + G`` in all; tile ``t`` finds its group by a binary search over
    the cumulative tile counts. Computed on the device, without reading ``offs`` back.

    Returns:
        ``(tile_group, tile_start)``, int32 ``[ceil(n_rows / block_m) + G]``: each tile's group
        and first row; ``-1`` for the slots past the last tile (their programs return).
    """
    ends = offs.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    n_max = (n_rows + block_m - 1) // block_m + offs.shape[0]
    t = torch.arange(n_max, device=offs.device)
    group = torch.searchsorted(cum, t, right=True)
    valid = group < offs.shape[0]
    g = group.clamp(max=offs.shape[0] - 1)
    start = starts[g] + (t - (cum[g] - tiles[g])) * block_m
    tile_group = torch.where(valid, g, -1).to(torch.int32)
    return tile_group.contiguous(), start.to(torch.int32).contiguous()


class _GroupedGemmKernel(torch.autograd.Function):
    BLOCK_M = 32

    @staticmethod
    def forward(ctx: Any, x, w, offs):  # type: ignore[override]
        from effarch_kernels.grouped_gemm import grouped_gemm_forward

        offs = offs.to(torch.int32).contiguous()
        tiles = row_tiles(offs, x.shape[0], _GroupedGemmKernel.BLOCK_M)
        ctx.save_for_backward(x, w, offs, *tiles)
        return grouped_gemm_forward(x, w, offs, *tiles, block_m=_GroupedGemmKernel.BLOCK_M)

    @staticmethod
    def backward(ctx: Any, dy):  # type: ignore[override]
        from effarch_kernels.grouped_gemm import grouped_gemm_backward

        x, w, offs, *tiles = ctx.saved_tensors
        dx, dw = grouped_gemm_backward(dy.contiguous(), x, w, offs, *tiles,
                                       block_m=_GroupedGemmKernel.BLOCK_M)  # fmt: skip
        return dx, dw, None


def grouped_matmul(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, backend: str = "torch"
) -> torch.Tensor:
    """Rows ``offs[e-1] .. offs[e]`` of ``x [M, K]`` times ``w[e] [K, N]``: ``[M, N]``.

    ``torch.nn.functional.grouped_mm(x, w, offs=offs)``'s semantics (rows past ``offs[-1]``
    give 0). ``backend``:

    - ``"torch"``: on a GPU ``grouped_mm`` itself (float32, bfloat16, float16; row strides
      of 16 bytes; operands made contiguous, since its backward fails on the stride-0
      gradients that ``expand`` produces). PyTorch runs its fused kernel for bfloat16 on
      Hopper and Blackwell; other dtypes and cards take its fallback, a loop of products
      over the groups that reads ``offs`` on the host. On a CPU, where ``grouped_mm`` is a
      loop of small products (several times slower than one batched product of the same
      shapes), and for float64: the rows are scattered into a zero-padded
      ``[E, max rows, K]`` block and multiplied by one ``bmm``, the padding costing
      ``E max_e(rows) - M`` wasted rows.
    - ``"triton"``: the Triton grouped-GEMM kernel, forward and backward (float32, float16,
      bfloat16; a ``ValueError`` says why when it cannot run here).
    - ``"auto"``: ``"torch"`` (on a GPU that is ``grouped_mm``, the vendor kernel).
    """
    if use_triton(backend, x, w) and backend == "triton":
        return _GroupedGemmKernel.apply(x, w, offs)
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], w.shape[2]))
    if x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and aligned:
        return F.grouped_mm(x.contiguous(), w.contiguous(), offs=offs)
    # bmm reads a transposed view of the weights as it is (no copy of every expert per call)
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    if x.shape[0] == 0 or int(counts.max()) == 0:
        return x.new_zeros(x.shape[0], w.shape[2])
    group = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    slot = torch.arange(int(ends[-1]), device=x.device) - (ends - counts)[group]
    padded = x.new_zeros(len(counts), int(counts.max()), x.shape[1])
    padded = padded.index_put((group, slot), x[: int(ends[-1])])
    out = torch.bmm(padded, w)[group, slot]
    if out.shape[0] < x.shape[0]:
        out = torch.cat([out, out.new_zeros(x.shape[0] - out.shape[0], out.shape[1])])
    return out


def experts_grouped(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
    down: torch.Tensor, *, backend: str = "torch",
) -> torch.Tensor:  # fmt: skip
    """:func:`experts_loop` as permute, two grouped products, un-permute.

    The ``N k`` assignments are sorted by expert (stably, so each expert's rows keep token
    order), ``offs[e]`` is the end row of expert ``e``, and ``grouped_mm`` multiplies each
    block of rows by its expert's matrix in one call. ``backend``: :func:`grouped_matmul`'s.
    ``experts`` and ``weights`` are checked as in :func:`experts_loop`.
    """
    _check_assignments(x, experts, weights, gate_up.shape[0])
    n_experts = gate_up.shape[0]
    k = experts.shape[1]
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]
    offs = counts.cumsum(0).to(torch.int32)
    rows = int(offs[-1])
    order = order[:rows]  # dropped slots (index E) sort last
    token = order // k
    xs = x[token]
    h = grouped_matmul(xs, gate_up.transpose(1, 2), offs, backend=backend)
    gate, up = h.chunk(2, dim=-1)
    y = grouped_matmul(F.silu(gate) * up, down.transpose(1, 2), offs, backend=backend)
    y = y * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, y)


def route_tokens(
    h: torch.Tensor, gate: Router, k: int, capacity_factor: float | None = None,
    route_kw: dict | None = None,
) -> Routing:  # fmt: skip
    """Route the rows ``h [N, d]``: ``gate``'s logits, :func:`~effarch.moe.route` with its
    selection bias and ``route_kw``, then the capacity over the ``N`` rows (if
    ``capacity_factor`` is set; dropped slots get the index ``E`` and weight 0)."""
    logits = gate(h)
    n_experts = logits.shape[-1]
    weights, experts = route(logits, k, bias=gate.e_score_correction_bias, **(route_kw or {}))
    keep = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor is not None:
        cap = expert_capacity(h.shape[0], n_experts, k, capacity_factor)
        experts, keep = apply_capacity(experts, n_experts, cap)
        weights = weights.masked_fill(~keep, 0.0)
    return Routing(logits, weights, experts, keep)


def add_shared(
    h: torch.Tensor, out: torch.Tensor, shared: nn.Module | None, gate: nn.Module | None
) -> torch.Tensor:
    """``out`` plus the shared experts' output on ``h``, times ``sigmoid(gate(h))`` when a
    gate is given (Qwen2-MoE); ``out`` itself without shared experts."""
    if shared is None:
        return out
    y = shared(h)
    return out + (y if gate is None else torch.sigmoid(gate(h)) * y)


class MoELayer(nn.Module):
    """A sparse mixture-of-experts SwiGLU feed-forward layer (module docstring).

    Args:
        d_model: model width ``d``.
        d_ff: each routed expert's hidden width (fine-grained experts: a fraction of the
            dense FFN's).
        n_experts: routed experts ``E``.
        k: experts per token.
        n_shared: shared experts, always applied, fused into one SwiGLU of width
            ``n_shared d_ff`` (DeepSeekMoE's ``n_shared_experts``).
        impl: ``"loop"``, ``"grouped"`` or ``"triton"`` (module docstring).
        score, renormalize, n_group, topk_group, scaling: the router, as
            :func:`~effarch.moe.route` (the selection bias is ``gate.e_score_correction_bias``).
        shared_gate: a sigmoid gate on the shared expert's output (Qwen2-MoE).
        capacity_factor: if set, each expert takes at most
            ``ceil(capacity_factor N k / E)`` assignments of the ``N`` tokens of a call, in the
            priority of :func:`~effarch.moe.apply_capacity`; the rest are dropped (their
            tokens get only the shared experts).

    ``forward(x [..., d]) -> [..., d]``; the routing of the last call is in ``self.routing``
    (a :class:`Routing`) for balance losses and metrics.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        k: int,
        *,
        n_shared: int = 0,
        impl: str = "loop",
        score: str = "softmax",
        renormalize: bool = True,
        n_group: int | None = None,
        topk_group: int | None = None,
        scaling: float = 1.0,
        shared_gate: bool = False,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("k", k)):
            check_positive_int(name, v)
        check_positive_int("n_shared", n_shared, allow_zero=True)
        if k > n_experts:
            raise ValueError(f"k must be at most n_experts={n_experts}, got {k}")
        self.impl = check_choice("impl", impl, IMPLS)
        check_choice("score", score, ("softmax", "sigmoid"))
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.d_model, self.d_ff, self.n_experts, self.k = d_model, d_ff, n_experts, k
        self.route_kw = dict(score=score, renormalize=renormalize, n_group=n_group,
                             topk_group=topk_group, scaling=scaling)  # fmt: skip
        self.capacity_factor = capacity_factor
        self.gate = Router(d_model, n_experts)
        self.experts = Experts(n_experts, d_model, d_ff)
        self.shared_experts = SwiGLU(d_model, n_shared * d_ff) if n_shared else None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., d_model={self.d_model}], got {got}")
        shape = x.shape
        h = x.reshape(-1, self.d_model)
        r = self.routing = route_tokens(h, self.gate, self.k, self.capacity_factor, self.route_kw)
        args = (h, r.experts, r.weights, self.experts.gate_up_proj, self.experts.down_proj)
        if self.impl == "loop":
            out = experts_loop(*args)
        else:
            out = experts_grouped(*args, backend="triton" if self.impl == "triton" else "torch")
        return add_shared(h, out, self.shared_experts, self.shared_expert_gate).view(shape)

    def active_parameters(self) -> int:
        """Parameters used per token: router, ``k`` routed experts, shared experts."""
        per_expert = 3 * self.d_model * self.d_ff
        shared = (
            sum(p.numel() for p in self.shared_experts.parameters()) if self.shared_experts else 0
        )
        gate = self.shared_expert_gate.weight.numel() if self.shared_expert_gate is not None else 0
        return self.gate.weight.numel() + self.k * per_expert + shared + gate
