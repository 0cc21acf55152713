"""The measuring toolkit every chapter uses: time, memory, FLOPs, sweeps and plots.

>>> from effarch import bench
>>> t = bench.benchmark(lambda: sum(range(1000)))
>>> t.median > 0
True
"""

from .claims import remeasured
from .fit import LineFit, PowerLawFit, fit_exponent, fit_line
from .flops import FlopCount, attention_flops, format_flops, matmul_flops, measure_flops
from .memory import MemoryUsage, format_bytes, peak_memory, tensor_bytes
from .plot import plot_kv_cache, plot_memory, plot_roofline, plot_scaling
from .roofline import DEVICES, DeviceSpec, measure_device
from .sweep import OK, OUT_OF_BUDGET, SweepResult, is_out_of_memory, sweep
from .timing import (
    Timing,
    benchmark,
    best_of_rounds,
    cpu_threads,
    format_seconds,
    synchronize,
)

__all__ = [
    "DEVICES",
    "OK",
    "OUT_OF_BUDGET",
    "DeviceSpec",
    "FlopCount",
    "MemoryUsage",
    "LineFit",
    "PowerLawFit",
    "SweepResult",
    "Timing",
    "attention_flops",
    "benchmark",
    "best_of_rounds",
    "cpu_threads",
    "fit_exponent",
    "fit_line",
    "format_bytes",
    "format_flops",
    "format_seconds",
    "is_out_of_memory",
    "matmul_flops",
    "measure_device",
    "measure_flops",
    "peak_memory",
    "plot_kv_cache",
    "plot_memory",
    "plot_roofline",
    "plot_scaling",
    "remeasured",
    "sweep",
    "synchronize",
    "tensor_bytes",
]
