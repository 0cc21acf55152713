"""The generic scan: :func:`memory_scan` runs any rule of the registry with one readable
loop, the reference every specialised op is checked against."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_bool, check_choice, check_like, check_linear_qkv, check_tensor
from ..linear.common import compute_dtype, from_heads, heads, resolve_scale
from .rule import Tensor, UpdateRule
from .rules import RULES

__all__ = ["memory_scan"]


# --------------------------------------------------------------------------------------------
# The generic scan
# --------------------------------------------------------------------------------------------


def _to_dtype(state: Any, dtype: torch.dtype) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(dtype)
    return tuple(_to_dtype(s, dtype) for s in state)


def _check_initial_state(rule: UpdateRule, state: Any, dims: dict[str, int], q: Tensor) -> None:
    """Check ``initial_state`` against ``rule.state_layout``: one tensor or a tuple (or list)
    of tensors of those shapes, floating, on the device of ``q``; a letter that is not a
    dimension of ``q, k, v`` is a free size, the same in every entry."""
    layout = rule.state_layout
    layouts = (layout,) if isinstance(layout, str) else layout
    if isinstance(layout, str):
        if not isinstance(state, Tensor):
            raise TypeError(
                f"initial_state of rule {rule.key!r} must be a torch.Tensor {layout} or None, "
                f"got {type(state).__name__}"
            )
        entries = [("initial_state", state)]
    else:
        if not isinstance(state, (tuple, list)) or len(state) != len(layout):
            got = type(state).__name__
            if isinstance(state, (tuple, list)):
                got += f" of {len(state)}"
            raise TypeError(
                f"initial_state of rule {rule.key!r} must be a tuple of {len(layout)} tensors "
                f"({', '.join(layout)}) or None, got {got}"
            )
        entries = [(f"initial_state[{i}]", x) for i, x in enumerate(state)]
    free: dict[str, int] = {}
    for (name, x), lay in zip(entries, layouts, strict=True):
        letters = lay.strip("[]").split(", ")
        check_tensor(name, x, ndim=len(letters), floating=True)
        for letter, size in zip(letters, x.shape, strict=True):
            if letter not in dims:
                free.setdefault(letter, size)
        shape = tuple(dims[c] if c in dims else free[c] for c in letters)
        check_like(name, x, shape, lay, q)


def memory_scan(
    rule: UpdateRule | str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    **inputs: Tensor,
) -> tuple[Tensor, Any]:
    r"""Run any update rule one token at a time: the whole unified view in one loop.

    For ``t = 1..T``, per batch element and head::

        S_t = rule.step(S_{t-1}; k_t, v_t, inputs_t)
        o_t = rule.read(S_t; scale q_t)

    Args:
        rule: an :class:`UpdateRule` or its key in :data:`RULES`.
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        scale: multiplies ``q`` (rules with ``scaled=True``); default ``K ** -0.5``.
        initial_state: the memory to start from, in the format of the rule's specialised op,
            ``rule.state_layout``: a tensor ``[B, H, K, V]`` for the matrix memories, a tuple
            of tensors for TTT-MLP ``(W1 [B, H, K, F], W2 [B, H, F, V])``, Titans
            ``(M, U)`` and softmax attention (a cached prefix ``(K [B, P, H, K],
            V [B, P, H, V])``); any floating dtype, on the device of ``q``. A TypeError or
            ValueError names what does not fit.
        output_final_state: also return the memory after the last token, in that format.
        **inputs: the rule's per-step inputs (``rule.inputs`` lists them and their layouts).

    Returns:
        ``(o: [B, T, H, V], final_state or None)``. Half precision is computed in float32,
        float64 stays float64. This is a reference: ``O(T)`` Python steps; the specialised ops
        are the fast paths it is checked against.
    """
    if isinstance(rule, str):
        check_choice("rule", rule, tuple(RULES))
        rule = RULES[rule]
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule must be an UpdateRule or a key of RULES, got {type(rule).__name__}")
    b, t, h, dk, dv = check_linear_qkv(q, k, v)
    check_bool("output_final_state", output_final_state)
    missing = sorted(set(rule.inputs) - set(inputs))
    extra = sorted(set(inputs) - set(rule.inputs))
    if missing or extra:
        raise ValueError(
            f"rule {rule.key!r} takes the inputs {sorted(rule.inputs)}; missing {missing}, "
            f"unexpected {extra}"
        )
    if initial_state is not None:
        _check_initial_state(rule, initial_state, {"B": b, "H": h, "K": dk, "V": dv}, q)
    dims = {"B": b, "T": t, "H": h, "K": dk, "V": dv}
    dtype = compute_dtype(q.dtype)
    per_step: dict[str, Tensor] = {}
    constant: dict[str, Tensor] = {}
    for name, layout in rule.inputs.items():
        shape = tuple(dims[c] for c in layout.strip("[]").split(", "))
        check_like(name, inputs[name], shape, layout, q)
        if layout.startswith("[B, T"):
            per_step[name] = heads(inputs[name], dtype)  # [B, H, T, ...]
        else:
            constant[name] = inputs[name].to(dtype)
    scale = resolve_scale(scale, dk) if rule.scaled else 1.0
    qh, kh, vh = heads(q, dtype) * scale, heads(k, dtype), heads(v, dtype)
    if initial_state is None:
        memory = rule.init(b, h, dk, dv, qh)
    else:
        memory = rule.load(_to_dtype(initial_state, dtype), qh)
    outs = []
    for i in range(t):
        step_inputs = {**constant, **{n: x[:, :, i] for n, x in per_step.items()}}
        memory = rule.step(memory, kh[:, :, i], vh[:, :, i], step_inputs, i)
        outs.append(rule.read(memory, qh[:, :, i]))
    o = torch.stack(outs, dim=2)
    return from_heads(o, q), (rule.export(memory) if output_final_state else None)
