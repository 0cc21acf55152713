"""Mamba-2's state space duality (SSD): a scalar-decay SSM computed in chunks with matmuls.

Per head ``h`` the state ``H_t`` is a ``[P, N]`` matrix (head dim by state size) and the
transition is a scalar times the identity (Dao & Gu, 2024):

    H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T,        y_t = H_t C_t.

Unrolled, ``y = M x`` with the lower-triangular ``T x T`` matrix

    M[i, j] = L[i, j] * (C_i . B_j) * dt_j,    L[i, j] = exp(sum_{j < s <= i} dt_s A)

for ``j <= i``: masked attention with the 1-semiseparable decay mask ``L`` in place of the
softmax, which is the "duality". Every block of ``M`` below the diagonal has rank at most
``N``, which the chunked algorithm exploits. With chunks of ``Q`` steps:

1. inside each chunk, the quadratic masked form ``(L o C B^T) (dt x)``, a ``Q x Q`` matmul;
2. each chunk's own contribution to the state at its end, ``sum_j L[end, j] dt_j x_j B_j^T``;
3. a linear recurrence over chunks carries states from chunk to chunk (here
   :func:`effarch.scan.linear_recurrence`, since the chunk decay is again a scalar);
4. each position reads the state entering its chunk, decayed to it: ``exp(cumsum) C_i``.

Steps 1, 2 and 4 are batched matmuls; only step 3 is sequential, and over ``T / Q``
chunks instead of ``T`` steps. This is the algorithm of Mamba-2's
``mamba_chunk_scan_combined``, written with einsums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .._checks import check_bool, check_grouped, check_positive_int, check_same, check_tensor
from ..scan import linear_recurrence, segsum

__all__ = ["segsum", "ssd", "ssd_matrix", "ssd_recurrent"]


def _prepare(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    initial_states: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Validate SSD inputs; return x, dt, A, B, C (heads expanded) in the compute dtype."""
    check_bool("dt_softplus", dt_softplus)
    check_tensor("x", x, ndim=4, floating=True)
    check_tensor("dt", dt, ndim=3, floating=True)
    check_tensor("A", A, ndim=1, floating=True)
    batch, length, heads, p = x.shape
    if length < 1:
        raise ValueError(f"x must have at least one time step, got shape {tuple(x.shape)}")
    if tuple(dt.shape) != (batch, length, heads):
        raise ValueError(
            f"dt must have shape [B, T, H] = {(batch, length, heads)}, got {tuple(dt.shape)}"
        )
    if A.shape[0] != heads:
        raise ValueError(f"A must have shape [H] = [{heads}], got {tuple(A.shape)}")
    Bg = check_grouped("B", B, batch, length, heads, "heads")
    Cg = check_grouped("C", C, batch, length, heads, "heads")
    n = Bg.shape[3]
    if Cg.shape[3] != n:
        raise ValueError(
            f"C must have the state size N = {n} of B in its last dim, got shape {tuple(C.shape)}"
        )
    if D is not None:
        check_tensor("D", D, floating=True)
        if tuple(D.shape) not in ((heads,), (heads, p)):
            raise ValueError(f"D must have shape [H] = [{heads}] or [H, P], got {tuple(D.shape)}")
    if z is not None:
        check_tensor("z", z, ndim=4, floating=True)
        if z.shape != x.shape:
            raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, ndim=1, floating=True)
        if dt_bias.shape[0] != heads:
            raise ValueError(f"dt_bias must have shape [H] = [{heads}], got {tuple(dt_bias.shape)}")
    if initial_states is not None:
        check_tensor("initial_states", initial_states, ndim=4, floating=True)
        if tuple(initial_states.shape) != (batch, heads, p, n):
            raise ValueError(
                f"initial_states must have shape [B, H, P, N] = {(batch, heads, p, n)}, "
                f"got {tuple(initial_states.shape)}"
            )
    check_same(
        ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"),
        (x, dt, A, B, C, D, z, dt_bias, initial_states),
        dtype=False,
    )
    compute = torch.promote_types(x.dtype, torch.float32)
    for t in (dt, A, B, C):
        compute = torch.promote_types(compute, t.dtype)
    dtc = dt.to(compute)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(compute)
    if dt_softplus:
        dtc = F.softplus(dtc)
    # each head reads its group's B_t and C_t: [B, T, G, N] -> [B, T, H, N]
    Bh = repeat(Bg.to(compute), "b t g n -> b t (g r) n", r=heads // Bg.shape[2])
    Ch = repeat(Cg.to(compute), "b t g n -> b t (g r) n", r=heads // Cg.shape[2])
    return x.to(compute), dtc, A.to(compute), Bh, Ch


def _finish(
    y: torch.Tensor,
    x: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = (y + D x) * silu(z)``, as Mamba-2 applies them, cast to the output dtype."""
    if D is not None:
        d = D.to(y.dtype)
        y = y + x * (d[:, None] if d.ndim == 1 else d)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm of Mamba-2.

    Args:
        x: ``[B, T, H, P]`` inputs (``H`` heads of dim ``P``).
        dt: ``[B, T, H]`` step sizes (before ``dt_bias`` and softplus).
        A: ``[H]`` one scalar per head, negative for decay.
        B: ``[B, T, G, N]`` input matrix; head ``h`` uses group ``h // (H / G)`` and ``G``
            must divide ``H`` (``[B, T, N]`` is read as ``G = 1``).
        C: ``[B, T, G, N]`` output matrix, grouped the same way.
        chunk_size: ``Q``, steps per chunk; ``T`` need not be a multiple of it.
        D: optional ``[H]`` (or ``[H, P]``) skip, ``y += D x``.
        z: optional ``[B, T, H, P]`` gate applied after the skip, ``y *= silu(z)``.
        dt_bias: optional ``[H]`` added to ``dt``.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        initial_states: optional ``[B, H, P, N]`` state before the first step.
        return_final_states: also return the state after the last step.

    Returns:
        ``y`` ``[B, T, H, P]`` in the dtype of ``x`` and, with ``return_final_states``, the
        final state ``[B, H, P, N]`` in float32 (float64 for float64 inputs). This is the
        contract of ``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z,
        dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
        return_final_states=return_final_states)`` (without ``seq_idx``/``dt_limit``).

    The state recurrence is ``H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T`` and the output
    ``y_t = H_t C_t`` (see :func:`ssd_recurrent`, the loop it is checked against). Cost:
    ``O(T Q (N + P))`` for the chunk-diagonal blocks, ``O(T N P)`` for the states; memory
    ``O(B H T Q)`` for the decay masks. The sequence is padded to a multiple of ``Q`` with
    ``dt = 0`` steps, which leave the state unchanged.
    """
    check_positive_int("chunk_size", chunk_size)
    xc, dtc, Ac, Bh, Ch = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states)
    check_bool("return_final_states", return_final_states)
    batch, length, heads, p = x.shape
    q = chunk_size
    chunks = math.ceil(length / q)
    pad = chunks * q - length
    if pad:  # zero dt: decay exp(0) = 1 and no input, so padded steps change nothing
        xc_p = F.pad(xc, (0, 0, 0, 0, 0, pad))
        dt_p = F.pad(dtc, (0, 0, 0, pad))
        B_p = F.pad(Bh, (0, 0, 0, 0, 0, pad))
        C_p = F.pad(Ch, (0, 0, 0, 0, 0, pad))
    else:
        xc_p, dt_p, B_p, C_p = xc, dtc, Bh, Ch
    # split the time axis into [chunks, Q]
    xs = rearrange(xc_p, "b (c q) h p -> b c q h p", q=q)
    dts = rearrange(dt_p, "b (c q) h -> b c q h", q=q)
    Bs = rearrange(B_p, "b (c q) h n -> b c q h n", q=q)
    Cs = rearrange(C_p, "b (c q) h n -> b c q h n", q=q)
    log_decay = rearrange(dts * Ac, "b c q h -> b c h q")  # dt_s A per step
    seg = segsum(log_decay)  # [B, c, H, Q, Q]
    L = torch.exp(seg)
    xdt = xs * dts.unsqueeze(-1)  # dt_j x_j

    # 1. within chunks: y_i = sum_{j <= i} L[i, j] (C_i . B_j) dt_j x_j
    scores = torch.einsum("bcihn,bcjhn->bchij", Cs, Bs) * L
    y_diag = torch.einsum("bchij,bcjhp->bcihp", scores, xdt)

    # 2. each chunk's contribution to the state at its last step
    to_end = L[..., -1, :]  # [B, c, H, Q]: decay from step j to the chunk's end
    local = torch.einsum("bchj,bcjhp,bcjhn->bchpn", to_end, xdt, Bs)

    # 3. carry states across chunks: S_c = exp(sum of chunk c's log decays) S_{c-1} + local_c
    chunk_decay = torch.exp(log_decay.sum(-1))  # [B, c, H]
    h0 = None if initial_states is None else initial_states.to(xc.dtype)
    ends = linear_recurrence(chunk_decay[..., None, None].expand_as(local), local, h0)
    start = torch.zeros_like(local[:, 0]) if h0 is None else h0
    entering = torch.cat([start.unsqueeze(1), ends[:, :-1]], dim=1)  # [B, c, H, P, N]

    # 4. each step reads the state that entered its chunk, decayed to it
    from_start = torch.exp(log_decay.cumsum(-1))  # [B, c, H, Q]
    y_off = torch.einsum("bcihn,bchpn,bchi->bcihp", Cs, entering, from_start)

    y = rearrange(y_diag + y_off, "b c q h p -> b (c q) h p")[:, :length]
    out = _finish(y, xc, D, z, x.dtype)
    if return_final_states:
        return out, ends[:, -1]
    return out


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD as a step-by-step recurrence: the reference for :func:`ssd`.

    Same arguments and results as :func:`ssd` (without ``chunk_size``). For ``t = 0..T-1``:
    ``H = exp(dt_t A) H + dt_t x_t B_t^T`` (``[B, H, P, N]``), ``y_t = H C_t``. This is
    also the decoding step of Mamba-2 (``selective_state_update`` with scalar ``A``).
    """
    xc, dtc, Ac, Bh, Ch = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_states)
    check_bool("return_final_states", return_final_states)
    batch, length, heads, p = x.shape
    n = Bh.shape[-1]
    if initial_states is None:
        state = torch.zeros(batch, heads, p, n, dtype=xc.dtype, device=x.device)
    else:
        state = initial_states.to(xc.dtype)
    ys = []
    for t in range(length):
        decay = torch.exp(dtc[:, t] * Ac)[..., None, None]  # [B, H, 1, 1]
        inp = (dtc[:, t, :, None] * xc[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)
        state = decay * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    out = _finish(torch.stack(ys, dim=1), xc, D, z, x.dtype)
    if return_final_states:
        return out, state
    return out


def ssd_matrix(
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    head: int = 0,
    batch: int = 0,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """The ``[T, T]`` semiseparable matrix ``M`` of one head, with ``y = M x`` per channel.

    ``M[i, j] = L[i, j] (C_i . B_j) dt_j`` with ``L = exp(segsum(dt A))``, zero above the
    diagonal: the "attention matrix" of SSD (Dao & Gu, 2024, eq. for the SSM as a matrix
    transformation). For head ``h`` of batch entry ``b``, ``ssd(x, dt, A, B, C)[b, :, h, p]
    == M @ x[b, :, h, p]`` for every ``p`` (no ``D``, ``z`` or initial state). Its blocks
    strictly below the diagonal have rank at most ``N``.

    Args:
        dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]``, as for :func:`ssd`.
        head, batch: which head and batch entry.
        dt_bias, dt_softplus: as for :func:`ssd`.

    Returns:
        ``[T, T]`` in float32 (float64 for float64 inputs).
    """
    check_tensor("dt", dt, ndim=3, floating=True)
    b, t, h = dt.shape
    dummy = dt.new_zeros(b, t, h, 1)
    _, dtc, Ac, Bh, Ch = _prepare(dummy, dt, A, B, C, None, None, dt_bias, dt_softplus, None)
    for name, value, size in (("head", head, h), ("batch", batch, b)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if not 0 <= value < size:
            raise ValueError(f"{name} must be in [0, {size}), got {value}")
    L = torch.exp(segsum(dtc[batch, :, head] * Ac[head]))
    return L * (Ch[batch, :, head] @ Bh[batch, :, head].T) * dtc[batch, :, head]
