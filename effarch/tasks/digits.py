"""Small images every machine has: scikit-learn's bundled 8x8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 images of 8 x 8 pixels with 17 grey values
(0..16, the count of set pixels in a 4 x 4 block of a 32 x 32 bitmap) and their labels
0..9, inside the package: no download. Chapters 7.3 (a multimodal diffusion model) and 8
(vision models) use them through this module.

* :func:`load_digits`: the images as floats in [0, 1] or as ``levels`` grey-level tokens;
* :func:`quantize`: grey values 0..16 to ``levels`` tokens;
* :func:`digits_split`: a fixed train / held-out split;
* :data:`DIGIT_NAMES`: the label's English name, the text of chapter 7.3's pairs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .._checks import check_positive_int, check_tensor

__all__ = ["DIGIT_NAMES", "digits_split", "load_digits", "quantize"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The name of each label 0..9."""

MAX_VALUE = 16
"""The largest grey value of the bundled images."""


@functools.cache
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # an optional dependency: the book's and tests' extras
        raise ImportError(
            "the 8x8 digits come with scikit-learn: pip install scikit-learn (or effarch[book])"
        ) from err
    data = sk_load_digits()
    return data.images.astype(np.int64), data.target.astype(np.int64)


def quantize(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Grey values ``0..16`` (any shape, int64) to tokens ``0..levels-1``.

    ``token = floor(v * levels / 17)``: equal bins over the 17 values (for ``levels = 4``:
    0-4, 5-8, 9-12, 13-16).
    """
    check_tensor("values", values, dtypes=(torch.long,))
    check_positive_int("levels", levels)
    if not 2 <= levels <= MAX_VALUE + 1:
        raise ValueError(f"levels must lie in [2, {MAX_VALUE + 1}], got {levels}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > MAX_VALUE):
        raise ValueError(
            f"values must be grey values in [0, {MAX_VALUE}], got [{int(values.min())}, "
            f"{int(values.max())}]"
        )
    return values * levels // (MAX_VALUE + 1)


def load_digits(levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images and their labels.

    Returns:
        ``images [N, 8, 8]``: float32 in [0, 1] (``v / 16``) when ``levels`` is None, else
        int64 tokens ``0..levels-1`` (:func:`quantize`); ``labels [N]`` int64 in 0..9.
    """
    images, labels = _raw()
    values = torch.from_numpy(images.copy())
    out = values.float() / MAX_VALUE if levels is None else quantize(values, levels)
    return out, torch.from_numpy(labels.copy())


def digits_split(n_heldout: int = 297, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, heldout)`` into :func:`load_digits`: a fixed random permutation
    (``seed``), its last ``n_heldout`` held out (the default leaves 1500 for training)."""
    n = len(_raw()[1])
    check_positive_int("n_heldout", n_heldout)
    if n_heldout >= n:
        raise ValueError(f"n_heldout must be below the {n} images, got {n_heldout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - n_heldout], perm[n - n_heldout :]
