"""chunk_delta_rule: the chunkwise Triton kernel for the (gated) delta rule, forward only.

The kernels live in ``effarch_kernels.chunk_delta_rule`` and are imported lazily, the first
time the kernel runs, so ``effarch`` imports without Triton or a GPU. The public
:func:`chunk_delta_rule` checks its arguments and calls :func:`launch_chunk_delta_rule`,
which the ops :func:`~effarch.linear.delta_rule` and :func:`~effarch.linear.gated_delta_rule`
call directly on the arguments they checked.
"""

from __future__ import annotations

import torch
from effarch_kernels.limits import MAX_KEY_DIM

from .._checks import check_like
from .._kernels import grad_required, require_triton
from .chunk_kernel import check_chunk_kernel_args

__all__ = ["MAX_KEY_DIM", "chunk_delta_rule", "launch_chunk_delta_rule"]


def launch_chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_delta_rule` on arguments already checked (by it or by an op), on tensors
    the kernel can run, outside autograd (``effarch._kernels``): the kernel call."""
    from effarch_kernels.chunk_delta_rule import chunk_delta_rule_fwd

    return chunk_delta_rule_fwd(
        q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size=chunk_size
    )


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The (gated) delta rule by the chunkwise Triton kernel (WY / UT form), forward only.

    Computes, per batch element and head, with ``S_0 = initial_state`` (zeros by default)::

        S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - (exp(g_t) S_{t-1})^T k_t)^T     # [K, V]
        o_t = S_t^T (scale q_t)

    (no decay when ``g`` is None), exactly as :func:`~effarch.linear.gated_delta_rule` and
    :func:`~effarch.linear.delta_rule` do. Per chunk of ``C`` steps, with ``G`` the cumulative
    log decay from the chunk start and ``S`` the entering state, the rows written are
    ``X = U - W S`` with ``T = (I + A)^-1``, ``A_ij = beta_i exp(G_i - G_j) (k_i . k_j)`` for
    ``j < i``, ``W = T diag(beta exp(G)) K`` and ``U = T diag(beta) V``; then
    ``O = scale ((Q * exp(G)) S + (Q K^T * D) X)`` and
    ``S <- exp(G_C) S + (K * exp(G_C - G))^T X``. One kernel builds ``W, U`` for every chunk
    at once, one carries ``S`` from chunk to chunk, one computes every chunk's outputs
    (see ``effarch_kernels.chunk_delta_rule``).

    Forward only: there is no backward kernel, so when autograd would record through an
    input (it requires grad and grad mode is on) this raises instead of returning an output
    that cannot be differentiated. Run under ``torch.no_grad()`` for inference, or use the
    ops with ``backend="torch"`` to train.

    Args:
        q, k: ``[B, T, H, K]`` with ``K <= 256``; v: ``[B, T, H, V]`` (same dtype and device).
        beta: ``[B, T, H]`` write strengths.
        g: ``[B, T, H]`` log decays, all ``<= 0``, or None for the plain delta rule.
        scale: multiplies ``q``; None means ``K ** -0.5``.
        initial_state: ``[B, H, K, V]``.
        output_final_state: also return the float32 state after the last step.
        chunk_size: steps per chunk, a power of two ``>= 16`` (``T`` need not be a multiple).

    Returns:
        ``(o, final_state)``: ``o: [B, T, H, V]`` in the dtype of ``q``; ``final_state``
        ``[B, H, K, V]`` in float32, or None unless ``output_final_state``. Everything is
        computed in float32 (bfloat16 and float16 inputs are loaded and converted).

    Raises:
        ValueError: on bad shapes, ``g > 0``, ``K > 256``, a bad ``chunk_size``, an input
            that requires grad, or when the kernel cannot run here (Triton missing, or CPU
            tensors without ``TRITON_INTERPRET=1`` set before Triton was imported).
        TypeError: on non-tensors, mismatched dtypes or a non-bool ``output_final_state``.

    fla: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale,
    initial_state, output_final_state)`` (``g`` given) and
    ``fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta, scale, initial_state,
    output_final_state)`` (``g=None``), both with ``head_first=False`` and
    ``use_qk_l2norm_in_kernel=False``: normalise ``q`` and ``k`` before calling.
    """
    b, t, h, _, _, scale = check_chunk_kernel_args(
        q, k, v, g, initial_state, output_final_state, chunk_size, scale
    )
    check_like("beta", beta, (b, t, h), "[B, T, H]", q)
    if grad_required(q, k, v, beta, g, initial_state):
        raise ValueError(
            "chunk_delta_rule is forward only and an input requires grad; run it under "
            "torch.no_grad(), or use delta_rule / gated_delta_rule with backend='torch'"
        )
    require_triton("chunk_delta_rule", q, k, v)
    return launch_chunk_delta_rule(
        q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size
    )
