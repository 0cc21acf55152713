"""Argument checks shared by every public function.

Each check raises ``TypeError`` or ``ValueError`` whose message names the argument,
what was expected and what was received, so that a reader sees at once what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    floating: bool = False,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given rank and dtype; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got {x.ndim} (shape {tuple(x.shape)})"
        )
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {x.dtype}")
    return x


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Check that tensors share dtype and device."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on the device of {first_name} ({first.device}), got {t.device}"
            )


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is a positive (or non-negative) integer; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    low = 0 if allow_zero else 1
    if value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value}")
    return value


def check_positive_number(
    name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False
) -> float | None:
    """Check that ``value`` is a finite positive number (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return float(value)


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """Check that ``value`` can be called."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__} ({value!r})")
    return value


def check_sizes(name: str, sizes: Any) -> list[int]:
    """Check a non-empty sequence of positive ints (e.g. sequence lengths); return a list."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(sizes).__name__}")
    if len(sizes) == 0:
        raise ValueError(f"{name} must not be empty")
    return [check_positive_int(f"{name}[{i}]", s) for i, s in enumerate(sizes)]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Token-mixing layers: ``y, state = layer(x [B, T, d_model], state)``
# ---------------------------------------------------------------------------------------------

State = dict[str, Any]
"""A layer's decode state: the ``dict`` of tensors its ``forward`` returns and takes back."""


def check_layer_input(x: Any, d_model: int) -> tuple[int, int]:
    """Check a layer's input ``x: [B, T, d_model]`` (floating, ``T >= 1``); return ``B, T``."""
    check_tensor("x", x, ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"x must be [B, T, d_model] with d_model = {d_model}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"x must hold at least one time step, got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def check_layer_state(state: Any, expected: Mapping[str, tuple[int, ...]], layer: str) -> State:
    """Check a layer's decode state: ``None`` (a new sequence, returns ``{}``) or a dict with
    every key of ``expected`` holding a tensor of that shape; return a copy."""
    if state is None:
        return {}
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be None or the dict returned by {layer}.forward, "
            f"got {type(state).__name__}"
        )
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(
            f"state of {layer} must hold the keys {sorted(expected)}, missing {missing}"
        )
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"state[{key!r}] of {layer} must have shape {shape}, got {tuple(value.shape)}"
            )
    return dict(state)


def check_divides(name: str, total: int, parts_name: str, parts: int) -> int:
    """Check that ``parts`` divides ``total`` (e.g. heads divide ``d_model``); return the
    quotient."""
    if total % parts:
        raise ValueError(f"{name} ({total}) must be divisible by {parts_name} ({parts})")
    return total // parts
