r"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2022).

:class:`LoRALinear` wraps an ``nn.Linear`` ``W: [out, in]`` and adds ``(alpha / r) B A`` with
``A: [r, in]`` (small random) and ``B: [out, r]`` (zeros), so the wrapped layer starts out
equal to the original and trains only ``r (in + out)`` numbers. :func:`add_lora` wraps a
module's linear layers by name, in place. Linearization's fine-tuning stage
(:func:`effarch.experiments.low_rank_finetune`) uses it on attention projections; nothing here
is specific to attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_positive_int, check_positive_number

__all__ = ["ATTENTION_PROJECTIONS", "LoRALinear", "add_lora"]

#: The projections of the attention layers of this package (and of ``transformers``' LLaMA):
#: :func:`add_lora`'s default targets.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update (LoRA, Hu et al., 2022).

    ``y = base(x) + (alpha / r) (x A^T) B^T`` with ``A: [r, in]`` (small random) and
    ``B: [out, r]`` (zeros), so the wrapped layer starts out equal to ``base``. Only ``A`` and
    ``B`` are trained: ``r (in + out)`` parameters instead of ``in * out``.

    Args:
        base: the linear layer to adapt (its parameters are frozen).
        rank: ``r``.
        alpha: scale numerator (default ``r``, i.e. scale 1).

    ``forward(x [..., in]) -> [..., out]``; ``weight`` is the effective ``W + (alpha / r) B A``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_positive_int("rank", rank)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank must be at most min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}, got {rank}"
            )
        check_positive_number("alpha", alpha, allow_none=True)
        self.base, self.rank = base, rank
        self.scaling = (rank if alpha is None else float(alpha)) / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(
            torch.randn(rank, base.in_features, dtype=w.dtype, device=w.device)
            * base.in_features**-0.5
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + (alpha / r) B A``."""
        return self.base.weight + self.scaling * self.lora_b @ self.lora_a

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_a.T) @ self.lora_b.T

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def add_lora(
    module: nn.Module,
    rank: int,
    *,
    targets: Sequence[str] = ATTENTION_PROJECTIONS,
    alpha: float | None = None,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Wrap ``module``'s linear layers named in ``targets`` in :class:`LoRALinear`, in place.

    Args:
        module: the module whose ``nn.Linear`` attributes are adapted.
        rank: ``r`` of every adapter.
        targets: attribute names of ``module``; by default the four projections of the
            attention layers of this package (:data:`ATTENTION_PROJECTIONS`).
        alpha: scale numerator of every adapter (default ``r``).
        seed: the adapters' random ``A`` are drawn from it (the global RNG is left as it was).

    Returns:
        The new trainable parameters (``A`` and ``B`` of each adapter). Layers already
        wrapped are left as they are (their adapters are returned).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_positive_int("rank", rank)
    check_positive_int("seed", seed, allow_zero=True)
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise TypeError(f"targets must be a non-empty sequence of names, got {targets!r}")
    params: list[nn.Parameter] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in targets:
            sub = getattr(module, name, None) if isinstance(name, str) else None
            if isinstance(sub, LoRALinear):
                params += [sub.lora_a, sub.lora_b]
                continue
            if not isinstance(sub, nn.Linear):
                raise ValueError(
                    f"targets must name nn.Linear attributes of the module; {name!r} is "
                    f"{type(sub).__name__}"
                )
            adapted = LoRALinear(sub, rank, alpha)
            setattr(module, name, adapted)
            params += [adapted.lora_a, adapted.lora_b]
    return params
