"""The one place that picks a backend and says why a Triton kernel cannot run.

Every op with a fast path takes ``backend`` and asks :func:`use_triton`, which applies one
rule everywhere:

``"torch"``
    Never the kernel: the PyTorch form runs.
``"triton"``
    The kernel, or ``ValueError("backend='triton' cannot run: <reason>")`` saying why not
    (Triton missing, CPU tensors without ``TRITON_INTERPRET=1``, a size outside the kernel's
    limits, an input that requires grad for a forward-only kernel, ...). On a CPU the
    kernel runs in Triton's interpreter when ``TRITON_INTERPRET=1``: that is how the tests
    check the kernels without a GPU.
``"auto"``
    The kernel on CUDA tensors when it can run them, PyTorch otherwise. On CPU tensors
    ``"auto"`` always picks PyTorch, even under the interpreter (which is a correctness
    tool, far slower than PyTorch).

The kernels' limits live in ``effarch_kernels.limits`` (plain Python, imported here without
Triton). ``effarch`` never imports Triton or a kernel module at import time: Triton decides
between compiling for the GPU and interpreting on the CPU when it is first imported, so it
must see ``TRITON_INTERPRET`` before that (``effarch.notebook.setup`` sets it on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from effarch_kernels.limits import interpreting

__all__ = [
    "BACKENDS",
    "FORWARD_ONLY_REASON",
    "KERNEL_DTYPES",
    "capability_reason",
    "grad_required",
    "interpreting",
    "require_triton",
    "triton_available",
    "triton_unusable_reason",
    "use_triton",
]

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when ``triton`` imports (it may still need a GPU or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_unusable_reason(
    *tensors: torch.Tensor | None, dtypes: Sequence[torch.dtype] | None = KERNEL_DTYPES
) -> str | None:
    """Why a Triton kernel cannot read ``tensors`` here, or None when it can.

    It can on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, with Triton
    installed and every tensor's dtype in ``dtypes`` (``None``: any dtype, for kernels that
    read converted copies). The first tensor gives the device; ``None`` entries are skipped.
    bfloat16 needs an Ampere or newer GPU (a T4 must use float16).
    """
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("triton_unusable_reason needs at least one tensor, got none")
    x = present[0]
    if not triton_available():
        return "triton is not installed (pip install 'effarch[kernels]')"
    if x.device.type not in ("cuda", "cpu") or (x.device.type == "cpu" and not interpreting()):
        return f"tensors are on {x.device} and TRITON_INTERPRET=1 is not set (needs a CUDA GPU)"
    for t in present:
        if dtypes is not None and t.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"the kernel supports {allowed}, got {t.dtype}"
    if any(t.dtype == torch.bfloat16 for t in present):
        reason = capability_reason(x, 8, "bfloat16")
        if reason is not None:
            return f"{reason}: use float16"
    return None


def capability_reason(x: torch.Tensor, major: int, what: str) -> str | None:
    """Why ``what`` cannot run on the GPU that holds ``x``: it needs compute capability
    ``major``.0 or newer (a T4 has 7.5, an A100 8.0, an H100 9.0). None on such a GPU, and
    for tensors off the GPU (Triton's interpreter runs anything).

    >>> capability_reason(torch.zeros(1), 8, "INT8 products") is None
    True
    """
    if x.device.type != "cuda":
        return None
    have = torch.cuda.get_device_capability(x.device)
    if have[0] >= major:
        return None
    name = torch.cuda.get_device_name(x.device)
    return f"{what} needs compute capability >= {major}.0 and {name} has {have[0]}.{have[1]}"


def grad_required(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record through any of ``tensors`` (None entries skipped):
    a forward-only kernel must not run then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


FORWARD_ONLY_REASON = (
    "the kernel is forward only and an input requires grad (use backend='torch' to train, "
    "or torch.no_grad() for inference)"
)


def use_triton(
    backend: Any,
    *tensors: torch.Tensor | None,
    limit: str | None = None,
    forward_only: Sequence[torch.Tensor | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = KERNEL_DTYPES,
) -> bool:
    """Whether to run the Triton kernel, by the rule of this module's docstring.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        tensors: the tensors the kernel reads (device from the first, dtypes checked
            against ``dtypes``).
        limit: why this call lies outside what the kernel supports (another mode, a size
            over an ``effarch_kernels.limits`` bound, ...), or None when it does not.
        forward_only: for a kernel without a backward pass, its inputs: it is refused
            whenever autograd would record through one of them.
        dtypes: the dtypes the kernel reads (None: any).

    Returns:
        True to run the kernel, False to run PyTorch.

    Raises:
        ValueError: for an unknown ``backend``, and for ``"triton"`` when the kernel cannot
            run (``"backend='triton' cannot run: <reason>"``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("use_triton needs at least one tensor to read the device from, got none")
    if backend == "auto" and present[0].device.type != "cuda":
        return False
    reason = limit
    if reason is None and forward_only is not None and grad_required(*forward_only):
        reason = FORWARD_ONLY_REASON
    if reason is None:
        reason = triton_unusable_reason(*tensors, dtypes=dtypes)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run: {reason}")
    return reason is None


def require_triton(
    name: str, *tensors: torch.Tensor | None, dtypes: Sequence[torch.dtype] | None = KERNEL_DTYPES
) -> None:
    """For a function that is the kernel (no PyTorch form to fall back to): raise
    ``ValueError("<name> cannot run: <reason>")`` when the kernel cannot read ``tensors``."""
    reason = triton_unusable_reason(*tensors, dtypes=dtypes)
    if reason is not None:
        raise ValueError(f"{name} cannot run: {reason}")
