"""State space models (survey section 2.3): S4/S4D discretisation and convolution,
Mamba's selective scan, and Mamba-2's state space duality (SSD).

Where each method lives, one hop from here:

* S4 / S4D: :mod:`.s4` (discretisation, the convolution kernel, FFT convolution, the
  recurrence); layer :class:`S4D` in :mod:`.layers`.
* Mamba's selective scan: :mod:`.selective` (the parallel-scan and recurrent PyTorch forms);
  fast path :mod:`.scan_kernel` (``effarch_kernels.selective_scan``); layer :class:`Mamba`.
* Mamba-2's SSD: :mod:`.ssd` (chunked block decomposition, the quadratic matrix form, the
  recurrence); layer :class:`Mamba2`.

The scans and ``segsum`` these build on are :mod:`effarch.scan`'s; the short convolution,
gated RMSNorm and step-size initialisation, :mod:`effarch.nn`'s.
"""

from ..scan import segsum  # one segsum for SSD and the linear-attention decays
from .layers import S4D, Mamba, Mamba2
from .s4 import discretize, fft_conv, s4d_init, ssm_kernel, ssm_powers, ssm_recurrence
from .scan_kernel import selective_scan_kernel
from .selective import selective_scan
from .ssd import ssd, ssd_matrix, ssd_recurrent

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
    "ssm_powers",
    "ssm_recurrence",
]
