"""flash_attention: the fused Triton kernel when it can run, PyTorch's fused SDPA otherwise.

The kernels live in ``effarch_kernels.flash_attention`` and are imported here lazily, the
first time the Triton backend is used, so ``effarch`` imports without Triton or a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_choice
from .._kernels import triton_available, triton_unusable_reason
from .naive import _check_qkv, sdpa_attention

BACKENDS = ("auto", "triton", "torch")
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
    def backward(ctx: Any, do, _dlse):  # type: ignore[override]
        from effarch_kernels.flash_attention import flash_attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
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
        backend: ``"triton"`` runs ``effarch_kernels.flash_attention`` (forward and
            backward, differentiable) on a CUDA GPU, or on the CPU under
            ``TRITON_INTERPRET=1``; ``"torch"`` runs PyTorch's fused
            ``scaled_dot_product_attention``; ``"auto"`` picks Triton when it can run.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Tq]`` (Triton backend).

    The kernel pads head dimensions to a power of two (at most 256) and needs
    ``Dv == D``. bfloat16 needs an Ampere or newer GPU (a T4 must use float16); under the
    interpreter bfloat16 inputs are computed in float32.
    """
    _check_qkv(q, k, v)
    check_choice("backend", backend, BACKENDS)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    reason = triton_unusable_reason(q)
    if v.shape[-1] != d:
        reason = reason or f"the kernel needs v's head_dim ({v.shape[-1]}) to equal q's ({d})"
    if d > 256:
        reason = reason or f"the kernel supports head_dim up to 256, got {d}"
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}")
    if backend == "torch" or (backend == "auto" and reason is not None):
        if return_lse:
            raise ValueError("return_lse=True needs the Triton backend; use tiled_attention")
        return sdpa_attention(q, k, v, causal=causal, scale=scale)

    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:  # the interpreter's bf16 is broken
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, lse = _FlashAttention.apply(q, k, v, causal, scale)
    o = o.to(dtype)
    return (o, lse) if return_lse else o
