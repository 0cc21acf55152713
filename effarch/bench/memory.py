"""Peak memory of one call.

* GPU: the caching allocator's statistics: ``torch.cuda.reset_peak_memory_stats`` before
  the call, ``torch.cuda.max_memory_allocated`` after it, minus what was allocated before.
* CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of
  the CPU allocator with a timestamp. Sorting those events by time and taking the running
  sum gives the bytes held at each instant; its maximum is the peak. This sees exactly
  the tensors torch allocates (not Python objects, not the allocator's slack), the same
  quantity that the GPU path reports.

Both report bytes *above* what was held when the call started, so inputs allocated
beforehand are not counted; the output of the call is.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_callable


@dataclass(frozen=True)
class MemoryUsage:
    """Bytes above the starting level: ``peak`` during the call, ``retained`` after it."""

    peak: int
    retained: int
    method: str

    def __str__(self) -> str:
        return f"peak {format_bytes(self.peak)}, retained {format_bytes(self.retained)}"


def format_bytes(n: float) -> str:
    """Format a byte count in binary units: ``3 * 2**20 -> '3.00 MiB'``."""
    if n != n:  # NaN
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors a value holds: a tensor's ``numel * element_size``, summed through
    dicts, lists and tuples; an object with an ``nbytes()`` method (a KV cache) answers for
    itself; anything else (``None``, numbers) counts 0. The memory a decoder's state or
    cache holds between calls.

    >>> tensor_bytes({"s": torch.zeros(2, 3), "conv": [torch.zeros(4, dtype=torch.float16)]})
    32
    """
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes()) if callable(nbytes) else 0


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[MemoryUsage, Any]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    retained = torch.cuda.memory_allocated(device) - start
    return MemoryUsage(peak, retained, "torch.cuda.max_memory_allocated"), out


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs a line there at
    every start and stop, which would clutter notebooks and test logs."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], Any]) -> tuple[MemoryUsage, Any]:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    try:
        events = prof.profiler.kineto_results.events()
        deltas = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except AttributeError as err:  # pragma: no cover - guards a profiler API change
        raise RuntimeError(
            "this torch version's profiler does not expose memory events; "
            "CPU peak memory cannot be measured"
        ) from err
    held = peak = 0
    for _, nbytes in deltas:
        held += nbytes
        peak = max(peak, held)
    return MemoryUsage(peak, held, "torch.profiler memory events"), out


def peak_memory(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> MemoryUsage:
    """Measure the peak bytes that torch allocates while ``fn()`` runs.

    Args:
        fn: a callable taking no arguments.
        device: ``"cuda"`` (or ``"cuda:1"``) to read the CUDA allocator, ``None``/``"cpu"``
            to record CPU allocations with the profiler.

    Returns:
        MemoryUsage: bytes above the level at the start of the call, ``peak`` the maximum
        during it and ``retained`` what is still held when it returns (its outputs).
    """
    check_callable("fn", fn)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {dev} but CUDA is not available")
        usage, _ = _cuda_peak(fn, dev)
    elif dev.type == "cpu":
        usage, _ = _cpu_peak(fn)
    else:
        raise ValueError(f"device must be a CPU or CUDA device, got {dev}")
    return usage
