"""Mamba's selective scan: a diagonal state space model whose parameters depend on the input.

For every channel ``d`` and state index ``n`` (Gu & Dao, 2023, Algorithm 2), with the
step size, input and output matrices ``delta_t``, ``B_t``, ``C_t`` computed from the input:

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

from .._checks import check_choice, check_tensor
from .._kernels import KERNEL_DTYPES, grad_required, triton_unusable_reason
from ..scan import linear_recurrence

MODES = ("scan", "recurrent")
BACKENDS = ("auto", "torch", "triton")


def _check_device(names: tuple[str, ...], tensors: tuple[torch.Tensor | None, ...]) -> None:
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t is not None and t.device != first.device:
            raise ValueError(
                f"{name} must be on the device of {names[0]} ({first.device}), got {t.device}"
            )


def _grouped(
    name: str, x: torch.Tensor, batch: int, length: int, channels: int, what: str
) -> torch.Tensor:
    """Check ``[B, T, N]`` or ``[B, T, G, N]`` and return ``[B, T, G, N]``."""
    check_tensor(name, x, floating=True)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape [B, T, N] or [B, T, G, N], got {x.ndim} dimensions "
            f"(shape {tuple(x.shape)})"
        )
    if x.shape[0] != batch or x.shape[1] != length:
        raise ValueError(
            f"{name} must have batch and length [{batch}, {length}] in dims 0 and 1, "
            f"got shape {tuple(x.shape)}"
        )
    x = x if x.ndim == 4 else x.unsqueeze(2)
    groups = x.shape[2]
    if groups == 0 or channels % groups != 0:
        raise ValueError(
            f"the number of groups of {name} ({groups}) must divide the number of {what} "
            f"({channels}), got shape {tuple(x.shape)}"
        )
    return x


def _check_vector(name: str, x: torch.Tensor | None, size: int, what: str) -> None:
    if x is None:
        return
    check_tensor(name, x, ndim=1, floating=True)
    if x.shape[0] != size:
        raise ValueError(f"{name} must have shape [{what}] = [{size}], got {tuple(x.shape)}")


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the arguments of :func:`selective_scan`; return ``B`` and ``C`` as
    ``[B, T, G, N]`` (a group axis of size 1 added to ungrouped ones)."""
    check_tensor("u", u, ndim=3, floating=True)
    check_tensor("delta", delta, ndim=3, floating=True)
    check_tensor("A", A, ndim=2, floating=True)
    batch, length, dim = u.shape
    if delta.shape != u.shape:
        raise ValueError(
            f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}"
        )
    if A.shape[0] != dim:
        raise ValueError(
            f"A must have shape [D, N] with D = {dim} (channels of u), got {tuple(A.shape)}"
        )
    n_state = A.shape[1]
    Bg = _grouped("B", B, batch, length, dim, "channels")
    Cg = _grouped("C", C, batch, length, dim, "channels")
    for name, x in (("B", Bg), ("C", Cg)):
        if x.shape[3] != n_state:
            raise ValueError(
                f"{name} must have the state size N = {n_state} of A in its last dim, "
                f"got shape {tuple(x.shape)}"
            )
    _check_vector("D", D, dim, "D")
    _check_vector("delta_bias", delta_bias, dim, "D")
    if z is not None:
        check_tensor("z", z, ndim=3, floating=True)
        if z.shape != u.shape:
            raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    _check_device(
        ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
        (u, delta, A, B, C, D, z, delta_bias),
    )
    return Bg, Cg


def _kernel_unusable_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why the Triton scan kernel cannot take these inputs, or None when it can."""
    if grad_required(*tensors):
        return (
            "the kernel is forward only and an input requires grad (use backend='torch' to "
            "train, or torch.no_grad() for inference)"
        )
    u, delta, A, B, C = tensors[:5]
    if A.shape[1] == 0 or A.shape[1] > 256:
        return f"the kernel supports a state size N from 1 to 256, got {A.shape[1]}"
    # The computed dtype must be float32 (as for half and float32 inputs), not float64.
    for x in (u, delta, A, B, C):
        if x.dtype not in KERNEL_DTYPES:
            return triton_unusable_reason(x)
    return triton_unusable_reason(u)


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
            can run them, PyTorch otherwise). The kernel is forward only: it refuses inputs
            that require grad while grad mode is on, and it computes in float32, so float64
            inputs stay on PyTorch. ``N`` must be at most 256 for the kernel.

    Returns:
        ``y`` ``[B, T, D]`` in the dtype of ``u``, and with ``return_last_state`` the
        state ``x_{T-1}`` ``[B, D, N]`` in float32 (float64 for float64 inputs). With the
        equations of the module docstring this is mamba_ssm's ``selective_scan_ref(u, delta,
        A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`` for real ``A`` and
        variable ``B``, ``C``, with every ``[B, D, T]`` tensor here ``[B, T, D]``.

    Memory is ``O(B T D N)``: the discretised ``dA`` and ``dBu`` are built in full.
    Inputs are computed in float32 at least, as the reference does.
    """
    Bg, Cg = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    check_choice("mode", mode, MODES)
    check_choice("backend", backend, BACKENDS)
    if backend == "triton" or (backend == "auto" and u.device.type == "cuda"):
        reason = _kernel_unusable_reason(u, delta, A, B, C, D, z, delta_bias)
        if reason is None:
            from .scan_kernel import selective_scan_kernel

            return selective_scan_kernel(
                u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state)
            )
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run: {reason}")
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
    Bd = Bg.to(compute).repeat_interleave(dim // Bg.shape[2], dim=2)
    Cd = Cg.to(compute).repeat_interleave(dim // Cg.shape[2], dim=2)
    dA = torch.exp(dt.unsqueeze(-1) * Ac)  # [B, T, D, N]
    dBu = (dt * uc).unsqueeze(-1) * Bd  # [B, T, D, N]

    if mode == "scan":
        states = linear_recurrence(dA, dBu)  # [B, T, D, N]
        y = (states * Cd).sum(-1)
        last = states[:, -1] if length > 0 else dA.new_zeros(batch, dim, n_state)
    else:
        x = torch.zeros(batch, dim, n_state, dtype=compute, device=u.device)
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
