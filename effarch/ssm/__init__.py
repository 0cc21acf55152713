"""State space models (survey section 2.3): S4/S4D discretisation and convolution,
Mamba's selective scan, and Mamba-2's state space duality (SSD)."""

from .layers import S4D, Mamba, Mamba2
from .s4 import discretize, fft_conv, s4d_init, ssm_kernel, ssm_recurrence
from .scan_kernel import selective_scan_kernel
from .selective import selective_scan
from .ssd import segsum, ssd, ssd_matrix, ssd_recurrent

__all__ = [
    "S4D",
    "Mamba",
    "Mamba2",
    "discretize",
    "fft_conv",
    "s4d_init",
    "segsum",
    "selective_scan",
    "selective_scan_kernel",
    "ssd",
    "ssd_matrix",
    "ssd_recurrent",
    "ssm_kernel",
    "ssm_recurrence",
]
