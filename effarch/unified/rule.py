"""One row of the unified table: :class:`UpdateRule`, a memory with its update, read,
class, objective, costs and the specialised implementation it must agree with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CLASSES", "Inputs", "Tensor", "UpdateRule"]

CLASSES = ("linear", "bilinear", "nonlinear", "windowed", "unbounded")

Tensor = torch.Tensor
Inputs = Mapping[str, Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """One row of the unified table: a memory, how it is written and read, what it costs.

    Attributes:
        key: the registry key.
        name: the method's name.
        cls: ``"linear"``, ``"bilinear"``, ``"nonlinear"``, ``"windowed"`` (a bounded cache of
            the last w pairs) or ``"unbounded"``.
        update: the update equation, LaTeX, in the package's ``S: [K, V]`` convention.
        objective: the loss of which ``update`` is one gradient step (the optimiser view).
        state: the memory per head, as a formula in ``d_k, d_v, t``.
        train: the cost of a length-``T`` sequence.
        decode: the cost of one decoded token.
        inputs: the per-step inputs besides ``q, k, v`` and their layout (``"[B, T, H]"``,
            ``"[B, T, H, K]"`` or ``"[H]"`` for a constant per head).
        init: ``(b, h, dk, dv, like) -> memory``: the empty memory.
        state_layout: the layout of the op's initial and final state: one tensor
            (``"[B, H, K, V]"`` for the matrix memories) or a tuple of layouts for a tuple of
            tensors; a letter other than ``B, H, K, V`` (``F``, ``P``) is a free size, the
            same in every entry. :func:`~effarch.unified.memory_scan` checks ``initial_state``
            against it.
        load: ``(initial_state, like) -> memory``: a memory from an op's initial state.
        step: ``(memory, k_t, v_t, inputs_t, t) -> memory``; tensors ``[B, H, ...]``.
        read: ``(memory, scaled q_t) -> o_t`` (``[B, H, V]``).
        export: ``memory -> final_state``, in the specialised op's format.
        specialised: ``(q, k, v, scale, initial_state, **inputs) -> (o, final_state)``: the
            implementation from the rest of the package this rule is checked against.
        sample: ``(b, t, h, dk, dv, generator, dtype) -> (q, k, v, inputs, initial_state)``:
            inputs in the rule's regime (normalised keys for the delta rules, gates <= 0...).
        state_elements: ``(dk, dv, t) -> int``, memory entries per head after ``t`` tokens.
        scaled: whether the query is multiplied by ``scale`` (default ``K ** -0.5``);
            Mamba-2 reads its memory with ``C_t`` as it is.
        note: a caveat shown under the table.
        cite: the bibliography key of the method.
    """

    key: str
    name: str
    cls: str
    update: str
    objective: str
    state: str
    train: str
    decode: str
    inputs: Mapping[str, str]
    init: Callable[[int, int, int, int, Tensor], Any]
    step: Callable[[Any, Tensor, Tensor, Inputs, int], Any]
    read: Callable[[Any, Tensor], Tensor]
    specialised: Callable[..., tuple[Tensor, Any]]
    sample: Callable[..., tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Any]]
    state_elements: Callable[[int, int, int], int]
    state_layout: str | tuple[str, ...] = "[B, H, K, V]"
    load: Callable[[Any, Tensor], Any] = field(default=lambda s, like: s.to(like.dtype))
    export: Callable[[Any], Any] = field(default=lambda s: s)
    scaled: bool = True
    note: str = ""
    cite: str = ""
