"""S4 and S4D: a linear time-invariant state space model, discretised and run as a convolution.

The continuous system ``x'(t) = A x(t) + B u(t)``, ``y(t) = C x(t)`` is sampled with a step
``dt`` into ``x_k = A_bar x_{k-1} + B_bar u_k``, ``y_k = C x_k`` (Gu et al., 2022). Because
``A_bar``, ``B_bar`` and ``C`` do not depend on the input, unrolling the recurrence gives a
causal convolution

    y_k = sum_{l=0}^{k} K_l u_{k-l},        K_l = C A_bar^l B_bar,

so training can compute the kernel ``K`` once and convolve with an FFT in
``O(T log T)``, while generation runs the recurrence in ``O(1)`` per step.

S4D (Gu et al., 2022, "On the Parameterization and Initialization of Diagonal State Space
Models") takes ``A`` diagonal and complex, so every power ``A_bar^l`` is elementwise and
``K`` is a Vandermonde product. This module follows that diagonal path.

Convention for complex states. A real system with complex eigenvalues has them in
conjugate pairs, and the two members of a pair contribute complex-conjugate terms to
``K``. S4D stores one member of each pair and doubles the real part. Here both are
available: with ``conj_pairs=False`` (default) the states passed are all the states and the
real part of ``C A_bar^l B_bar`` is returned (exactly real when the parameters are
conjugate-symmetric); with ``conj_pairs=True`` each state stands for itself and its
conjugate, and ``2 Re(...)`` is returned, as in S4D's ``SSMKernelDiag``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from einops import rearrange

from .._checks import check_choice, check_positive_int, check_tensor
from ..scan import linear_recurrence

METHODS = ("zoh", "bilinear")
INITS = ("lin", "inv")


def _check_float_or_complex(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a floating-point or complex tensor, got dtype {x.dtype}")
    return x


def _check_dt(dt: object, batch_shape: tuple[int, ...] | None, ref: torch.Tensor) -> torch.Tensor:
    """Return ``dt`` as a tensor, scalar or of ``batch_shape`` (scalar only when that is None);
    check that it is finite and positive."""
    if isinstance(dt, Real) and not isinstance(dt, bool):
        if not (math.isfinite(float(dt)) and dt > 0):
            raise ValueError(f"dt must be a finite positive number, got {dt!r}")
        return torch.tensor(float(dt), dtype=ref.real.dtype, device=ref.device)
    if not isinstance(dt, torch.Tensor):
        raise TypeError(f"dt must be a positive number or a tensor, got {type(dt).__name__}")
    check_tensor("dt", dt, floating=True)
    if dt.ndim != 0 and batch_shape is None:
        raise ValueError(f"dt must be a scalar when diagonal=False, got shape {tuple(dt.shape)}")
    if dt.ndim != 0 and tuple(dt.shape) != batch_shape:
        raise ValueError(
            f"dt must be a scalar or have shape A.shape[:-1] = {batch_shape}, got {tuple(dt.shape)}"
        )
    if not bool((dt > 0).all()) or not bool(torch.isfinite(dt).all()):
        raise ValueError("dt must be finite and positive everywhere")
    return dt


def discretize(
    A: torch.Tensor,
    B: torch.Tensor,
    dt: float | torch.Tensor,
    method: str = "zoh",
    *,
    diagonal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discretise ``x' = A x + B u`` with step ``dt``: returns ``(A_bar, B_bar)``.

    Zero-order hold (the input is held constant over each step; exact for such inputs):

        A_bar = exp(dt A),    B_bar = (dt A)^{-1} (exp(dt A) - I) dt B.

    Bilinear (Tustin, trapezoidal rule; second-order accurate):

        A_bar = (I - dt/2 A)^{-1} (I + dt/2 A),    B_bar = (I - dt/2 A)^{-1} dt B.

    Args:
        A: with ``diagonal=True`` (the S4D path) the diagonal ``[..., N]``, real or
            complex; otherwise a dense ``[N, N]`` matrix.
        B: diagonal case: broadcastable to ``A`` (``[..., N]``); dense case ``[N]`` or
            ``[N, M]``.
        dt: a positive number, or (diagonal case) a tensor of shape ``A.shape[:-1]``, one
            step per channel as S4D's ``exp(log_dt)``.
        method: ``"zoh"`` or ``"bilinear"``.
        diagonal: whether ``A`` holds a diagonal or a full matrix.

    Returns:
        ``A_bar`` and ``B_bar`` with the shapes of ``A`` and ``B`` (broadcast), in the
        common dtype of ``A``, ``B`` and ``dt`` (a float64 ``dt`` promotes both). In the
        diagonal case the formulas act elementwise (``(exp(z) - 1) / z``
        is evaluated with ``expm1`` and its limit 1 at ``z = 0``); the dense ZOH uses the
        exponential of the block matrix ``[[A, B], [0, 0]] dt``, whose top blocks are
        ``A_bar`` and ``B_bar`` even when ``A`` is singular. Matches S4D's ``zoh`` and
        ``bilinear`` discretisations (``SSMKernelDiag``, ``disc="zoh" | "bilinear"``).
    """
    _check_float_or_complex("A", A)
    _check_float_or_complex("B", B)
    check_choice("method", method, METHODS)
    if A.device != B.device:
        raise ValueError(f"B must be on the device of A ({A.device}), got {B.device}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    if diagonal:
        if A.ndim < 1:
            raise ValueError(
                f"A must have at least 1 dimension [..., N], got shape {tuple(A.shape)}"
            )
        try:
            torch.broadcast_shapes(A.shape, B.shape)
        except RuntimeError:
            raise ValueError(
                f"B must broadcast against A {tuple(A.shape)}, got {tuple(B.shape)}"
            ) from None
        step = _check_dt(dt, tuple(A.shape[:-1]), A).to(A.device)
        step = step.unsqueeze(-1) if step.ndim else step
        Ac, Bc = A.to(dtype), B.to(dtype)
        z = step * Ac
        if method == "zoh":
            A_bar = torch.exp(z)
            tiny = z.abs() < 1e-8
            z_safe = torch.where(tiny, torch.ones_like(z), z)
            phi = torch.where(tiny, 1 + z / 2, torch.expm1(z_safe) / z_safe)  # (e^z - 1) / z
            return A_bar, phi * step * Bc
        denom = 1 - z / 2
        return (1 + z / 2) / denom, step * Bc / denom

    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(
            f"A must be a square matrix [N, N] when diagonal=False, got {tuple(A.shape)}"
        )
    n = A.shape[0]
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ValueError(f"B must have shape [N] or [N, M] with N = {n}, got {tuple(B.shape)}")
    step = _check_dt(dt, None, A).to(A.device)
    Ac = A.to(dtype)
    Bm = (B if B.ndim == 2 else B.unsqueeze(-1)).to(dtype)
    if method == "zoh":
        m = Bm.shape[1]
        block = torch.zeros(n + m, n + m, dtype=dtype, device=A.device)
        block[:n, :n] = Ac * step
        block[:n, n:] = Bm * step
        expo = torch.linalg.matrix_exp(block)
        A_bar, B_bar = expo[:n, :n], expo[:n, n:]
    else:
        eye = torch.eye(n, dtype=dtype, device=A.device)
        left = eye - step / 2 * Ac
        A_bar = torch.linalg.solve(left, eye + step / 2 * Ac)
        B_bar = torch.linalg.solve(left, step * Bm)
    return A_bar, (B_bar if B.ndim == 2 else B_bar.squeeze(-1))


def _check_diag_params(
    A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, *, first: str = "A_bar"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check and broadcast the diagonal parameters; ``first`` names what stands for A_bar."""
    _check_float_or_complex(first, A_bar)
    _check_float_or_complex("B_bar", B_bar)
    _check_float_or_complex("C", C)
    if A_bar.ndim < 1:
        raise ValueError(f"{first} must have shape [..., N], got {tuple(A_bar.shape)}")
    for name, t in (("B_bar", B_bar), ("C", C)):
        if t.device != A_bar.device:
            raise ValueError(
                f"{name} must be on the device of {first} ({A_bar.device}), got {t.device}"
            )
    try:
        shape = torch.broadcast_shapes(A_bar.shape, B_bar.shape, C.shape)
    except RuntimeError:
        raise ValueError(
            f"{first}, B_bar and C must broadcast to one shape [..., N], got "
            f"{tuple(A_bar.shape)}, {tuple(B_bar.shape)} and {tuple(C.shape)}"
        ) from None
    dtype = torch.promote_types(torch.promote_types(A_bar.dtype, B_bar.dtype), C.dtype)
    return (A_bar.to(dtype).expand(shape), B_bar.to(dtype).expand(shape), C.to(dtype).expand(shape))


def _real_out(y: torch.Tensor, conj_pairs: bool) -> torch.Tensor:
    if y.is_complex():
        y = y.real
    return 2 * y if conj_pairs else y


def ssm_powers(log_A_bar: torch.Tensor, L: int) -> torch.Tensor:
    """The powers ``A_bar^l = exp(l log A_bar)``, ``l = 0..L-1``, from the exponent.

    Args:
        log_A_bar: ``[..., N]`` real or complex, finite: ``log A_bar`` of a diagonal SSM
            (``dt A`` under zero-order hold, :func:`discretize`); computed in at least
            float32, returned in its dtype.
        L: number of powers.

    Returns:
        The Vandermonde matrix ``[..., N, L]`` in ``log_A_bar``'s dtype. Each entry is one
        exponential of ``l log A_bar`` (complex ones in polar form, ``exp(l Re) e^{i l Im}``,
        half the cost of a complex ``exp`` on a CPU), as S4D's kernel computes them
        (``SSMKernelDiag``: ``exp(dtA * arange(L))``): its error is the rounding of
        ``l log A_bar``, not that of ``l`` rounded multiplications.
    """
    check_positive_int("L", L)
    _check_float_or_complex("log_A_bar", log_A_bar)
    if log_A_bar.ndim < 1:
        raise ValueError(f"log_A_bar must have shape [..., N], got {tuple(log_A_bar.shape)}")
    # at least float32: half precision cannot count past 2048 (bfloat16: 256)
    x = log_A_bar.to(torch.promote_types(log_A_bar.dtype, torch.float32))
    k = torch.arange(L, dtype=x.real.dtype, device=x.device)
    if not x.is_complex():
        return torch.exp(x[..., None] * k).to(log_A_bar.dtype)
    return torch.polar(torch.exp(x.real[..., None] * k), x.imag[..., None] * k).to(log_A_bar.dtype)


def ssm_kernel(
    A_bar: torch.Tensor | None,
    B_bar: torch.Tensor,
    C: torch.Tensor,
    L: int,
    *,
    conj_pairs: bool = False,
    powers: torch.Tensor | None = None,
) -> torch.Tensor:
    """The convolution kernel ``K_l = C A_bar^l B_bar``, ``l = 0..L-1``, of a diagonal SSM.

    Args:
        A_bar, B_bar, C: ``[..., N]`` (broadcastable) diagonal transition, input and output
            vectors, real or complex (e.g. ``[H, N]``: one SSM per channel). ``A_bar`` may be
            ``None`` when ``powers`` is given.
        L: kernel length.
        conj_pairs: each state stands for a conjugate pair (S4D): return ``2 Re(...)``
            instead of ``Re(...)``. See the module docstring.
        powers: the powers ``A_bar^l`` as ``[..., N, L]``, e.g. :func:`ssm_powers` of
            ``dt A``; without them they are a running product of ``A_bar``.

    Returns:
        ``K`` of shape ``[..., L]``, real: ``K[..., l] = Re(sum_n C_n A_bar_n^l B_bar_n)``
        (doubled with ``conj_pairs``). The running product (a Vandermonde matrix ``[..., N,
        L]`` built step by step) allows ``A_bar = 0``; a layer that has ``log A_bar = dt A``
        (:class:`~effarch.ssm.S4D`) passes ``powers = ssm_powers(dt A, L)`` instead, as S4D's
        kernel (``SSMKernelDiag``, its ``C`` already multiplied by ``B_bar``) does.
    """
    check_positive_int("L", L)
    if (A_bar is None) == (powers is None):
        raise ValueError("give A_bar or its powers [..., N, L] as powers=, not both or neither")
    if powers is None:
        Ab, Bb, Cc = _check_diag_params(A_bar, B_bar, C)
        steps = Ab.unsqueeze(-1).expand(*Ab.shape, L - 1)
        powers = torch.cat([torch.ones_like(Ab.unsqueeze(-1)), steps], dim=-1).cumprod(dim=-1)
    else:
        _check_float_or_complex("powers", powers)
        if powers.ndim < 2 or powers.shape[-1] != L:
            raise ValueError(f"powers must have shape [..., N, L={L}], got {tuple(powers.shape)}")
        _, Bb, Cc = _check_diag_params(powers[..., 0], B_bar, C, first="powers[..., 0]")
    weights = Cc * Bb
    dtype = torch.promote_types(weights.dtype, powers.dtype)
    K = torch.einsum("...n,...nl->...l", weights.to(dtype), powers.to(dtype))
    return _real_out(K, conj_pairs)


def ssm_recurrence(
    u: torch.Tensor,
    A_bar: torch.Tensor,
    B_bar: torch.Tensor,
    C: torch.Tensor,
    *,
    conj_pairs: bool = False,
) -> torch.Tensor:
    """Run the diagonal SSM as a recurrence: ``x_k = A_bar x_{k-1} + B_bar u_k``, ``y_k = C x_k``.

    Args:
        u: ``[B, T, H]`` real input, one SSM per channel.
        A_bar, B_bar, C: ``[H, N]`` (real or complex).
        conj_pairs: as in :func:`ssm_kernel`.

    Returns:
        ``y`` ``[B, T, H]`` (real part, doubled with ``conj_pairs``) in the real dtype of the
        computation; equal to ``fft_conv(u, ssm_kernel(A_bar, B_bar, C, T))``. The states
        ``[B, T, H, N]`` are computed by :func:`effarch.scan.linear_recurrence`.
    """
    check_tensor("u", u, ndim=3, floating=True)
    Ab, Bb, Cc = _check_diag_params(A_bar, B_bar, C)
    h = u.shape[2]
    if Ab.ndim != 2 or Ab.shape[0] != h:
        raise ValueError(
            f"A_bar, B_bar and C must have shape [H, N] with H = {h} (channels of u), "
            f"got {tuple(Ab.shape)}"
        )
    if u.device != Ab.device:
        raise ValueError(f"u must be on the device of A_bar ({Ab.device}), got {u.device}")
    dtype = torch.promote_types(Ab.dtype, u.dtype)
    inputs = u.to(dtype).unsqueeze(-1) * Bb.to(dtype)  # [B, T, H, N]
    states = linear_recurrence(Ab.to(dtype).expand_as(inputs), inputs)
    y = (states * Cc.to(dtype)).sum(-1)
    return _real_out(y, conj_pairs)


def fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution per channel via the FFT: ``y_t = sum_{s=0}^{t} K_s u_{t-s}``.

    Args:
        u: ``[B, T, H]`` real input.
        K: ``[H, L]`` real kernel per channel (taps ``s >= L`` are zero; usually ``L = T``).

    Returns:
        ``y`` ``[B, T, H]`` in the dtype of ``u`` (half precision is computed in float32).

    Both signals are zero-padded to length ``T + L`` (``2L`` when ``L = T``) before the
    real FFT, so the circular convolution the FFT computes equals the linear one on the
    first ``T`` outputs: no wrap-around. ``O(T log T)`` per channel instead of ``O(T L)``.
    This is the convolution of S4's ``FFTConv`` (without its ``D`` skip term).
    """
    check_tensor("u", u, ndim=3, floating=True)
    check_tensor("K", K, ndim=2, floating=True)
    if K.shape[0] != u.shape[2]:
        raise ValueError(
            f"K must have shape [H, L] with H = {u.shape[2]} (channels of u), got {tuple(K.shape)}"
        )
    if K.device != u.device:
        raise ValueError(f"K must be on the device of u ({u.device}), got {K.device}")
    t, length = u.shape[1], K.shape[1]
    n = t + length
    compute = torch.promote_types(torch.promote_types(u.dtype, K.dtype), torch.float32)
    u_f = torch.fft.rfft(rearrange(u.to(compute), "b t h -> b h t"), n=n)  # [B, H, n/2+1]
    k_f = torch.fft.rfft(K.to(compute), n=n)  # [H, n/2+1]
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :t]
    # contiguous channels-last: what follows (a GELU's backward, say) runs several times
    # slower on the transposed view
    return rearrange(y, "b h t -> b t h").contiguous().to(u.dtype)


def s4d_init(
    N: int, kind: str = "lin", *, full: bool = False, dtype: torch.dtype = torch.complex64
) -> torch.Tensor:
    """The S4D initialisations of the diagonal ``A`` for a state of size ``N`` (even).

    For ``n = 0 .. N/2 - 1`` (one eigenvalue per conjugate pair):

    * ``"lin"`` (S4D-Lin): ``A_n = -1/2 + i pi n``, imaginary parts evenly spaced, as the
      frequencies of a Fourier basis;
    * ``"inv"`` (S4D-Inv): ``A_n = -1/2 + i (N / pi) (N / (2n + 1) - 1)``, an
      approximation of the eigenvalues of the normal part of S4's HiPPO-LegS matrix (the
      matrix minus its low-rank term; S4D-LegS), whose real parts are all ``-1/2``. The
      HiPPO-LegS matrix itself is lower triangular, with real eigenvalues ``-1 .. -N``.

    Returns:
        ``[N // 2]`` complex tensor, for use with ``conj_pairs=True``; with ``full=True``
        the ``[N]`` tensor ``[A, conj(A)]`` of all eigenvalues, for ``conj_pairs=False``.
    """
    check_positive_int("N", N)
    check_choice("kind", kind, INITS)
    if N % 2:
        raise ValueError(f"N must be even (states come in conjugate pairs), got {N}")
    if dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    real_dtype = torch.float32 if dtype == torch.complex64 else torch.float64
    n = torch.arange(N // 2, dtype=real_dtype)
    if kind == "lin":
        imag = math.pi * n
    else:
        imag = N / math.pi * (N / (2 * n + 1) - 1)
    A = torch.complex(torch.full_like(n, -0.5), imag)
    return torch.cat([A, A.conj()]) if full else A
