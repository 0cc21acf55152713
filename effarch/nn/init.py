"""Initialisations shared by the selective layers."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive_int, check_positive_number


def init_dt_bias(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    r"""Mamba's step-size bias, ``[n]`` float32.

    ``dt ~ exp(U(log dt_min, log dt_max))`` (log-uniform), clamped below at ``floor``, and
    returned as ``softplus^{-1}(dt) = dt + log(1 - exp(-dt))`` so that
    ``softplus(bias) = dt`` at initialisation: mamba_ssm's ``dt_proj.bias`` of ``Mamba`` and
    ``dt_bias`` of ``Mamba2``, and fla's ``dt_bias`` of ``GatedDeltaNet``.
    """
    check_positive_int("n", n)
    check_positive_number("dt_min", dt_min)
    check_positive_number("dt_max", dt_max)
    check_positive_number("floor", floor)
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be at most dt_max ({dt_max}), got {dt_min}")
    log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))
