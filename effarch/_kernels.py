"""Whether a Triton kernel can run here, asked the same way by every fast path.

``effarch`` never imports Triton at import time: Triton decides between compiling for
the GPU and interpreting on the CPU when it is first imported, so it must see
``TRITON_INTERPRET`` before that (``effarch.notebook.setup`` sets it on a CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when ``triton`` imports (it may still need a GPU or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_unusable_reason(
    x: torch.Tensor, *, dtypes: Sequence[torch.dtype] | None = KERNEL_DTYPES
) -> str | None:
    """Why a Triton kernel cannot run on ``x`` here, or None when it can.

    It can on a CUDA tensor, or on a CPU tensor under ``TRITON_INTERPRET=1``, with Triton
    installed and ``x.dtype`` in ``dtypes`` (``None``: any dtype, for kernels that read a
    converted copy). bfloat16 needs an Ampere or newer GPU (a T4 must use float16).
    """
    if not triton_available():
        return "triton is not installed (pip install 'effarch[kernels]')"
    if x.device.type not in ("cuda", "cpu") or (x.device.type == "cpu" and not interpreting()):
        return f"tensors are on {x.device} and TRITON_INTERPRET=1 is not set (needs a CUDA GPU)"
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"the kernel supports {allowed}, got {x.dtype}"
    if x.device.type == "cuda" and x.dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(x.device)[0] < 8:
            name = torch.cuda.get_device_name(x.device)
            return f"bfloat16 needs compute capability >= 8.0 and {name} has less: use float16"
    return None


def grad_required(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record through any of ``tensors`` (None entries skipped):
    a forward-only kernel must not run then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
