"""effarch_kernels: Triton GPU kernels behind effarch's fast paths.

This folder of the repository installs under the import name ``effarch_kernels`` (the
PyPI name ``kernels`` belongs to another project). One file per method, each with its
launcher, plus two shared modules: ``limits`` (what the kernels support and whether the
interpreter is on; plain Python, importable without Triton) and ``common`` (the interpreter
check and its bfloat16 cast, used by every launcher). ``effarch`` imports a kernel module
only inside the function that dispatches to it, so effarch works without Triton or a GPU;
this package never imports ``effarch``, and importing it imports nothing.
"""

__all__: list[str] = []
