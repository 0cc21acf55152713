r"""Test-time training (survey section 2.4): a memory that is a model, trained while it reads.

The ops in :mod:`effarch.linear.ops` keep a matrix state and update it with a fixed rule.
Test-time training (TTT, Sun et al., 2024) turns the view around: the state *is the weights*
of an inner model ``f(.; S)``, and each token is a training example ``(k_t, v_t)`` for it.
Writing means one step of gradient descent on a self-supervised loss; reading means running
the inner model on the query::

    loss_t(S) = 1/2 || f(k_t; S) - v_t ||^2
    S_t       = S_{t-1} - eta_t grad loss_t(S_{t-1})
    o_t       = f(scale q_t; S_t)

With the linear inner model ``f(x; S) = S^T x`` the gradient is ``k_t (S^T k_t - v_t)^T``
and the update is exactly the delta rule with ``beta = eta``. Three members of the family live
here, each in the layout of :mod:`effarch.linear.ops` (``q, k: [B, T, H, K]``,
``v: [B, T, H, V]``, per-token rates ``[B, T, H]``, ``scale`` defaulting to ``K ** -0.5``,
returning ``(o, final_state)``):

* :func:`ttt_linear`: the linear inner model, trained by mini-batch gradient descent, in the
  "dual form" that turns each mini-batch into a few matrix products.
* :func:`ttt_mlp`: a two-layer MLP inner model (TTT-MLP), its gradients written out by hand.
* :func:`titans`: a linear memory trained with momentum ("surprise") and weight decay
  ("forgetting"), Titans' neural memory (Behrouz et al., 2024).

These functions apply no layer norm and no residual inside the inner model; a layer that uses
them adds those (TTT's ``f(x) = x + LN(f_res(x))``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .._checks import (
    check_bool,
    check_choice,
    check_like,
    check_linear_qkv,
    check_positive_int,
    check_tensor,
)
from .common import compute_dtype, from_heads, heads, load_state, resolve_scale

__all__ = ["titans", "ttt_linear", "ttt_linear_resume", "ttt_mlp"]

TTT_MODES = ("dual", "primal")


def _check_rate(name: str, x: Any, shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
    check_like(name, x, shape, "[B, T, H]", ref)
    return x


# --------------------------------------------------------------------------------------------
# TTT-Linear
# --------------------------------------------------------------------------------------------


def _ttt_linear_primal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, s: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The primal form: mini-batch by mini-batch, every token's gradient taken at the state
    the mini-batch started from, and every token's state materialised (a cumulative sum of
    ``[m, K, V]`` gradients), as TTT's primal form does."""
    t = q.shape[2]
    outs = []
    for start in range(0, t, m):
        qb, kb, vb, eb = (x[:, :, start : start + m] for x in (q, k, v, eta))
        error = kb @ s - vb  # S_0^T k_t - v_t for every token: [B, H, m, V]
        grads = (eb[..., None] * kb)[..., :, None] * error[..., None, :]  # [B, H, m, K, V]
        states = s[:, :, None] - grads.cumsum(dim=2)  # S_t = S_0 - sum_{s<=t} eta_s G_s
        outs.append(torch.einsum("bhtkv,bhtk->bhtv", states, qb))
        s = states[:, :, -1]
    return torch.cat(outs, dim=2), s


def _dual_minibatch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    start: torch.Tensor,
    anchor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One mini-batch (or the rest of one) in the dual form, ``[B, H, m, .]`` tensors.

    ``anchor`` is the state the mini-batch began from (where its gradients are taken) and
    ``start`` the state after the tokens of it already read (``start = anchor`` for a whole
    mini-batch). Returns the outputs and the state after the last token.
    """
    eta_err = eta[..., None] * (k @ anchor - v)  # eta_s (S_0^T k_s - v_s), [B, H, m, V]
    causal = torch.tril(q @ k.transpose(-1, -2))  # (q_t . k_s) for s <= t, [m, m]
    o = q @ start - causal @ eta_err  # o_t = S^T q_t - sum_{s<=t} eta_s (q_t . k_s) e_s
    return o, start - k.transpose(-1, -2) @ eta_err  # S - K^T diag(eta) E


def _ttt_linear_dual(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor, s: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch by mini-batch, with matrix products only (the dual form)."""
    t = q.shape[2]
    outs = []
    for start in range(0, t, m):
        qb, kb, vb, eb = (x[:, :, start : start + m] for x in (q, k, v, eta))
        o, s = _dual_minibatch(qb, kb, vb, eb, s, s)
        outs.append(o)
    return torch.cat(outs, dim=2), s


