r"""Turning a trained autoregressive model into a diffusion model (DiffuLLaMA; chapter 7.2).

Gong et al. (2025) start a masked diffusion model from an AR model's weights instead of from
scratch, with two changes that let the weights keep their meaning:

* **Shift.** The AR model's output at position ``i - 1`` predicts token ``i``. The adapted
  model keeps that: it reads ``[BOS, x_t]`` and the logits at position ``i - 1`` predict
  the clean token ``x_0^i`` (:class:`ShiftedDenoiser`).
* **Attention-mask annealing.** The AR model has only ever seen the past. Training starts
  with the causal mask and lets each query see a growing random share of the future
  (:func:`annealed_mask`, ``progress`` from 0 to 1), until attention is fully bidirectional.

The diffusion loss and sampler need nothing else: a :class:`ShiftedDenoiser` maps ``x_t``
to logits for ``x_0`` like any denoiser.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .._checks import check_positive_int, check_tensor
from ..sparse import MaskMod
from .model import DiffusionLM

__all__ = ["ShiftedDenoiser", "annealed_mask", "from_autoregressive"]


def annealed_mask(progress: float, *, seed: int = 0) -> MaskMod:
    """Causal, plus each future key with probability ``progress`` (fixed per pair).

    ``kv_idx <= q_idx`` or ``h(q_idx, kv_idx) < progress``, with ``h`` a hash of the pair into
    [0, 1) fixed by ``seed``: the same pairs open as ``progress`` grows, and ``progress = 1``
    is full attention.
    """
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise TypeError(f"progress must be a number, got {type(progress).__name__}")
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    check_positive_int("seed", seed, allow_zero=True)
    salt = (seed + 1) * 0x9E3779B1 % 2**31

    def mask_mod(b, h, q_idx, kv_idx):
        key = (q_idx * 73856093) ^ (kv_idx * 19349663) ^ salt
        key = (key * 2654435761) % 2**32
        return (kv_idx <= q_idx) | (key.double() / 2**32 < progress)

    return mask_mod


class ShiftedDenoiser(nn.Module):
    """A denoiser whose logits for token ``i`` come from position ``i - 1`` (the AR shift).

    ``forward(x_t [B, L]) -> [B, L, V]``: runs ``model`` on ``[BOS, x_t]`` under
    ``self.mask_mod`` (``None``: full attention) and drops the last position's logits.
    """

    def __init__(self, model: DiffusionLM, bos_id: int) -> None:
        super().__init__()
        if not isinstance(model, DiffusionLM):
            raise TypeError(f"model must be a DiffusionLM, got {type(model).__name__}")
        check_positive_int("bos_id", bos_id, allow_zero=True)
        self.model, self.bos_id = model, bos_id
        self.mask_mod: MaskMod | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=2, dtypes=(torch.long,))
        bos = torch.full((x.shape[0], 1), self.bos_id, dtype=torch.long, device=x.device)
        return self.model(torch.cat([bos, x], 1), mask_mod=self.mask_mod)[:, :-1]


def from_autoregressive(ar: DiffusionLM, bos_id: int) -> ShiftedDenoiser:
    """A bidirectional copy of a causal :class:`DiffusionLM`, wrapped to keep its shift.

    The weights are copied (the AR model is unchanged); the copy starts with the causal mask
    (``annealed_mask(0)``) so that, before any training, it computes exactly what the AR
    model computed.
    """
    if not isinstance(ar, DiffusionLM) or not ar.cfg.causal:
        raise TypeError("ar must be a causal DiffusionLM (an autoregressive model)")
    bi = DiffusionLM(replace(ar.cfg, causal=False)).to(ar.embed_tokens.weight)
    bi.load_state_dict(ar.state_dict())
    out = ShiftedDenoiser(bi, bos_id)
    out.mask_mod = annealed_mask(0.0)
    return out
