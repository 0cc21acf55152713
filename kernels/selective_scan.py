"""Mamba's selective scan (S6), forward pass, as one fused recurrent kernel.

Channels-last layout as in ``effarch.ssm.selective_scan``: ``u, delta, z [B, T, D]``,
``A [D, N]``, ``B, C [B, T, G, N]`` (channel ``d`` reads group ``d // (D / G)``; ``G = 1``
is the ungrouped case), ``D, delta_bias [D]``. For every channel ``d`` and state index ``n``::

    dt_t[d]    = softplus(delta_t[d] + delta_bias[d])      (bias and softplus optional)
    h_t[d, n]  = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]     = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]
    y_t[d]    *= silu(z_t[d])                               (when a gate z is given)

``A`` is diagonal, so every ``(d, n)`` pair is an independent scalar recurrence. One program
owns a block of ``BLOCK_D`` channels of one batch element and walks the sequence, keeping
its ``h [BLOCK_D, N]`` in registers: the ``[B, T, D, N]`` tensors of the discretised
``exp(dt A)`` and ``dt B u``, which the PyTorch form materialises, never exist here. Per
step it reads ``O(BLOCK_D + N)`` inputs and writes ``BLOCK_D`` outputs; an optional initial
state ``h_{-1} [B, D, N]`` (a chunked prefill, a cache) is loaded once. Forward only;
everything is computed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP_FUSION, check_interpreter_state, contiguous, interpreter_cast, interpreting
from .limits import MAX_STATE_DIM, check, state_dim_reason

__all__ = ["MAX_STATE_DIM", "selective_scan_fwd"]


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` as torch computes it (``x`` itself above 20); below -15 it is
    ``exp(x)`` to float32 accuracy, where ``1 + exp(x)`` would round to 1."""
    mid = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), mid))


@triton.jit
def _selective_scan_kernel(
    Up, DELTA, Ap, Bp, Cp, Dp, Zp, BIAS, H0, Y, HT,
    seq_len, dim, n_state, groups_b, groups_c, per_group_b, per_group_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_HT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Addresses: the batch and step terms in int64 (row * dim passes 2^31 once a [B, T, D]
    # tensor has more than 2^31 elements), offsets inside a block int32.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < dim
    dn_mask = d_ok[:, None] & (offs_n < n_state)[None, :]
    # Per-channel constants, loaded once. Masked channels and state indices read 0 and so
    # keep h = 0 (their B is 0); they are never stored.
    a = tl.load(Ap + offs_d[:, None] * n_state + offs_n[None, :], mask=dn_mask, other=0.0)
    a = a.to(tl.float32)
    if HAS_D:
        d_skip = tl.load(Dp + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    # Which row of the grouped B and C each channel reads.
    grp_b = offs_d // per_group_b
    grp_c = offs_d // per_group_c

    if HAS_H0:  # the state a previous call ended with
        h = tl.load(H0 + b * dim * n_state + offs_d[:, None] * n_state + offs_n[None, :],
                    mask=dn_mask, other=0.0).to(tl.float32)  # fmt: skip
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for t in range(0, seq_len):
        row = b * seq_len + t  # index of step t in the [B, T] grid (int64, as b is)
        u = tl.load(Up + row * dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        dt = tl.load(DELTA + row * dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = _softplus(dt)
        b_t = tl.load(Bp + row * groups_b * n_state + grp_b[:, None] * n_state + offs_n[None, :],
                      mask=dn_mask, other=0.0).to(tl.float32)  # fmt: skip
        c_t = tl.load(Cp + row * groups_c * n_state + grp_c[:, None] * n_state + offs_n[None, :],
                      mask=dn_mask, other=0.0).to(tl.float32)  # fmt: skip
        # h = exp(dt A) h + dt B u    (zero-order hold on A, Euler step on B)
        h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * b_t
        # y = C h + D u, then the gate y *= silu(z) = z sigmoid(z)
        y = tl.sum(h * c_t, axis=1)
        if HAS_D:
            y += d_skip * u
        if HAS_Z:
            z = tl.load(Zp + row * dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + row * dim + offs_d, y.to(Y.dtype.element_ty), mask=d_ok)

    if STORE_HT:
        tl.store(HT + b * dim * n_state + offs_d[:, None] * n_state + offs_n[None, :], h,
                 mask=dn_mask)  # fmt: skip


def _block_d(dim: int, block_n: int) -> int:
    """Channels per program: the interpreter prefers few large programs; on a GPU, blocks
    small enough to spread ``B * D`` channels over many programs with ``h`` in registers."""
    if interpreting():
        return min(triton.next_power_of_2(dim), 256)
    return max(1, min(triton.next_power_of_2(dim), 32, 4096 // block_n))


def selective_scan_fwd(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: ``y [B, T, D]`` (dtype of ``u``) and the float32 last state
    ``[B, D, N]`` (or None). ``B``, ``C`` are ``[B, T, G, N]`` with ``G`` dividing ``D``;
    ``N <= MAX_STATE_DIM``; the optional ``initial_state [B, D, N]`` is the state before
    the first step (zero when None). Shapes are checked by the caller.

    The kernel loads any floating dtype and computes in float32; the small per-channel
    tensors ``A``, ``D`` and ``delta_bias`` are read from float32 copies."""
    check_interpreter_state()
    dtype = u.dtype
    batch, length, dim = u.shape
    n_state = A.shape[1]
    check(state_dim_reason(n_state))
    A, D, delta_bias, h0 = (
        x.float() if x is not None else None for x in (A, D, delta_bias, initial_state)
    )
    u, delta, A, B, C, D, z, delta_bias, h0 = contiguous(
        *interpreter_cast(u, delta, A, B, C, D, z, delta_bias, h0)
    )
    y = torch.empty_like(u)
    ht = torch.empty(batch, dim, n_state, device=u.device, dtype=torch.float32)
    block_n = triton.next_power_of_2(n_state)
    block_d = _block_d(dim, block_n)
    groups_b, groups_c = B.shape[2], C.shape[2]
    dummy = u  # a valid pointer for the arguments a variant does not read
    _selective_scan_kernel[(triton.cdiv(dim, block_d), batch)](
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy, y, ht,
        length, dim, n_state, groups_b, groups_c, dim // groups_b, dim // groups_c,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=h0 is not None,
        SOFTPLUS=delta_softplus, STORE_HT=return_last_state,
        BLOCK_D=block_d, BLOCK_N=block_n, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return y.to(dtype), (ht if return_last_state else None)
