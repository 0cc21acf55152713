"""The first-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` as a parallel scan.

Every linear RNN and selective state space model in this book reduces, once its inputs
are known, to this recurrence with an elementwise (diagonal) transition ``a_t``. Read as
a fold over pairs ``(a_t, b_t)``, one step is the affine map ``h -> a_t h + b_t``, and
applying ``(a_1, b_1)`` and then ``(a_2, b_2)`` is again an affine map:

    (a_1, b_1) then (a_2, b_2)  =  (a_1 a_2,  a_2 b_1 + b_2).

This composition is associative, so every prefix ``h_t`` can be computed by a parallel
prefix scan in ``O(log T)`` sequential steps, each of which acts on the whole
``[B, T, ...]`` tensor at once (Blelloch, 1990; Martin & Cundy, 2018, "Parallelizing
linear recurrent neural nets over sequence length"). This is the scan that Mamba's
``selective_scan`` kernel and S5 run on the GPU; here it is written with plain torch ops
so that it runs, and differentiates, anywhere.

Two schedules are offered, plus the loop they are checked against:

* ``"hillis_steele"``: at step ``k`` every position combines with the one ``2^k`` places
  back. ``ceil(log2 T)`` steps, ``O(T log T)`` work.
* ``"blelloch"``: combine neighbouring pairs, scan the half-length sequence recursively,
  then fill in the even positions from their odd neighbours. About ``2 log2 T`` steps and
  ``O(T)`` work: the work-efficient schedule.
* ``"sequential"``: the loop, ``T`` steps.

:func:`scan_depth` gives the number of sequential combine steps of each schedule, and
:func:`hillis_steele_scan`, :func:`blelloch_scan` and :func:`sequential_scan` run one schedule
from a zero state and count its steps.

:func:`segsum` is the companion of the scan for log-space decays: the sums of a sequence
over every segment ``(j, i]``, from which the decay matrices of RetNet, GLA and Mamba-2's SSD
are built (``exp(segsum(g))``).

Only products of ``a`` are formed (no divisions, no logarithms), so for ``a`` in
``[0, 1]`` long products may underflow to zero, which is their correct limit, but never
produce ``inf`` or ``nan``.
"""

from __future__ import annotations

import torch

from ._checks import check_choice, check_positive_int, check_same

METHODS = ("blelloch", "hillis_steele", "sequential")

__all__ = [
    "METHODS",
    "blelloch_scan",
    "hillis_steele_scan",
    "hillis_steele_schedule",
    "linear_recurrence",
    "plot_scan_schedule",
    "scan_depth",
    "scan_work",
    "segsum",
    "sequential_scan",
]


def _check_scan_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a floating-point or complex tensor, got dtype {x.dtype}")
    return x