def ttt_linear_resume(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    state: torch.Tensor,
    anchor: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Finish a mini-batch of :func:`ttt_linear` that earlier calls began: decoding with TTT.

    When a mini-batch is read in pieces (token by token while decoding, or a prompt whose
    length is not a multiple of ``m``), its later tokens still take their gradients at the
    state ``anchor = S_0`` the mini-batch began from, and continue from the current
    ``state``::

        S_t = state - sum_{new s <= t} eta_s k_s (anchor^T k_s - v_s)^T,  o_t = S_t^T (scale q_t)

    All ``T`` tokens given must belong to that one mini-batch; the caller splits the stream at
    mini-batch boundaries (``T`` tokens resumed from a boundary, ``state = anchor``, are one
    dual-form step of :func:`ttt_linear`).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; eta: ``[B, T, H]``.
        state, anchor: ``[B, H, K, V]``.
        scale: multiplies ``q``; default ``K ** -0.5``.

    Returns:
        ``(o: [B, T, H, V], state after the last token: [B, H, K, V])``.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    _check_rate("eta", eta, (b, t, h), q)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    for name, x in (("state", state), ("anchor", anchor)):
        check_like(name, x, (b, h, dk, dv), "[B, H, K, V]", q)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    o, s = _dual_minibatch(qh, kh, vh, heads(eta, dtype), state.to(dtype), anchor.to(dtype))
    return from_heads(o, q), s


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    scale: float | None = None,
    mini_batch_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "dual",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""TTT-Linear: a linear inner model trained by mini-batch gradient descent as it reads.

    The state ``S`` (``[K, V]`` per batch element and head) is the weight of the inner model
    ``f(x) = S^T x``. Its loss on token ``t`` is ``1/2 ||S^T k_t - v_t||^2``, with gradient
    ``G_t(S) = k_t (S^T k_t - v_t)^T``. The sequence is cut into mini-batches of ``m`` tokens;
    inside one that starts from ``S_0``, every gradient is taken at ``S_0`` (so the mini-batch
    can be computed in parallel), each weighted by its own rate ``eta_t``, and token ``t``
    reads the weights updated by the tokens of its mini-batch up to and including itself::

        S_t = S_0 - sum_{s <= t in the mini-batch} eta_s k_s (S_0^T k_s - v_s)^T
        o_t = S_t^T (scale q_t)

    The next mini-batch starts from the last ``S_t``. With ``m = 1`` the gradient is always
    taken at ``S_{t-1}``, which is the delta rule: ``ttt_linear(q, k, v, eta,
    mini_batch_size=1)`` equals :func:`~effarch.linear.delta_rule` ``(q, k, v, beta=eta)``.

    Dual form (``mode="dual"``, TTT's fast path): with ``E = K S_0 - V`` the mini-batch's
    prediction errors (``[m, V]``), ``O = Q S_0 - tril(Q K^T) diag(eta) E`` and
    ``S_m = S_0 - K^T diag(eta) E``: matrix products of size ``m``, no ``[K, V]`` state per
    token. ``mode="primal"`` materialises each ``S_t``, a cumulative sum of the mini-batch's
    ``[K, V]`` gradients (TTT's primal form: the definition, written out).

    The steps of a mini-batch are *summed*, as written above. TTT's released code scales
    them differently: token ``i`` of a mini-batch multiplies its running sum of steps by
    ``max(0, 1 / i + b_i)``, with ``b_i`` a learned per-position bias (initially zero, so a
    running mean of the steps), and its rate carries a ``1 / K``. With the sum, a key seen
    ``r`` times in a mini-batch moves by ``r * eta``, so the mini-batch size and the rate
    interact (larger ``m`` diverges at smaller ``eta``); with the running mean it moves by
    at most ``eta``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        eta: ``[B, T, H]`` per-token learning rates (TTT: ``eta_base * sigmoid(W x_t) / K``,
            then scaled by ``1 / i`` plus a learned bias, ``i`` the reading token's position
            in its mini-batch; see above).
        scale: multiplies ``q``; default ``K ** -0.5``.
        mini_batch_size: ``m``, tokens per inner gradient step; ``T`` need not be a multiple.
        initial_state: ``[B, H, K, V]``, the inner model's starting weights (TTT learns it as a
            parameter of the layer); zeros by default.
        output_final_state: also return the weights after the last token.
        mode: ``"dual"`` or ``"primal"``.

    Returns:
        ``(o: [B, T, H, V], final_state: [B, H, K, V] or None)``; half precision is
        accumulated in float32, float64 stays float64.

    The TTT paper writes the weights as ``W = S^T`` (``[V, K]``, ``f(x) = W x``) and
    normalises the inner model's output with a layer norm; this op leaves the norm to the
    layer, so it is the paper's TTT-Linear without ``LN`` and residual.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    _check_rate("eta", eta, (b, t, h), q)
    m = check_positive_int("mini_batch_size", mini_batch_size)
    check_choice("mode", mode, TTT_MODES)
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    s0 = load_state(initial_state, b, h, dk, dv, q, dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    eh = heads(eta, dtype)
    s = qh.new_zeros(b, h, dk, dv) if s0 is None else s0
    run = _ttt_linear_dual if mode == "dual" else _ttt_linear_primal
    o, s = run(qh, kh, vh, eh, s, m)
    return from_heads(o, q), (s if output_final_state else None)


# --------------------------------------------------------------------------------------------
# TTT-MLP
# --------------------------------------------------------------------------------------------


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx for the tanh approximation used by TTT-MLP."""
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x**3)
    th = torch.tanh(inner)
    return 0.5 * (1 + th) + 0.5 * x * (1 - th**2) * c * (1 + 3 * 0.044715 * x**2)


def ttt_mlp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor],
    *,
    scale: float | None = None,
    mini_batch_size: int = 1,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""TTT-MLP: a two-layer MLP inner model trained by gradient descent as it reads.

    The state is the pair ``(W1: [K, F], W2: [F, V])`` of the inner model
    ``f(x) = gelu(x W1) W2`` (``F`` hidden units, tanh-approximated GELU). Per token::

        z = k_t W1,  a = gelu(z),  e = a W2 - v_t           # forward, error [V]
        dW2 = a^T e,  dW1 = k_t^T ((e W2^T) * gelu'(z))     # backward of 1/2 ||e||^2
        W <- W - eta_t dW                                   # both layers
        o_t = f(scale q_t) with the updated W

    With ``mini_batch_size = m > 1`` every gradient of a mini-batch is taken at the weights
    it started from, as in :func:`ttt_linear`. Unlike the linear model, all-zero weights are a
    fixed point (no gradient flows through ``W2 = 0`` into ``W1`` or through ``gelu(0) = 0``
    into ``W2``), so ``initial_state`` is required: a TTT-MLP layer learns it.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        eta: ``[B, T, H]`` per-token learning rates.
        initial_state: ``(W1: [B, H, K, F], W2: [B, H, F, V])``.
        scale: multiplies ``q``; default ``K ** -0.5``.
        mini_batch_size: ``m``.
        output_final_state: also return the final ``(W1, W2)``.

    Returns:
        ``(o: [B, T, H, V], (W1, W2) or None)``. This is the recurrent (primal) form: one
        step per token, the reference a fused dual-form kernel would be checked against.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    _check_rate("eta", eta, (b, t, h), q)
    m = check_positive_int("mini_batch_size", mini_batch_size)
    check_bool("output_final_state", output_final_state)
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError(
            "initial_state must be the pair (W1: [B, H, K, F], W2: [B, H, F, V]), got "
            f"{type(initial_state).__name__}"
        )
    w1, w2 = initial_state
    check_tensor("initial_state[0] (W1)", w1, ndim=4, floating=True)
    f = w1.shape[-1]
    check_like("initial_state[0] (W1)", w1, (b, h, dk, f), "[B, H, K, F]", q)
    check_like("initial_state[1] (W2)", w2, (b, h, f, dv), "[B, H, F, V]", q)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    eh = heads(eta, dtype)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    outs = []
    for i in range(t):
        if i % m == 0:
            a1, a2 = w1, w2  # the weights every gradient of this mini-batch is taken at
        ki = kh[:, :, i]  # [B, H, K]
        z = torch.einsum("bhk,bhkf->bhf", ki, a1)
        act = F.gelu(z, approximate="tanh")
        err = torch.einsum("bhf,bhfv->bhv", act, a2) - vh[:, :, i]
        d_act = torch.einsum("bhv,bhfv->bhf", err, a2) * _gelu_grad(z)
        lr = eh[:, :, i, None, None]
        w2 = w2 - lr * act[..., :, None] * err[..., None, :]
        w1 = w1 - lr * ki[..., :, None] * d_act[..., None, :]
        hidden = F.gelu(torch.einsum("bhk,bhkf->bhf", qh[:, :, i], w1), approximate="tanh")
        outs.append(torch.einsum("bhf,bhfv->bhv", hidden, w2))
    o = torch.stack(outs, dim=2)
    return from_heads(o, q), ((w1, w2) if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Titans
# --------------------------------------------------------------------------------------------


def titans(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""Titans' neural memory with momentum and forgetting, linear memory, recurrent form.

    The memory ``M`` (``[K, V]``) is trained online on ``1/2 ||M^T k_t - v_t||^2`` by
    gradient descent with momentum (the "surprise" ``U``, which carries past gradients) and
    weight decay (the forgetting gate ``alpha_t``)::

        U_t = eta_t U_{t-1} - theta_t k_t (M_{t-1}^T k_t - v_t)^T     # momentary + past surprise
        M_t = (1 - alpha_t) M_{t-1} + U_t                             # forget, then write
        o_t = M_t^T (scale q_t)

    With ``eta = alpha = 0`` this is the delta rule with ``beta = theta``; with ``eta = 0``
    and ``alpha = 1 - exp(g)`` it is close to, but not the same as, the gated delta rule
    (Titans takes the gradient at the undecayed memory).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        theta: ``[B, T, H]`` learning rates (the weight of the momentary surprise).
        eta: ``[B, T, H]`` momentum decays, in ``[0, 1]``.
        alpha: ``[B, T, H]`` forgetting rates, in ``[0, 1]``.
        scale: multiplies ``q``; default ``K ** -0.5``.
        initial_state: ``(M: [B, H, K, V], U: [B, H, K, V])``; zeros by default.
        output_final_state: also return ``(M, U)`` after the last token.

    Returns:
        ``(o: [B, T, H, V], (M, U) or None)``.

    Titans makes the memory a deep MLP (``M`` above is its one-layer case, for which the
    recurrence is a matrix one); the paper also normalises and projects around it, which
    belongs to a layer. Its training uses a chunked form in which gradients inside a chunk are
    taken at the chunk's first ``M``, as :func:`ttt_linear` does for its mini-batches.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        _check_rate(name, x, (b, t, h), q)
    for name, x in (("eta", eta), ("alpha", alpha)):
        if x.numel() and bool(((x < 0) | (x > 1)).any()):
            raise ValueError(
                f"{name} must lie in [0, 1], got values in [{x.min().item():.4g}, "
                f"{x.max().item():.4g}]"
            )
    check_bool("output_final_state", output_final_state)
    scale = resolve_scale(scale, dk)
    dtype = compute_dtype(q.dtype)
    if initial_state is None:
        mem = mom = None
    elif not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError(
            "initial_state must be the pair (M: [B, H, K, V], U: [B, H, K, V]), got "
            f"{type(initial_state).__name__}"
        )
    else:
        mem = load_state(initial_state[0], b, h, dk, dv, q, dtype)
        mom = load_state(initial_state[1], b, h, dk, dv, q, dtype)
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    th, et, al = (heads(x, dtype)[..., None, None] for x in (theta, eta, alpha))
    mem = qh.new_zeros(b, h, dk, dv) if mem is None else mem
    mom = qh.new_zeros(b, h, dk, dv) if mom is None else mom
    outs = []
    for i in range(t):
        ki = kh[:, :, i]
        err = torch.einsum("bhkv,bhk->bhv", mem, ki) - vh[:, :, i]
        grad = ki[..., :, None] * err[..., None, :]
        mom = et[:, :, i] * mom - th[:, :, i] * grad
        mem = (1 - al[:, :, i]) * mem + mom
        outs.append(torch.einsum("bhkv,bhk->bhv", mem, qh[:, :, i]))
    o = torch.stack(outs, dim=2)
    return from_heads(o, q), ((mem, mom) if output_final_state else None)
