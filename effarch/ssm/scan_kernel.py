"""selective_scan_kernel: Mamba's selective scan as a fused Triton kernel, forward only.

The kernel lives in ``effarch_kernels.selective_scan`` and is imported lazily, the first
time it runs, so ``effarch`` imports without Triton or a GPU; its limit on the state size
``N`` comes from ``effarch_kernels.limits``. The public :func:`selective_scan_kernel` checks
its arguments and calls :func:`launch_selective_scan`, which
:func:`~effarch.ssm.selective_scan` calls directly on the arguments it checked.
"""

from __future__ import annotations

import torch
from effarch_kernels.limits import state_dim_reason

from .._checks import check_bool, check_initial_state, check_selective_scan_args
from .._kernels import grad_required, require_triton

__all__ = ["launch_selective_scan", "selective_scan_kernel"]


def launch_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_kernel` on arguments already checked (``B``, ``C`` grouped
    ``[B, T, G, N]``), on tensors the kernel can run, outside autograd: the kernel call."""
    from effarch_kernels.selective_scan import selective_scan_fwd

    y, last = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
    )
    return (y, last) if return_last_state else y


def selective_scan_kernel(
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
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Mamba's selective scan (S6) by the fused Triton kernel, forward only.

    The same function as :func:`~effarch.ssm.selective_scan` (same arguments, without
    ``mode``): for every channel ``d`` and state index ``n``::

        dt_t[d]   = softplus(delta_t[d] + delta_bias[d])       (bias and softplus optional)
        h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
        y_t[d]    = (sum_n C_t[n] h_t[d, n] + D[d] u_t[d]) * silu(z_t[d])

    One program per (block of channels, batch element) keeps its ``h [channels, N]`` in
    registers and walks the sequence (``effarch_kernels.selective_scan``), so none of the
    ``[B, T, D, N]`` tensors that the PyTorch form builds is ever stored.

    Args:
        u: ``[B, T, D]`` input.
        delta: ``[B, T, D]`` step sizes (before ``delta_bias`` and softplus).
        A: ``[D, N]`` with ``1 <= N <= 256``.
        B, C: ``[B, T, N]`` or grouped ``[B, T, G, N]`` (``G`` divides ``D``; channel ``d``
            reads group ``d // (D / G)``).
        D: optional ``[D]`` skip, ``y += D * u``.
        z: optional ``[B, T, D]`` gate, ``y *= silu(z)``.
        delta_bias: optional ``[D]`` added to ``delta``.
        delta_softplus: apply softplus to ``delta (+ delta_bias)``.
        return_last_state: also return the float32 state after the last step.
        initial_state: optional ``[B, D, N]`` state before the first step (zero when
            omitted), read in float32.

    Returns:
        ``y [B, T, D]`` in the dtype of ``u``, and with ``return_last_state`` the state
        ``[B, D, N]`` in float32. The computation is float32 whatever the input dtypes
        (float16, bfloat16 or float32; float64 is refused).

    Raises:
        ValueError: on bad shapes, ``N`` out of range, an input that requires grad while
            grad mode is on (there is no backward kernel: use ``selective_scan(...,
            backend="torch")`` to train), float64 inputs, or when the kernel cannot run here
            (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``).
        TypeError: on non-tensors, non-floating tensors or non-bool flags.

    mamba_ssm: ``selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
    return_last_state)`` for real ``A``, with every ``[B, D, T]`` tensor there ``[B, T, D]``
    here.
    """
    Bg, Cg = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_bool("delta_softplus", delta_softplus)
    check_bool("return_last_state", return_last_state)
    if grad_required(u, delta, A, B, C, D, z, delta_bias, initial_state):
        raise ValueError(
            "selective_scan_kernel cannot run: the kernel is forward only and an input "
            "requires grad (use selective_scan(..., backend='torch') to train, or "
            "torch.no_grad() for inference)"
        )
    if (reason := state_dim_reason(A.shape[1])) is not None:
        raise ValueError(f"selective_scan_kernel cannot run: {reason}")
    if initial_state is not None:
        check_initial_state(initial_state, u, A)
    require_triton("selective_scan_kernel", u, delta, A, B, C)
    return launch_selective_scan(
        u, delta, A, Bg, Cg, D, z, delta_bias, delta_softplus, return_last_state, initial_state
    )