def linear_recurrence(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    method: str = "blelloch",
) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (elementwise) along dim 1.

    Args:
        a: ``[B, T, ...]`` the transitions (decays), any trailing shape.
        b: ``[B, T, ...]`` the inputs, same shape, dtype and device as ``a``.
        h0: optional ``[B, ...]`` state before the first step (zero when omitted).
        method: ``"blelloch"`` (default, work-efficient), ``"hillis_steele"`` or
            ``"sequential"`` (the reference loop).

    Returns:
        ``h`` of shape ``[B, T, ...]`` with ``h[:, t] = a[:, t] * h[:, t-1] + b[:, t]``,
        where the state before ``t = 0`` is ``h0`` (or 0). Real and complex dtypes are
        both supported; the computation runs in the input dtype and autograd works
        through it.

    The initial state is folded into the first input, ``b_0 <- a_0 h0 + b_0``, after
    which the scan starts from zero. This is the recurrence inside mamba_ssm's
    ``selective_scan_fn`` (there with ``a = exp(delta A)`` and ``b = delta B u``) and
    flash-linear-attention's ``hgrn`` (with ``a = exp(g)``).
    """
    _check_scan_tensor("a", a)
    _check_scan_tensor("b", b)
    check_same(("a", "b"), (a, b))
    check_choice("method", method, METHODS)
    if a.ndim < 2:
        raise ValueError(
            f"a must have at least 2 dimensions [B, T, ...], got shape {tuple(a.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if h0 is not None:
        _check_scan_tensor("h0", h0)
        check_same(("a", "h0"), (a, h0))
        expected = (a.shape[0], *a.shape[2:])
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0 must have shape [B, ...] = {expected}, got {tuple(h0.shape)}")
        b = torch.cat([(a[:, :1] * h0.unsqueeze(1) + b[:, :1]), b[:, 1:]], dim=1)
    if a.shape[1] == 0:
        return b.clone()
    if method == "hillis_steele":
        return hillis_steele_scan(a, b)[0]
    if method == "blelloch":
        return blelloch_scan(a, b)[0]
    return sequential_scan(a, b)[0]


def scan_depth(T: int, method: str = "blelloch") -> int:
    """Sequential combine steps that :func:`linear_recurrence` takes for length ``T``.

    ``"hillis_steele"``: ``ceil(log2 T)``. ``"blelloch"``: one pairing step and one
    filling step per level of halving (the last level has no filling step), which is
    ``2 ceil(log2 T) - 1`` for ``T`` a power of two and never more than that.
    ``"sequential"``: ``T - 1`` (the first state needs no combine). Each step is one
    elementwise pass over the whole tensor, so on parallel hardware the depth, not the
    work, sets the latency.
    """
    check_positive_int("T", T)
    check_choice("method", method, METHODS)
    if method == "sequential":
        return T - 1
    if method == "hillis_steele":
        return (T - 1).bit_length()  # ceil(log2 T), 0 for T = 1
    depth = 0
    while T > 1:
        depth += 1 + (1 if (T + 1) // 2 > 1 else 0)  # pair step, then (maybe) fill step
        T //= 2
    return depth


def scan_work(T: int, method: str = "blelloch") -> int:
    """Combine operations ``(a, b) then (a', b')`` that :func:`linear_recurrence` performs
    for length ``T``, summed over its steps (each is one multiply-add per element).

    ``"sequential"``: ``T - 1``. ``"hillis_steele"``: ``T - 2^k`` in round ``k``, so
    ``T log2 T - T + 1`` for ``T`` a power of two: ``O(T log T)``. ``"blelloch"``: ``T // 2``
    pair combines, the half-length scan, then ``ceil(T / 2) - 1`` fills, so ``2T - 2 - log2 T``
    for ``T`` a power of two: ``O(T)``, work-efficient.
    """
    check_positive_int("T", T)
    check_choice("method", method, METHODS)
    if method == "sequential":
        return T - 1
    if method == "hillis_steele":
        return sum(T - shift for shift in (2**k for k in range(scan_depth(T, method))))
    work = 0
    while T > 1:
        work += T // 2 + (T + 1) // 2 - 1  # pair up, then fill the even positions
        T //= 2
    return work


def sequential_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loop: all states of ``h_t = a_t h_{t-1} + b_t`` from ``h_{-1} = 0`` along dim 1
    of ``[B, T, ...]`` tensors (``T >= 1``, unchecked), and the ``T - 1`` steps taken."""
    h = b[:, 0]
    out = [h]
    for t in range(1, a.shape[1]):
        h = torch.addcmul(b[:, t], a[:, t], h)  # a_t h + b_t in one pass
        out.append(h)
    return torch.stack(out, dim=1), a.shape[1] - 1


def hillis_steele_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Hillis-Steele inclusive scan of ``[B, T, ...]`` tensors (``T >= 1``, unchecked):
    the states and the number of steps taken.

    After step k, position t holds the composition of the last 2^k elements up to t
    (fewer near the start, where the identity (1, 0) is shifted in)."""
    T = a.shape[1]
    steps, shift = 0, 1
    while shift < T:
        # (a, b) at t - shift is the block before t's; the first `shift` positions compose
        # with the identity (1, 0), so they keep their values (a copy, updated in place)
        b_new = b.clone()
        b_new[:, shift:].addcmul_(a[:, shift:], b[:, :-shift])  # a_t b_{t-shift} + b_t
        if 2 * shift < T:  # the products of a are not needed after the last step
            a_new = a.clone()
            a_new[:, shift:].mul_(a[:, :-shift])
            a = a_new
        b = b_new
        shift *= 2
        steps += 1
    return b, steps


def blelloch_scan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Blelloch's work-efficient scan of ``[B, T, ...]`` tensors (``T >= 1``, unchecked):
    the states and the number of steps taken. Pair up, recurse on the half-length
    sequence, fill in.

    With ``m = T // 2`` pairs ``(2i, 2i+1)``, the pair compositions form a sequence of
    length ``m`` whose prefix states are exactly the states at the odd positions. An even
    position ``2i`` (``i >= 1``) then needs one more step from the odd state before it.
    """
    T = a.shape[1]
    if T == 1:
        return b, 0
    m = T // 2
    a_even, a_odd = a[:, 0 : 2 * m : 2], a[:, 1 : 2 * m : 2]
    b_even, b_odd = b[:, 0 : 2 * m : 2], b[:, 1 : 2 * m : 2]
    h_odd, steps = blelloch_scan(a_even * a_odd, a_odd * b_even + b_odd)  # states at 1, 3, ...
    steps += 1
    n_fill = (T + 1) // 2 - 1  # even positions 2, 4, ... below T
    if n_fill > 0:
        fill = a[:, 2::2] * h_odd[:, :n_fill] + b[:, 2::2]
        h_even = torch.cat([b[:, :1], fill], dim=1)
        steps += 1
    else:
        h_even = b[:, :1]
    # interleave: positions 0, 1, 2, ... = even_0, odd_0, even_1, odd_1, ...
    pairs = torch.stack([h_even[:, :m], h_odd], dim=2)
    h = pairs.reshape(a.shape[0], 2 * m, *a.shape[2:])
    if T % 2:
        h = torch.cat([h, h_even[:, m:]], dim=1)
    return h, steps


