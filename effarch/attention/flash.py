"""flash_attention: the fused Triton kernel when it can run, PyTorch's fused SDPA otherwise.

The kernels live in ``effarch_kernels.flash_attention`` and are imported here lazily, the
first time the Triton backend is used, so ``effarch`` imports without Triton or a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from effarch_kernels.limits import head_dim_reason

from .._checks import check_attention_qkv
from .._kernels import BACKENDS, triton_available, use_triton
from .naive import launch_sdpa

__all__ = ["BACKENDS", "flash_attention", "triton_available"]


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, causal: bool, scale: float):  # type: ignore[override]
        from effarch_kernels.flash_attention import flash_attention_forward

        o, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o, lse

    @staticmethod
    def backward(ctx: Any, do, dlse):  # type: ignore[override]
        from effarch_kernels.flash_attention import flash_attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        # a loss that reads lse too (d lse / d S = P) enters through delta
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, dlse=dlse)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, fused: the score matrix never reaches main memory.

    ``O = softmax(scale * Q K^T + M) V`` with the same contract as
    :func:`~effarch.attention.naive_attention` and flash-attn's ``flash_attn_func``:
    ``q [B, Tq, Hq, D]``, ``k, v [B, Tk, Hkv, D]`` with ``Hq % Hkv == 0``, bottom-right
    causal mask, zeros for a query that sees no key.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]`` (``Dv == D`` for the kernel).
        causal: bottom-right aligned causal mask, as flash-attn.
        scale: score scale, default ``D ** -0.5``.
        backend: ``"triton"`` runs ``effarch_kernels.flash_attention`` (forward and
            backward, differentiable) on a CUDA GPU, or on the CPU under
            ``TRITON_INTERPRET=1``, or says why it cannot; ``"torch"`` runs PyTorch's fused
            ``scaled_dot_product_attention``; ``"auto"`` runs the kernel on CUDA tensors when
            it can and SDPA otherwise (the rule of :mod:`effarch._kernels`; on the CPU
            ``"auto"`` is always SDPA).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Tq]`` (the kernel only:
            use ``backend="triton"``, or :func:`~effarch.attention.tiled_attention`).

    Returns:
        ``o [B, Tq, Hq, D]`` in the dtype of ``q``, and with ``return_lse`` the ``lse``.

    The kernel pads head dimensions to a power of two (at most 256) and needs
    ``Dv == D``. bfloat16 needs an Ampere or newer GPU (a T4 must use float16); under the
    interpreter bfloat16 inputs are computed in float32. float32 inputs keep float32
    accuracy on a GPU: the forward's products run on the FMA units, the backward's as three
    TF32 products each on the tensor cores (flash-attn takes 16-bit inputs only).

    flash-attn: ``flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
    return_attn_probs=return_lse)``; with ``return_attn_probs=True`` flash-attn returns three
    values, ``(out, softmax_lse, S_dmask)`` (``S_dmask``: the dropout mask and probabilities,
    meaningful only with dropout), where this function returns two, ``(o, lse)``, ``lse``
    being flash-attn's ``softmax_lse`` (float32 ``[B, Hq, Tq]``).
    """
    check_attention_qkv(q, k, v)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    limit = head_dim_reason(d)
    if v.shape[-1] != d:
        limit = f"the kernel needs v's head_dim ({v.shape[-1]}) to equal q's ({d})"
    if not use_triton(backend, q, limit=limit):
        if return_lse:
            raise ValueError(
                "return_lse=True needs the Triton kernel (backend='triton'); use "
                "tiled_attention for the log-sum-exp in PyTorch"
            )
        return launch_sdpa(q, k, v, causal=causal, scale=scale)
    o, lse = _FlashAttention.apply(q, k, v, causal, scale)
    return (o, lse) if return_lse else o
