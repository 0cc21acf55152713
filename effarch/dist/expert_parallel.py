r"""Expert parallelism on ``torch.distributed`` (chapter 5, scaling out).

When the experts no longer fit on one device they are sharded: with ``P`` ranks, rank ``r``
holds experts ``r E/P .. (r+1) E/P - 1`` and a replica of the router (and of any shared
expert); each rank routes its own tokens. One MoE layer is then

1. **route** locally: ``(weights, experts) = route(gate(x))``, capacity applied per rank;
2. **dispatch**: sort the ``N k`` assignments by expert, so those for rank ``r`` are
   contiguous; exchange the counts, then the token rows, then their expert ids (three
   ``all_to_all`` calls);
3. **compute** the received rows with the local experts (the grouped path of 5.2);
4. **combine**: the reverse ``all_to_all`` of the rows returns the outputs to the ranks
   that own the tokens, which weight them and add them into their tokens.

Both exchanges are ``dist.all_to_all_single`` inside an autograd function whose backward is
the reverse exchange, so the same code trains. Bytes moved
per token and layer: ``2 k d`` numbers out and back (minus the assignments that stay local),
plus one expert id per row sent. The code is written for gloo (CPU) and NCCL (GPU) alike;
the tests run it on gloo.

DeepSpeed's ``deepspeed.moe.layer.MoE`` is the engine to compare with: its ``ep_size`` is the
world size here, ``k`` is ``k``, ``capacity_factor`` / ``eval_capacity_factor`` are
``capacity_factor``, ``drop_tokens=False`` is ``capacity_factor=None``; its gate is a softmax,
top-1 or top-2 and, since its ``topkgating`` (2024), any ``k`` (ours: any
:func:`~effarch.moe.route` setting). DeepSpeed dispatches a dense capacity-padded
``[E, C, d]`` tensor with equal-size exchanges, padding included; here each rank sends
variable-size pieces, only the rows it has.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..moe import MoELayer, add_shared, experts_grouped, route_tokens
from .launch import process_group

__all__ = ["ExpertParallelMoE", "check_expert_parallel", "dispatch_bytes", "time_expert_parallel"]


def dispatch_bytes(k: int, d_model: int, world: int, bytes_per: int = 2) -> float:
    """Expected bytes one token's rows move between ranks per MoE layer, out in the
    dispatch and back in the combine: ``2 k d bytes_per (P - 1) / P`` (each of its ``k``
    rows leaves the rank unless its expert is local, probability ``1 / P`` under balanced
    routing)."""
    return 2 * k * d_model * bytes_per * (world - 1) / world


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with ``send[r]`` rows to rank ``r`` and ``recv[r]`` from it;
    the gradient makes the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.send, ctx.recv = send, recv
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv)
        return out, None, None


class ExpertParallelMoE(nn.Module):
    """The experts of ``layer`` sharded over the default process group (module docstring).

    Built from a full :class:`~effarch.moe.MoELayer` (the same on every rank, for example from
    the same seed): rank ``r`` keeps its ``E / P`` experts as ``local_gate_up`` and
    ``local_down`` and shares ``layer``'s router and shared experts; routing and the shared
    experts go through the same functions as the layer's own forward
    (:func:`~effarch.moe.route_tokens`, :func:`~effarch.moe.add_shared`). ``forward(x [..., d])``
    returns this rank's tokens' outputs, equal to ``layer(x)`` when every rank's capacity
    group is its own tokens.
    """

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be an effarch.moe.MoELayer, got {type(layer).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed.init_process_group")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        e = layer.n_experts
        if e % self.world:
            raise ValueError(f"n_experts={e} must be a multiple of the world size {self.world}")
        self.n_experts, self.k, self.per_rank = e, layer.k, e // self.world
        lo = self.rank * self.per_rank
        # replicated on every rank: the router and the shared experts (the same modules)
        self.gate, self.shared_experts = layer.gate, layer.shared_experts
        self.shared_expert_gate = layer.shared_expert_gate
        self.route_kw, self.capacity_factor = layer.route_kw, layer.capacity_factor
        self.local_gate_up = nn.Parameter(
            layer.experts.gate_up_proj.detach()[lo : lo + self.per_rank].clone()
        )
        self.local_down = nn.Parameter(
            layer.experts.down_proj.detach()[lo : lo + self.per_rank].clone()
        )
        # bytes of this rank's own token rows that crossed to other ranks and back in the
        # last forward: out in the dispatch, back in the combine (where the rank sends the
        # rows it received instead); counted from the send counts, expert ids and counts
        # left out
        self.bytes_sent = 0
        # seconds spent in each phase, summed over forward calls (reset by assigning {})
        self.seconds: dict[str, float] = {}

    def _tick(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - start
        return now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, d = x.shape, x.shape[-1]
        t0 = time.perf_counter()
        h = x.reshape(-1, d)
        # capacity counts this rank's tokens only
        r = route_tokens(h, self.gate, self.k, self.capacity_factor, self.route_kw)
        weights, experts = r.weights, r.experts
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        order = order[flat[order] < self.n_experts]  # dropped slots stay home
        dest = flat[order] // self.per_rank
        send = torch.bincount(dest, minlength=self.world)
        t0 = self._tick("route", t0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)  # how many rows each rank will send here
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = _AllToAll.apply(h[order // self.k], send_l, recv_l)  # dispatch
        local_e = _AllToAll.apply(flat[order][:, None], send_l, recv_l)[:, 0]
        local_e = local_e - self.rank * self.per_rank
        t0 = self._tick("dispatch", t0)
        ones = torch.ones(len(local_e), 1, dtype=weights.dtype, device=h.device)
        y = experts_grouped(rows, local_e[:, None], ones, self.local_gate_up, self.local_down)
        t0 = self._tick("experts", t0)
        back = _AllToAll.apply(y, recv_l, send_l)  # combine: to the ranks that own the tokens
        t0 = self._tick("combine", t0)
        w = weights.flatten()[order, None].to(h.dtype)
        out = torch.zeros_like(h).index_add(0, order // self.k, back * w)
        stay = send_l[self.rank]  # own rows kept home; the others go out and come back
        self.bytes_sent = 2 * (sum(send_l) - stay) * d * h.element_size()
        out = add_shared(h, out, self.shared_experts, self.shared_expert_gate)
        self._tick("route", t0)  # un-permute and shared experts: local work, with routing
        return out.view(shape)


def time_expert_parallel(
    rank: int, world: int, port: int, out_dir: str, config: dict[str, Any]
) -> None:
    """Worker for ``torch.multiprocessing.spawn``: time ``config["repeats"]`` forward passes
    of an expert-parallel MoE layer (float32, one thread per rank) and save to
    ``out_dir/time{rank}.pt`` this rank's seconds per phase and the bytes its own token rows
    moved to other ranks and back (``ExpertParallelMoE.bytes_sent``).
    Every rank builds the same layer from ``config["seed"]`` and draws its own
    ``config["tokens"]`` tokens (rank ``r`` takes row ``r`` of one seeded draw), so the ranks
    route different tokens."""
    with process_group(rank, world, port):
        torch.manual_seed(config["seed"])
        layer = MoELayer(config["d_model"], config["d_ff"], config["n_experts"], config["k"])
        ep = ExpertParallelMoE(layer)
        x = torch.randn(world, config["tokens"], config["d_model"])[rank]  # this rank's tokens
        with torch.no_grad():
            ep(x)  # warm up
            ep.seconds = {}
            for _ in range(config["repeats"]):
                ep(x)
        result = {k: v / config["repeats"] for k, v in ep.seconds.items()}
        torch.save(
            {"seconds": result, "bytes": ep.bytes_sent}, os.path.join(out_dir, f"time{rank}.pt")
        )


def _shared_grad(layer: nn.Module) -> torch.Tensor | None:
    """The gradients of a layer's shared experts (and shared gate), flattened into one
    vector; ``None`` without shared experts."""
    mods = [m for m in (layer.shared_experts, layer.shared_expert_gate) if m is not None]
    if not mods:
        return None
    return torch.cat([p.grad.flatten() for m in mods for p in m.parameters()])


def check_expert_parallel(
    rank: int, world: int, port: int, out_dir: str, config: dict[str, Any]
) -> None:
    """Worker for ``torch.multiprocessing.spawn``: run one MoE layer expert-parallel on gloo
    and save this rank's output and gradients (and, on rank 0, the single-process reference)
    to ``out_dir``: ``y``, ``dx``, the local experts' ``dgate_up`` and ``ddown``, and the
    replicated parts' ``dgate`` (router) and ``dshared`` (shared experts flattened, ``None``
    without them), whose sums over the ranks equal the reference's. Lives in the package
    because spawned processes import it by name."""
    with process_group(rank, world, port):
        torch.manual_seed(config["seed"])
        kw = {k: config[k] for k in ("n_shared", "capacity_factor") if k in config}
        layer = MoELayer(
            config["d_model"], config["d_ff"], config["n_experts"], config["k"], **kw
        ).double()
        x = torch.randn(world, config["tokens"], config["d_model"], dtype=torch.float64)
        ep = ExpertParallelMoE(layer)
        mine = x[rank].clone().requires_grad_()
        y = ep(mine)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
        torch.save({"y": y.detach(), "dx": mine.grad, "dgate_up": ep.local_gate_up.grad,
                    "ddown": ep.local_down.grad, "dgate": layer.gate.weight.grad,
                    "dshared": _shared_grad(layer), "bytes": ep.bytes_sent},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
        if rank == 0:  # the reference: one process, every expert, capacity per rank's tokens
            ref = MoELayer(
                config["d_model"], config["d_ff"], config["n_experts"], config["k"], **kw
            ).double()
            ref.load_state_dict(layer.state_dict())
            xs = x.clone().requires_grad_()
            outs = [ref(xs[r]) for r in range(world)]
            sum(
                (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in outs
            ).backward()
            saved = {
                "y": torch.stack([o.detach() for o in outs]),
                "dx": xs.grad,
                "dgate_up": ref.experts.gate_up_proj.grad,
                "ddown": ref.experts.down_proj.grad,
                "dgate": ref.gate.weight.grad,
                "dshared": _shared_grad(ref),
            }
            torch.save(saved, os.path.join(out_dir, "reference.pt"))
