"""effarch_kernels: Triton GPU kernels behind effarch's fast paths.

This folder of the repository installs under the import name ``effarch_kernels`` (the
PyPI name ``kernels`` belongs to another project). One file per method, each with its
launcher. ``effarch`` never imports this package at import time, only inside the
functions that dispatch to a kernel, so effarch works without Triton or a GPU.
"""

__all__: list[str] = []
