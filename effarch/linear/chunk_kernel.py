"""chunk_scalar_decay and fused_recurrent: the Triton kernels of scalar-decay linear attention.

The kernels live in ``effarch_kernels.chunk_scalar_decay`` and ``effarch_kernels.
fused_recurrent`` and are imported lazily, the first time a kernel runs, so ``effarch``
imports without Triton or a GPU. Their limits (``K <= MAX_KEY_DIM``, a power-of-two chunk
of at least ``MIN_CHUNK_SIZE`` steps) come from ``effarch_kernels.limits``.

Each public function here checks its arguments and then calls an unchecked ``launch_*``
function; the ops (:func:`~effarch.linear.simple_gla`, ...) check the same arguments
themselves and call ``launch_*`` directly, so every input is checked once.
"""

from __future__ import annotations

from typing import Any

import torch
from effarch_kernels.limits import MAX_KEY_DIM, chunk_size_reason, key_dim_reason

from .._checks import (
    check_bool,
    check_like,
    check_linear_qkv,
    check_log_gate,
    check_positive_int,
)
from .._kernels import require_triton
from .common import resolve_scale

__all__ = [
    "MAX_KEY_DIM",
    "check_chunk_kernel_args",
    "chunk_kernel_limit",
    "chunk_scalar_decay",
    "fused_recurrent",
    "launch_chunk_scalar_decay",
]


def chunk_kernel_limit(mode: str, chunk_size: int, dk: int) -> str | None:
    """Why an op's call lies outside what the chunkwise kernels support, or None.

    They compute the ``"chunk"`` mode, with a power-of-two ``chunk_size >= 16`` and keys of
    at most 256 entries (``effarch_kernels.limits``).
    """
    if mode != "chunk":
        return f"the kernel is the chunk form; mode is {mode!r}"
    return chunk_size_reason(chunk_size) or key_dim_reason(dk)


def check_chunk_kernel_args(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    initial_state: Any,
    output_final_state: Any,
    chunk_size: Any,
    scale: Any,
) -> tuple[int, int, int, int, int, float]:
    """The checks every chunkwise kernel function shares; returns ``B, T, H, K, V, scale``.

    ``q, k: [B, T, H, K]`` with ``K <= MAX_KEY_DIM`` and ``v: [B, T, H, V]`` (one dtype and
    device); ``g``: None or ``[B, T, H]`` log decays ``<= 0``; ``initial_state``: None or
    ``[B, H, K, V]``; ``chunk_size`` a power of two ``>= 16``; ``scale`` None (``K ** -0.5``)
    or positive.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    if (reason := key_dim_reason(dk)) is not None:
        raise ValueError(reason)
    if g is not None:
        check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    if initial_state is not None:
        check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", q)
    check_bool("output_final_state", output_final_state)
    check_positive_int("chunk_size", chunk_size)
    if (reason := chunk_size_reason(chunk_size)) is not None:
        raise ValueError(reason)
    return b, t, h, dk, dv, resolve_scale(scale, dk)


class _ChunkScalarDecay(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q, k, v, g, initial_state, scale: float, output_final_state: bool, chunk: int
    ):
        from effarch_kernels.chunk_scalar_decay import chunk_scalar_decay_fwd

        o, ht = chunk_scalar_decay_fwd(
            q, k, v, g, scale, initial_state, output_final_state, chunk_size=chunk
        )
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx: Any, do, dht):  # type: ignore[override]
        from effarch_kernels.chunk_scalar_decay import chunk_scalar_decay_bwd

        q, k, v, g, initial_state = ctx.saved_tensors
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = chunk_scalar_decay_bwd(
            do, q, k, v, g, ctx.scale, initial_state, dht, chunk_size=ctx.chunk
        )
        return dq, dk, dv, dg, dh0, None, None, None


def launch_chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_scalar_decay` on arguments already checked (by it or by an op), on
    tensors the kernel can run (``effarch._kernels``): the differentiable kernel call."""
    o, final = _ChunkScalarDecay.apply(
        q, k, v, g, initial_state, scale, output_final_state, chunk_size
    )
    return o, (final if output_final_state else None)


def chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Linear attention with a scalar decay per head and step, by the chunkwise Triton kernel.

    Computes, per batch element and head, with ``S_0 = initial_state`` (zeros by default)::

        S_t = exp(g_t) S_{t-1} + k_t v_t^T        # [K, V]; no decay when g is None
        o_t = S_t^T (scale q_t)

    exactly as :func:`~effarch.linear.simple_gla` (``g`` given) and
    :func:`~effarch.linear.linear_attention` (``g=None``) do, but in
    ``effarch_kernels.chunk_scalar_decay``: one kernel carries the state from chunk to chunk,
    another computes all chunks' outputs in parallel, and the backward pass (``dq, dk, dv``,
    ``dg`` and the gradient of ``initial_state``) runs the same structure in reverse.
    Differentiable with respect to every tensor argument.

    Args:
        q, k: ``[B, T, H, K]`` with ``K <= 256``; v: ``[B, T, H, V]`` (same dtype and device).
        g: ``[B, T, H]`` log decays, all ``<= 0``, or None for plain linear attention.
        scale: multiplies ``q``; None means ``K ** -0.5``.
        initial_state: ``[B, H, K, V]``.
        output_final_state: also return the float32 state after the last step.
        chunk_size: steps per chunk, a power of two ``>= 16`` (``T`` need not be a multiple).

    Returns:
        ``(o, final_state)``: ``o: [B, T, H, V]`` in the dtype of ``q``; ``final_state``
        ``[B, H, K, V]`` in float32, or None unless ``output_final_state``.

    Raises:
        ValueError: on bad shapes or limits, and when the kernel cannot run here: Triton
            missing, or tensors on the CPU without ``TRITON_INTERPRET=1`` set before Triton
            was imported (the interpreter runs float32 and float16; bfloat16 inputs are
            computed in float32 there).

    fla: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=g, scale=scale,
    initial_state=initial_state, output_final_state=output_final_state)`` (keywords: fla's
    signature is ``(q, k, v, g=None, g_gamma=None, scale=None, ...)``).
    """
    *_, scale = check_chunk_kernel_args(
        q, k, v, g, initial_state, output_final_state, chunk_size, scale
    )
    require_triton("chunk_scalar_decay", q, k, v)
    return launch_chunk_scalar_decay(
        q, k, v, g, scale, initial_state, output_final_state, chunk_size
    )


def fused_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused recurrent Triton kernel (forward only): the decoding form of the family.

    One program per (value block, batch, head) keeps its slice of the state ``[K, V]`` in
    registers and walks the tokens. For each step::

        S <- exp(g_t) S  (scalar g [B, T, H]),  S <- diag(exp(gk_t)) S  (gk [B, T, H, K])
        u_t = v_t, or with beta [B, T, H] the delta rule u_t = beta_t (v_t - S^T k_t)
        S <- S + k_t u_t^T,      o_t = S^T (scale q_t)

    covering ``linear_attention``, ``simple_gla``/``retention``, ``gla``, ``delta_rule`` and
    ``gated_delta_rule`` in their ``mode="recurrent"`` semantics (fla's
    ``fused_recurrent_*`` ops). Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32
    or None)``. Runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    if g is not None:
        check_log_gate("g", g, (b, t, h), "[B, T, H]", q)
    if gk is not None:
        check_log_gate("gk", gk, (b, t, h, dk), "[B, T, H, K]", q)
    if beta is not None:
        check_like("beta", beta, (b, t, h), "[B, T, H]", q)
    check_bool("output_final_state", output_final_state)
    if initial_state is not None:
        check_like("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]", q)
    scale = resolve_scale(scale, dk)
    require_triton("fused_recurrent", q, k, v)
    from effarch_kernels.fused_recurrent import fused_recurrent as launch

    return launch(q, k, v, g=g, gk=gk, beta=beta, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state)  # fmt: skip
