"""Argument checks shared by every public function, named by the convention they check.

Each check raises ``TypeError`` or ``ValueError`` whose message names the argument,
what was expected and what was received, so that a reader sees at once what to fix.

Checks run once, at the public boundary: a public function checks its arguments and then
calls internal functions (or the ``launch_*`` function of a kernel) that take them as
checked. The conventions are those of the libraries the book follows: attention as
flash-attn (:func:`check_attention_qkv`), linear-attention ops as flash-linear-attention
(:func:`check_linear_qkv`, :func:`check_like`, :func:`check_log_gate`), the selective scan
as mamba_ssm (:func:`check_selective_scan_args`, :func:`check_grouped`).
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


def check_same(
    names: Sequence[str], tensors: Sequence[torch.Tensor | None], *, dtype: bool = True
) -> None:
    """Check that tensors share the device of the first (and its dtype, unless
    ``dtype=False``); ``None`` entries (absent optional arguments) are skipped."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t is None:
            continue
        if dtype and t.dtype != first.dtype:
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


def check_token_ids(name: str, ids: Any, *, min_len: int = 2) -> torch.Tensor:
    """Check a sequence of token ids (``[T]`` or ``[1, T]`` int64, at least ``min_len``
    tokens); return it flattened to ``[T]``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    flat = ids.flatten()
    if ids.dtype != torch.long or flat.numel() < min_len or (ids.ndim == 2 and ids.shape[0] != 1):
        raise ValueError(
            f"{name} must be [T] or [1, T] int64 with at least {min_len} tokens, got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )
    return flat


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (not merely truthy); return it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
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


def check_sequences(name: str, x: Any, d_model: int, *, min_batch: int = 1) -> torch.Tensor:
    """Check a batch of sequences ``[B, T, d_model]``: floating, ``T >= 1`` and
    ``B >= min_batch``; return it."""
    check_tensor(name, x, ndim=3, floating=True)
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{name} must be [B, T, d_model] with d_model={d_model}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0 or x.shape[0] < min_batch:
        raise ValueError(
            f"{name} must hold at least one sequence and token (at least one time step), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def check_layer_input(x: Any, d_model: int, layer: Any = None) -> tuple[int, int]:
    """Check a token mixer's input ``x: [B, T, d_model]`` (:func:`check_sequences`, an empty
    batch allowed) and, given the ``layer`` (an ``nn.Module``), that ``x`` has the dtype and
    device of its parameters (outside autocast, where the dtypes may differ); return ``B, T``."""
    check_sequences("x", x, d_model, min_batch=0)
    p = next(layer.parameters(), None) if layer is not None else None
    if p is not None:
        name = type(layer).__name__
        if x.device != p.device:
            raise ValueError(
                f"x must be on the device of the {name} layer's parameters ({p.device}), "
                f"got {x.device}"
            )
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x must have the dtype of the {name} layer's parameters ({p.dtype}), got {x.dtype}"
            )
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


def check_heads(
    d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None
) -> tuple[int, int]:
    """Check the head layout of an attention layer; return ``(n_kv_heads, head_dim)``.

    ``n_kv_heads`` (default ``n_heads``) must divide ``n_heads``; ``head_dim`` defaults to
    ``d_model / n_heads``, which must then be whole."""
    check_positive_int("d_model", d_model)
    check_positive_int("n_heads", n_heads)
    g = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
    if n_heads % g:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({g})")
    if head_dim is None:
        head_dim = check_divides("d_model", d_model, "n_heads", n_heads)
    return g, check_positive_int("head_dim", head_dim)


# ---------------------------------------------------------------------------------------------
# Softmax attention: ``q [B, Tq, Hq, D]``, ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]``
# ---------------------------------------------------------------------------------------------


def check_attention_qkv(q: Any, k: Any, v: Any) -> None:
    """Check attention inputs in flash-attn's convention: ``q [B, Tq, Hq, D]``,
    ``k [B, Tk, Hkv, D]``, ``v [B, Tk, Hkv, Dv]`` of one dtype and device, with grouped-query
    heads (``Hq % Hkv == 0``); ``Tq != Tk`` and ``Dv != D`` are allowed."""
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    check_same(("q", "k", "v"), (q, k, v))
    b, _, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(
            f"q, k and v must share the batch size: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] != d:
        raise ValueError(
            f"k must have the head_dim of q ({d}) in dim 3, got shape {tuple(k.shape)}"
        )
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must match k in seq and heads: expected [{b}, {k.shape[1]}, {k.shape[2]}, *], "
            f"got {tuple(v.shape)}"
        )
    hkv = k.shape[2]
    if hq % hkv != 0:
        raise ValueError(
            f"the number of q heads ({hq}) must be a multiple of the number of k/v heads "
            f"({hkv}) for grouped-query attention"
        )


# ---------------------------------------------------------------------------------------------
# Linear attention ops: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, states ``[B, H, K, V]``
# ---------------------------------------------------------------------------------------------


def check_linear_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int]:
    """Check linear-attention inputs in flash-linear-attention's convention: ``q, k`` of one
    shape ``[B, T, H, K]`` and ``v [B, T, H, V]``, one dtype and device, ``T >= 1``; return
    ``B, T, H, K, V``."""
    check_tensor("q", q, ndim=4, floating=True)
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape != q.shape:
        raise ValueError(
            f"k must have the shape of q, [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        b, t, h = q.shape[:3]
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {b}, {t}, {h} as in q, got {tuple(v.shape)}"
        )
    if q.shape[1] == 0:
        raise ValueError(f"q must hold at least one time step, got shape {tuple(q.shape)}")
    b, t, h, dk = q.shape
    return b, t, h, dk, v.shape[3]


def check_like(
    name: str, x: Any, shape: tuple[int, ...], layout: str, ref: torch.Tensor
) -> torch.Tensor:
    """Check a floating tensor of an exact ``shape`` (described as ``layout``, e.g.
    ``"[B, T, H]"``) on the device of ``ref`` (the query); its dtype may differ."""
    check_tensor(name, x, floating=True)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of q ({ref.device}), got {x.device}")
    return x


def check_log_gate(
    name: str, g: Any, shape: tuple[int, ...], layout: str, ref: torch.Tensor
) -> torch.Tensor:
    """Check a log-space decay as :func:`check_like`, and that every entry is ``<= 0`` (the
    decay ``exp(g)`` lies in ``(0, 1]``)."""
    check_like(name, g, shape, layout, ref)
    if g.numel() and bool((g > 0).any()):
        raise ValueError(
            f"{name} holds log decays, which must be <= 0 (the decay exp({name}) lies in "
            f"(0, 1]); got a largest value of {g.max().item():.6g}"
        )
    return g


# ---------------------------------------------------------------------------------------------
# State space models: channels last, ``B, C`` as ``[B, T, N]`` or grouped ``[B, T, G, N]``
# ---------------------------------------------------------------------------------------------


def check_grouped(
    name: str, x: Any, batch: int, length: int, channels: int, what: str
) -> torch.Tensor:
    """Check an SSM input matrix ``[B, T, N]`` or grouped ``[B, T, G, N]`` whose ``G``
    divides the number of ``what`` (``channels`` of them); return it as ``[B, T, G, N]``."""
    check_tensor(name, x, floating=True)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape [B, T, N] or [B, T, G, N], got {x.ndim} dimensions "
            f"(shape {tuple(x.shape)})"
        )
    if x.shape[0] != batch or x.shape[1] != length:
        raise ValueError(
            f"{name} must have batch and length [{batch}, {length}] in dims 0 and 1, "
            f"got shape {tuple(x.shape)}"
        )
    x = x if x.ndim == 4 else x.unsqueeze(2)
    groups = x.shape[2]
    if groups == 0 or channels % groups != 0:
        raise ValueError(
            f"the number of groups of {name} ({groups}) must divide the number of {what} "
            f"({channels}), got shape {tuple(x.shape)}"
        )
    return x


def _check_vector(name: str, x: Any, size: int, what: str) -> None:
    if x is None:
        return
    check_tensor(name, x, ndim=1, floating=True)
    if x.shape[0] != size:
        raise ValueError(f"{name} must have shape [{what}] = [{size}], got {tuple(x.shape)}")


def check_selective_scan_args(
    u: Any,
    delta: Any,
    A: Any,
    B: Any,
    C: Any,
    D: Any = None,
    z: Any = None,
    delta_bias: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the arguments of Mamba's selective scan in mamba_ssm's names, channels last:
    ``u, delta, z [B, T, D]``, ``A [D, N]``, ``B, C [B, T, N]`` or ``[B, T, G, N]``,
    ``D, delta_bias [D]``, all on one device (dtypes may differ). Return ``B`` and ``C`` as
    ``[B, T, G, N]`` (a group axis of size 1 added to ungrouped ones)."""
    check_tensor("u", u, ndim=3, floating=True)
    check_tensor("delta", delta, ndim=3, floating=True)
    check_tensor("A", A, ndim=2, floating=True)
    batch, length, dim = u.shape
    if delta.shape != u.shape:
        raise ValueError(
            f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}"
        )
    if A.shape[0] != dim:
        raise ValueError(
            f"A must have shape [D, N] with D = {dim} (channels of u), got {tuple(A.shape)}"
        )
    n_state = A.shape[1]
    Bg = check_grouped("B", B, batch, length, dim, "channels")
    Cg = check_grouped("C", C, batch, length, dim, "channels")
    for name, x in (("B", Bg), ("C", Cg)):
        if x.shape[3] != n_state:
            raise ValueError(
                f"{name} must have the state size N = {n_state} of A in its last dim, "
                f"got shape {tuple(x.shape)}"
            )
    _check_vector("D", D, dim, "D")
    _check_vector("delta_bias", delta_bias, dim, "D")
    if z is not None:
        check_tensor("z", z, ndim=3, floating=True)
        if z.shape != u.shape:
            raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")
    check_same(
        ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
        (u, delta, A, B, C, D, z, delta_bias),
        dtype=False,
    )
    return Bg, Cg


def check_initial_state(initial_state: object, u: torch.Tensor, A: torch.Tensor) -> None:
    """The ``initial_state`` of a selective scan: a floating ``[B, D, N]`` tensor on ``u``'s
    device (``u [B, T, D]``, ``A [D, N]``); a TypeError or ValueError names what is wrong."""
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(
            f"initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}"
        )
    expected = (u.shape[0], u.shape[2], A.shape[1])
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must have shape [B, D, N] = {expected}, "
            f"got {tuple(initial_state.shape)}"
        )
    if not initial_state.is_floating_point():
        raise TypeError(f"initial_state must be a floating tensor, got {initial_state.dtype}")
    if initial_state.device != u.device:
        raise ValueError(
            f"initial_state must be on u's device {u.device}, got {initial_state.device}"
        )
