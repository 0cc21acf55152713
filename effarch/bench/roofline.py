"""The roofline model: how fast a kernel *can* run on a device.

A kernel that performs ``F`` FLOPs while moving ``Q`` bytes between main memory and the
chip has arithmetic intensity ``I = F / Q`` (FLOP/byte). On a device with peak compute
``P`` (FLOP/s) and memory bandwidth ``W`` (byte/s) its attainable throughput is

    attainable(I) = min(P, I * W)

Below the ridge point ``I* = P / W`` a kernel is memory-bound, above it compute-bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_positive_number


@dataclass(frozen=True)
class DeviceSpec:
    """Peak dense matmul throughput (FLOP/s) and memory bandwidth (byte/s) of a device,
    and its memory capacity in bytes (``nan`` when unknown)."""

    name: str
    peak_flops: float
    bandwidth: float
    note: str = ""
    memory_bytes: float = float("nan")

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns flat."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """``min(peak_flops, intensity * bandwidth)`` in FLOP/s."""
        check_positive_number("intensity", intensity)
        return min(self.peak_flops, intensity * self.bandwidth)


#: Vendor datasheet figures: dense tensor-core throughput at 16-bit precision (no
#: sparsity) and HBM/GDDR bandwidth of the SXM (data-centre) versions.
DEVICES: dict[str, DeviceSpec] = {
    "T4": DeviceSpec("T4", 65e12, 320e9, "fp16 tensor cores, GDDR6", 16e9),
    "A100": DeviceSpec("A100", 312e12, 2.039e12, "80 GB SXM, bf16 dense, HBM2e", 80e9),
    "H100": DeviceSpec("H100", 989e12, 3.35e12, "SXM, bf16 dense, HBM3", 80e9),
    "H200": DeviceSpec("H200", 989e12, 4.8e12, "SXM, bf16 dense, HBM3e", 141e9),
}


def measure_device(
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    matmul_size: int = 1024,
    copy_bytes: int = 256 * 2**20,
    repeats: int = 5,
) -> DeviceSpec:
    """Measure a device's roofline: best-of-``repeats`` matmul FLOP/s and copy bandwidth.

    * compute: ``[n, n] @ [n, n]`` costs ``2 n^3`` FLOPs;
    * bandwidth: ``dst.copy_(src)`` on ``copy_bytes`` reads and writes each byte once,
      so it moves ``2 * copy_bytes``.

    These are what this process attains, a lower bound on the datasheet peak.
    """
    check_positive_int("matmul_size", matmul_size)
    check_positive_int("copy_bytes", copy_bytes)
    check_positive_int("repeats", repeats)
    dev = torch.device(device)

    def best_of(fn) -> float:
        best = float("inf")
        fn()
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        return best

    a = torch.randn(matmul_size, matmul_size, device=dev, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, device=dev, dtype=dtype)
    flops = 2 * matmul_size**3 / best_of(lambda: a @ b)
    n = copy_bytes * 8 // torch.finfo(dtype).bits
    src = torch.empty(n, device=dev, dtype=dtype).fill_(1.0)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / best_of(lambda: dst.copy_(src))
    name = "this CPU" if dev.type == "cpu" else f"this GPU ({torch.cuda.get_device_name(dev)})"
    return DeviceSpec(name, flops, bandwidth, f"measured, {str(dtype).removeprefix('torch.')}")
