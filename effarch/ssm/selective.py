"""Mamba's selective scan: a diagonal state space model whose parameters depend on the input.

For every channel ``d`` and state index ``n`` (Gu & Dao, 2023, Algorithm 2), with the
step size, input and output matrices ``delta_t``, ``B_t``, ``C_t`` computed from the input::

    dA_t[d, n]  = exp(delta_t[d] * A[d, n])              (zero-order hold on A)
    dBu_t[d, n] = delta_t[d] * B_t[n] * u_t[d]            (Euler step on B)
    x_t[d, n]   = dA_t[d, n] * x_{t-1}[d, n] + dBu_t[d, n]
    y_t[d]      = sum_n x_t[d, n] * C_t[n]  +  D[d] * u_t[d]
    y_t[d]     *= silu(z_t[d])                            (when a gate z is given)

Because ``A`` is diagonal, each ``(d, n)`` pair is an independent scalar linear
recurrence, so the whole layer is one :func:`effarch.scan.linear_recurrence` over
``[B, T, D, N]`` tensors (``mode="scan"``) or a loop over time (``mode="recurrent"``).
Mamba's CUDA kernel fuses the same computation so that the ``[B, T, D, N]`` state never
leaves on-chip memory; here it is materialised, which is what makes it readable. The Triton
kernel behind ``backend="triton"`` (:func:`effarch.ssm.scan_kernel.selective_scan_kernel`)
is the fused form: each program keeps its block of the state in registers and walks time.

Layout: sequence on dim 1, channels last (``[B, T, D]``). mamba_ssm's reference
``selective_scan_ref`` uses ``[B, D, T]``; transpose dims 1 and 2 to compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from effarch_kernels.limits import state_dim_reason
from einops import repeat

from .._checks import (
    check_bool,
    check_choice,
    check_initial_state,
    check_selective_scan_args,
)
from .._kernels import BACKENDS, use_triton
from ..scan import linear_recurrence
from .scan_kernel import launch_selective_scan

__all__ = ["BACKENDS", "MODES", "selective_scan"]

MODES = ("scan", "recurrent")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    mode: str = "scan",
    backend: str = "auto",
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective state space scan (S6), channels-last.

    Args:
        u: ``[B, T, D]`` input.
        delta: ``[B, T, D]`` step sizes (before ``delta_bias`` and softplus).
        A: ``[D, N]`` real state matrix, one diagonal per channel (negative for decay).
        B: ``[B, T, N]`` input matrix, or ``[B, T, G, N]`` with channel ``d`` using group
            ``d // (D / G)``; ``G`` must divide ``D``.
        C: ``[B, T, N]`` or ``[B, T, G, N]`` output matrix, grouped like ``B`` (its own ``G``).
        D: optional ``[D]`` skip connection, ``y += D * u``.
        z: optional ``[B, T, D]`` gate, ``y *= silu(z)``.
        delta_bias: optional ``[D]`` added to ``delta``.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.
        return_last_state: also return the state after the last step.
        mode: ``"scan"`` (parallel scan over time) or ``"recurrent"`` (loop), the two
            PyTorch forms.
        backend: ``"torch"`` (the form chosen by ``mode``), ``"triton"`` (the fused Triton
            kernel :func:`~effarch.ssm.scan_kernel.selective_scan_kernel`, whatever
            ``mode``; on a GPU, or on the CPU under ``TRITON_INTERPRET=1``; a ValueError
            says why when it cannot run) or ``"auto"`` (the kernel for CUDA tensors when it
            can run them, PyTorch otherwise): the rule of :mod:`effarch._kernels`. The
            kernel is forward only: it refuses inputs that require grad while grad mode is
            on, and it computes in float32, so float64 inputs stay on PyTorch. ``N`` must be
            at most 256 for the kernel.
        initial_state: optional ``[B, D, N]`` state ``x_{-1}`` the scan starts from (zero
            when omitted): the state a previous call returned, so that a sequence can be
            fed in pieces (a prefill in chunks, a cache). mamba_ssm's ``selective_scan_fn``
            has no such argument (its step function ``selective_state_update`` carries the
            state one token at a time); the Triton kernel takes it too.

    Returns:
        ``y`` ``[B, T, D]`` in the dtype of ``u``, and with ``return_last_state`` the
        state ``x_{T-1}`` ``[B, D, N]`` in float32 (float64 for float64 inputs). With the
        equations of the module docstring this is mamba_ssm's ``selective_scan_ref(u, delta,
        A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`` for real ``A`` and
        variable ``B``, ``C``, with every ``[B, D, T]`` tensor here ``[B, T, D]``.

    Memory is ``O(B T D N)``: the discretised ``dA`` and ``dBu`` are built in full.
    Inputs are computed in float32 at least, as the reference does.
    """
    Bg, Cg = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_choice("mode", mode, MODES)
    check_bool("delta_softplus", delta_softplus)
    check_bool("return_last_state", return_last_state)
    if initial_state is not None:
        check_initial_state(initial_state, u, A)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # The kernel computes in float32: it reads u, delta, A, B, C in half or single precision.
    if use_triton(
        backend, u, delta, A, B, C, limit=state_dim_reason(A.shape[1]), forward_only=inputs
    ):
        return launch_selective_scan(
            u, delta, A, Bg, Cg, D, z, delta_bias, bool(delta_softplus),
            bool(return_last_state), initial_state,
        )  # fmt: skip
    batch, length, dim = u.shape
    n_state = A.shape[1]

    compute = torch.promote_types(u.dtype, torch.float32)
    for t in (delta, A, B, C):
        compute = torch.promote_types(compute, t.dtype)
    uc, dt, Ac = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)
    if delta_softplus:
        dt = F.softplus(dt)
    # each channel reads its group's B_t and C_t: [B, T, G, N] -> [B, T, D, N]
    Bd = repeat(Bg.to(compute), "b t g n -> b t (g r) n", r=dim // Bg.shape[2])
    Cd = repeat(Cg.to(compute), "b t g n -> b t (g r) n", r=dim // Cg.shape[2])
    dA = torch.exp(dt.unsqueeze(-1) * Ac)  # [B, T, D, N]
    dBu = (dt * uc).unsqueeze(-1) * Bd  # [B, T, D, N]

    h0 = None if initial_state is None else initial_state.to(compute)
    if mode == "scan":
        states = linear_recurrence(dA, dBu, h0=h0)  # [B, T, D, N]
        y = (states * Cd).sum(-1)
        if length > 0:
            last = states[:, -1]
        else:
            last = dA.new_zeros(batch, dim, n_state) if h0 is None else h0.clone()
    else:
        x = (
            torch.zeros(batch, dim, n_state, dtype=compute, device=u.device)
            if h0 is None
            else h0.clone()
        )
        ys = []
        for t in range(length):
            x = dA[:, t] * x + dBu[:, t]
            ys.append((x * Cd[:, t]).sum(-1))
        y = torch.stack(ys, dim=1) if ys else uc.clone()
        last = x
    if D is not None:
        y = y + uc * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(u.dtype)
    if return_last_state:
        return y, last
    return y
