"""TF32 rounding and the three ways a GPU kernel can take a float32 matrix product, emulated
in PyTorch: the tests of kernels that ask for ``input_precision="tf32x3"`` compare them."""

import torch


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 mantissa bits, to nearest) as the tensor cores read it."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as three TF32 products: ``a_hi b_lo + a_lo b_hi + a_hi b_hi`` with
    ``x_hi = tf32(x)`` and ``x_lo = tf32(x - x_hi)`` (``a_lo b_lo`` is dropped)."""
    ah, bh = tf32(a), tf32(b)
    return ah @ tf32(b - bh) + tf32(a - ah) @ bh + ah @ bh


PRODUCTS = {
    "float32": lambda a, b: a @ b,
    "tf32": lambda a, b: tf32(a) @ tf32(b),  # the tensor cores' default for float32 inputs
    "tf32x3": tf32x3,
}
