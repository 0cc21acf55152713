"""flash_attention: the fused Triton kernel when it can run, PyTorch's fused SDPA otherwise.

The kernels live in ``effarch_kernels.flash_attention`` and are imported here lazily, the
first time the Triton backend is used, so ``effarch`` imports without Triton or a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._checks import check_choice
from .naive import _check_qkv, sdpa_attention

BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when ``triton`` imports (it may still need a GPU or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _triton_unusable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on ``q`` here, or None when it can."""
    if not triton_available():
        return "triton is not installed (pip install 'effarch[kernels]')"
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
            name = torch.cuda.get_device_name(q.device)
            return f"bfloat16 needs compute capability >= 8.0 and {name} has less: use float16"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the kernel supports float16, bfloat16 and float32, got {q.dtype}"
        return None
    if q.device.type == "cpu" and _interpreting():
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the interpreter runs float32 and float16, got {q.dtype}"
        return None
    return f"tensors are on {q.device} and TRITON_INTERPRET=1 is not set (needs a CUDA GPU)"


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
    reason = _triton_unusable_reason(q)
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
