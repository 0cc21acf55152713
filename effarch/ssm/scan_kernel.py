"""selective_scan_kernel: Mamba's selective scan as a fused Triton kernel, forward only.

The kernel lives in ``effarch_kernels.selective_scan`` and is imported lazily, the first
time this function runs, so ``effarch`` imports without Triton or a GPU.
"""

from __future__ import annotations

import torch

from .._kernels import KERNEL_DTYPES
from .selective import _check_inputs, _kernel_unusable_reason


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
    Bg, Cg = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    flags = (("delta_softplus", delta_softplus), ("return_last_state", return_last_state))
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} ({flag!r})")
    reason = _kernel_unusable_reason(u, delta, A, B, C, D, z, delta_bias)
    if reason is not None:
        raise ValueError(f"selective_scan_kernel cannot run: {reason}")
    from effarch_kernels.selective_scan import selective_scan_fwd

    dtype = u.dtype
    on_cpu = u.device.type == "cpu"

    def ready(x: torch.Tensor | None, small: bool = False) -> torch.Tensor | None:
        """A copy the kernel reads: float32 for the small per-channel tensors and wherever
        the dtype is unsupported (the interpreter's bfloat16 is broken)."""
        if x is None:
            return None
        if small or x.dtype not in KERNEL_DTYPES or (on_cpu and x.dtype == torch.bfloat16):
            return x.float()
        return x

    y, last = selective_scan_fwd(
        ready(u), ready(delta), ready(A, small=True), ready(Bg), ready(Cg),
        ready(D, small=True), ready(z), ready(delta_bias, small=True),
        delta_softplus, return_last_state,
    )  # fmt: skip
    y = y.to(dtype)
    if return_last_state:
        return y, last
    return y
