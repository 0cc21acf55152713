"""A 2-D task where the scan order matters: find a line of ``length`` set pixels.

Each ``size x size`` binary image holds random noise (each pixel set with probability
``noise``) and one planted segment of ``length`` pixels, vertical or horizontal with equal
probability. The label says whether the image holds a *vertical* run of at least ``length``
set pixels (``axis="vertical"``) or a horizontal one (``axis="horizontal"``), computed
exactly from the pixels, noise included. A model that reads rows one after another meets
the pixels of a vertical line ``size`` steps apart; one that reads columns meets them in a
row. Chapter 8.1 trains the same mixer in several scan orders on it.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_positive_int, check_positive_number, check_tensor

__all__ = ["longest_run", "planted_lines"]


def longest_run(images: torch.Tensor, axis: str = "vertical") -> torch.Tensor:
    """``images [N, H, W]`` bool -> ``[N]`` int64, the longest run of set pixels along
    ``axis`` (``"vertical"``: within a column; ``"horizontal"``: within a row).

    ``images`` must be 3-D (``ValueError`` otherwise): pass :func:`planted_lines`' images
    ``[N, 1, H, W]`` as ``images[:, 0]``."""
    check_tensor("images", images, ndim=3)
    check_choice("axis", axis, ("vertical", "horizontal"))
    x = images.bool()
    if axis == "vertical":
        x = x.transpose(1, 2)  # runs along the last dimension
    run = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    best = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for j in range(x.shape[2]):
        run = torch.where(x[:, :, j], run + 1, 0)
        best = torch.maximum(best, run.max(1).values)
    return best


def planted_lines(
    n: int,
    *,
    size: int = 8,
    length: int = 4,
    noise: float = 0.15,
    axis: str = "vertical",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [n, 1, size, size] float32 in {0, 1}, labels [n] int64)`` as in the module
    docstring: label 1 when a run of ``length`` along ``axis`` exists."""
    check_positive_int("n", n)
    check_positive_int("size", size)
    check_positive_int("length", length)
    if length > size:
        raise ValueError(f"length ({length}) must be at most size ({size})")
    if check_positive_number("noise", noise, allow_zero=True) >= 1:
        raise ValueError(f"noise must lie in [0, 1), got {noise}")
    check_choice("axis", axis, ("vertical", "horizontal"))
    img = torch.rand(n, size, size, generator=generator) < noise
    vertical = torch.rand(n, generator=generator) < 0.5
    fixed = torch.randint(size, (n,), generator=generator)  # the line's column or row
    start = torch.randint(size - length + 1, (n,), generator=generator)
    along = start[:, None] + torch.arange(length)  # [n, length]
    rows = torch.where(vertical[:, None], along, fixed[:, None].expand(-1, length))
    cols = torch.where(vertical[:, None], fixed[:, None].expand(-1, length), along)
    img[torch.arange(n)[:, None], rows, cols] = True
    labels = (longest_run(img, axis) >= length).long()
    return img[:, None].float(), labels