def segsum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Segment sums: ``out[..., i, j, ...] = x_{j+1} + ... + x_i`` along ``dim`` for
    ``j <= i``, and ``-inf`` above the diagonal (``j > i``).

    ``exp(segsum(g))`` is the causal decay matrix of log decays ``g``: ``L[i, j] =
    exp(g_{j+1} + ... + g_i)`` for ``j <= i`` and ``exp(-inf) = 0`` above the diagonal. This
    is ``L`` in Mamba-2's SSD (``g = dt A``) and the decay mask of RetNet and (simple) GLA.

    Mathematically ``out[i, j] = G_i - G_j`` with ``G = cumsum(x)``; summing each segment
    directly (a cumulative sum of a masked copy) avoids the cancellation of two large
    running sums, and masking before the exponential keeps the entries above the diagonal
    at ``exp(-inf) = 0`` instead of overflowing.

    Args:
        x: ``[..., T, ...]``, summed along ``dim``: ``[..., T]`` for one log decay per step
            (``dim=-1``), ``[..., T, K]`` for one per key (``dim=-2``, as in GLA).
        dim: the time axis.

    Returns:
        ``x``'s shape with a second time axis inserted after ``dim``: ``[..., T, T]`` for
        ``dim=-1``, ``[..., T, T, K]`` for ``dim=-2``.

    This is ``segsum`` of Mamba-2's minimal SSD (``ssd_minimal.py``), generalised to
    trailing per-key dimensions.
    """
    _check_scan_tensor("x", x)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [{-x.ndim}, {x.ndim}) for x, got {dim!r}")
    dim = dim % x.ndim
    t = x.shape[dim]
    rest = x.ndim - dim - 1  # trailing dims after time, e.g. K
    ones = torch.ones(t, t, dtype=torch.bool, device=x.device)
    # [s, j] masks, broadcast over the trailing dims: keep x_s for s > j, then sum over s <= i
    strict = ones.tril(-1).view(t, t, *([1] * rest))
    causal = ones.tril().view(t, t, *([1] * rest))
    terms = x.unsqueeze(dim + 1).expand(*x.shape[: dim + 1], t, *x.shape[dim + 1 :])
    sums = terms.masked_fill(~strict, 0.0).cumsum(dim=dim)
    return sums.masked_fill(~causal, float("-inf"))


def hillis_steele_schedule(T: int) -> list[list[tuple[int, int]]]:
    """The combines of the Hillis-Steele scan of length ``T``, level by level.

    Level ``k`` lists the pairs ``(src, dst)`` with ``dst - src = 2^k``: position ``dst``
    absorbs the running result of ``src``, all pairs of a level at once. After
    ``ceil(log2 T)`` levels every position holds its prefix. For pictures and teaching;
    :func:`linear_recurrence` with ``method="hillis_steele"`` runs the same schedule on
    tensors.
    """
    check_positive_int("T", T)
    levels = []
    step = 1
    while step < T:
        levels.append([(i - step, i) for i in range(step, T)])
        step *= 2
    return levels


def plot_scan_schedule(T: int, *, ax=None):
    """Draw :func:`hillis_steele_schedule`: one row of positions per round, an arrow for
    every combine. Returns the matplotlib axis."""
    import matplotlib.pyplot as plt

    levels = hillis_steele_schedule(T)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    arrow = dict(arrowstyle="->", lw=0.6, color="tab:blue", alpha=0.7)
    for depth, level in enumerate(levels):
        for src, dst in level:
            ax.annotate("", xy=(dst, depth + 1), xytext=(src, depth), arrowprops=arrow)
        for pos in range(T):
            ax.plot([pos, pos], [depth, depth + 1], color="lightgray", lw=0.6, zorder=0)
    for depth in range(len(levels) + 1):
        ax.plot(range(T), [depth] * T, "o", ms=3, color="k")
    ax.invert_yaxis()
    ax.set_xlabel("position t")
    ax.set_ylabel("round")
    ax.set_title(f"Hillis-Steele scan of T = {T}: {len(levels)} rounds")
    return ax
