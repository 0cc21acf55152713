r"""Patch embedding, token mixers over a 2-D grid, and a tiny image classifier (8.1).

:class:`PatchEmbed` cuts an image into ``p x p`` patches and projects each (ViT, Vim and
VMamba all start so). :class:`GridMixer` mixes the ``h x w`` grid of tokens by one of the
``SCANS``:

* ``"attention"``: bidirectional softmax attention over all ``h w`` tokens (ViT), ``O(N^2)``;
* ``"raster"``, ``"snake"``, ``"column"``, ``"column_snake"``: one causal Mamba-2 read in
  that order (:func:`~effarch.vision.scan_order`), ``O(N)``;
* ``"bidirectional"``: Vision Mamba: one Mamba-2 reads the raster order forwards, another
  backwards, outputs added;
* ``"cross"``: VMamba's SS2D: four Mamba-2 over :func:`~effarch.vision.cross_scan`'s four
  orders, merged by :func:`~effarch.vision.cross_merge`;
* ``"vrwkv"``: Vision-RWKV: :func:`~effarch.vision.q_shift` with a learned ``mu``, then an
  RWKV-7 recurrence forwards and another backwards (its Bi-WKV reads both sides too).

:class:`VisionClassifier` stacks pre-norm blocks ``x + mixer(norm(x))``, ``x + MLP(norm(x))``,
averages the tokens and classifies; :func:`vision_classifier` builds one at about a given
number of parameters, so that different mixers are compared at matched size.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from .._checks import check_choice, check_positive_int, check_tensor
from ..attention import MultiHeadAttention
from ..linear.layers import RWKV7
from ..nn import SwiGLU
from ..ssm.layers import Mamba2
from .scans import SCAN_ORDERS, cross_merge, cross_scan, from_sequence, q_shift, to_sequence

__all__ = ["SCANS", "GridMixer", "PatchEmbed", "VisionClassifier", "vision_classifier"]

SCANS = ("attention", *SCAN_ORDERS, "bidirectional", "cross", "vrwkv")
"""The ways :class:`GridMixer` mixes a grid (module docstring)."""


class PatchEmbed(nn.Module):
    """``images [B, C, H, W] -> tokens [B, H/p, W/p, D]``: each ``p x p`` patch flattened
    (``c, i, j`` order) and projected, plus a learned position embedding per grid cell
    (timm's ``PatchEmbed``: a ``Conv2d`` of kernel and stride ``p``, the same map)."""

    def __init__(self, image_size: int, patch: int, in_chans: int, d_model: int) -> None:
        super().__init__()
        for name, val in (("image_size", image_size), ("patch", patch),
                          ("in_chans", in_chans), ("d_model", d_model)):  # fmt: skip
            check_positive_int(name, val)
        if image_size % patch:
            raise ValueError(f"patch ({patch}) must divide image_size ({image_size})")
        self.patch, self.grid = patch, image_size // patch
        self.proj = nn.Linear(in_chans * patch * patch, d_model)
        self.pos = nn.Parameter(torch.randn(self.grid, self.grid, d_model) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor("images", images, ndim=4, floating=True)
        p = self.patch
        patches = rearrange(images, "b c (h i) (w j) -> b h w (c i j)", i=p, j=p)
        return self.proj(patches) + self.pos


def _run(mixer: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    out = mixer(seq)
    return out[0] if isinstance(out, tuple) else out  # recurrent mixers return (y, state)


def _mamba2(d_model: int) -> nn.Module:
    return Mamba2(d_model, d_state=16, headdim=8, expand=2)  # d_model: a multiple of 4


class GridMixer(nn.Module):
    """Mix ``x [B, h, w, D]`` by ``scan`` (one of :data:`SCANS`); returns ``[B, h, w, D]``."""

    def __init__(self, d_model: int, scan: str = "bidirectional", *, n_heads: int = 2) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        self.scan = check_choice("scan", scan, SCANS)
        if scan == "attention":
            self.mixers = nn.ModuleList([MultiHeadAttention(d_model, n_heads, causal=False,
                                                            rope=False)])  # fmt: skip
        elif scan == "vrwkv":
            self.mu = nn.Parameter(torch.full((d_model,), 0.5))
            self.mixers = nn.ModuleList(RWKV7(d_model, n_heads) for _ in range(2))
        else:
            n = {"bidirectional": 2, "cross": 4}.get(scan, 1)
            self.mixers = nn.ModuleList(_mamba2(d_model) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        _, h, w, _ = x.shape
        if self.scan == "cross":
            seqs = cross_scan(x)  # [B, 4, N, D]
            ys = torch.stack([_run(m, seqs[:, i]) for i, m in enumerate(self.mixers)], 1)
            return cross_merge(ys, h, w)
        if self.scan in ("bidirectional", "vrwkv"):
            seq = to_sequence(q_shift(x, self.mu) if self.scan == "vrwkv" else x)
            fwd, bwd = self.mixers
            y = _run(fwd, seq) + _run(bwd, seq.flip(1)).flip(1)
            return from_sequence(y, h, w)
        order = "raster" if self.scan == "attention" else self.scan
        return from_sequence(_run(self.mixers[0], to_sequence(x, order)), h, w, order)


class VisionClassifier(nn.Module):
    """``images [B, C, H, W] -> logits [B, n_classes]``: :class:`PatchEmbed`, ``n_layers``
    pre-norm blocks (:class:`GridMixer`, then a SwiGLU MLP), mean over tokens, a linear head."""

    def __init__(self, scan: str, *, image_size: int = 8, patch: int = 1, in_chans: int = 1,
                 d_model: int = 32, n_layers: int = 2, n_classes: int = 10,
                 n_heads: int = 2) -> None:  # fmt: skip
        super().__init__()
        check_positive_int("n_layers", n_layers)
        self.embed = PatchEmbed(image_size, patch, in_chans, d_model)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.RMSNorm(d_model),
                           "mixer": GridMixer(d_model, scan, n_heads=n_heads),
                           "norm2": nn.RMSNorm(d_model), "mlp": SwiGLU(d_model, 2 * d_model)})
            for _ in range(n_layers)
        )  # fmt: skip
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for blk in self.blocks:
            x = x + blk["mixer"](blk["norm1"](x))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(self.norm(x).mean((1, 2)))


def vision_classifier(scan: str, params: int, *, step: int = 4, **kwargs: Any) -> VisionClassifier:
    """A :class:`VisionClassifier` whose width (a multiple of ``step``, from ``step`` to 512)
    gives the parameter count closest to ``params``: mixers compared at matched size."""
    check_positive_int("params", params)
    best = None
    for d in range(step, 513, step):
        model = VisionClassifier(scan, d_model=d, **kwargs)
        n = sum(p.numel() for p in model.parameters())
        if best is None or abs(n - params) < best[0]:
            best = (abs(n - params), model)
        if n > params:
            break
    return best[1]
