"""A stand-in that makes ``import triton`` fail, as on a machine without Triton (macOS,
Windows, a laptop). ``scripts/test.sh`` puts this folder first on ``PYTHONPATH`` for the
notebooks' run and the book build, which proves that every page works without Triton."""

raise ImportError("triton is not installed here (blocked by scripts/without_triton)")
