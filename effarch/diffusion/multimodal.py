r"""One masked diffusion model over several modalities (7.3): MMaDA and UniDisc in miniature.

Image and text become tokens of one vocabulary and one sequence, ``[text | image]``, and one
bidirectional model denoises it. What is masked decides the task: mask the text and the
model captions the image; mask the image and it draws the text; mask both and it generates
the pair; mask half the image and it inpaints. :func:`~effarch.diffusion.infill` samples
all of them.

Training masks each modality (a ``segment`` of the sequence) with its own noise level::

    t_m ~ U(eps, 1) per row and segment m        # one shared t with independent=False
    x_t: each token of segment m masked with probability t_m
    loss = (1 / (B L)) sum_m sum_{masked i in m} w(t_m) CE_i,   w(t) = 1 / t (linear)

With one shared ``t`` this is :func:`~effarch.diffusion.masked_diffusion_loss` on the joint
sequence, the ELBO of the joint distribution (UniDisc; MMaDA instead masks one modality per
task). Independent levels (as UniDiffuser does for continuous diffusion) put weight on
the ends that the conditional tasks use: at ``t_image -> 0`` the text term is the
masked-diffusion ELBO of ``p(text | image)``, at ``t_text -> 0`` the image term that of
``p(image | text)``; the shared level almost never draws a row that masks one modality
fully and the other not at all.

:class:`PerPositionVocab` restricts each position to its modality's tokens at sampling time
(grey levels in the image, letters in the text), as UniDisc restricts each position to its
modality's range of the shared vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_bool, check_tensor
from .process import forward_process, logits_of, masked_diffusion_loss

__all__ = ["PerPositionVocab", "joint_diffusion_loss"]


def _check_segments(segments: Any, length: int) -> list[tuple[int, int]]:
    try:
        segs = [(int(lo), int(hi)) for lo, hi in segments]
    except (TypeError, ValueError) as err:
        raise TypeError(f"segments must be (start, stop) pairs, got {segments!r}") from err
    ends = [0] + [hi for _, hi in segs]
    if not segs or any(lo != e or hi <= lo for (lo, hi), e in zip(segs, ends, strict=False)):
        raise ValueError(
            f"segments must tile [0, L) in order with non-empty parts, got {segs} for L = {length}"
        )
    if segs[-1][1] != length:
        raise ValueError(f"segments must end at L = {length}, got {segs}")
    return segs


def joint_diffusion_loss(
    model: Callable[[torch.Tensor], Any],
    x0: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    mask_id: int,
    *,
    independent: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The masked diffusion loss of a multimodal sequence, a noise level per modality.

    Args:
        model: ``[B, L] -> [B, L, V]`` logits (or ``.logits``), run once on the noisy joint
            sequence.
        x0: ``[B, L]`` int64 clean tokens, the modalities side by side.
        segments: ``[(0, L_1), (L_1, L_1 + L_2), ...]``, the modalities' spans, in order,
            covering ``[0, L)``.
        mask_id: the mask token.
        independent: draw ``t`` per row and segment (default); ``False``: one ``t`` per row
            for the whole sequence, the joint ELBO.
        generator: for the draws.

    Returns:
        The scalar loss ``(1 / (B L)) sum_m sum_{i in m, masked} CE_i / t_m`` (the module
        docstring), in nats per token.
    """
    check_tensor("x0", x0, ndim=2, dtypes=(torch.long,))
    check_bool("independent", independent)
    segs = _check_segments(segments, x0.shape[1])
    shared = None
    if not independent:
        u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64).to(x0.device)
        shared = ((1 - 1e-3) * u + 1e-3).float()
    parts = [forward_process(x0[:, lo:hi], mask_id, t=shared, generator=generator)
             for lo, hi in segs]  # fmt: skip
    logits = logits_of(model(torch.cat([xt for xt, _, _ in parts], 1)))
    total = sum(
        (hi - lo) * masked_diffusion_loss(logits[:, lo:hi], x0[:, lo:hi], masked, t)
        for (lo, hi), (_, masked, t) in zip(segs, parts, strict=True)
    )
    return total / x0.shape[1]


class PerPositionVocab(nn.Module):
    """``model`` with each position's logits restricted to the tokens it may hold.

    ``forward(x [B, L]) -> [B, L, V]``: ``model(x)`` with ``-inf`` wherever
    ``allowed [L, V]`` is False, so a sampler proposes grey levels in the image and letters
    in the text. A trained model puts almost no mass there anyway; the restriction makes
    sampling from an undertrained one well defined.
    """

    def __init__(self, model: nn.Module, allowed: torch.Tensor) -> None:
        super().__init__()
        check_tensor("allowed", allowed, ndim=2, dtypes=(torch.bool,))
        if not bool(allowed.any(1).all()):
            raise ValueError("allowed must leave every position at least one token")
        self.model = model
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self.model(x))
        if logits.shape[1:] != self.allowed.shape:
            raise ValueError(
                f"allowed must be [L, V] = {tuple(logits.shape[1:])} for these logits, got "
                f"{tuple(self.allowed.shape)}"
            )
        return logits.masked_fill(~self.allowed, float("-inf"))
