r"""The unified view (survey section 2.5): every token mixer is a memory with an update rule.

Linear attention, its gated and delta-rule descendants, state space models and test-time
training all keep a memory ``S`` per head, *write* each token into it and *read* it with the
query. In this package's convention (``S: [K, V]``, the transpose of the survey's
``d_v x d_k``)::

    S_t = update(S_{t-1}; k_t, v_t, gates_t)        o_t = read(S_t; scale q_t)

They differ only in ``update``. The survey sorts the rules into three classes:

* **linear**: ``S_t = a_t * S_{t-1} + b_t k_t v_t^T`` with a decay ``a_t`` that does not look
  at the memory (linear attention, RetNet, GLA, Mamba-2, HGRN2);
* **bilinear**: ``S_t = (a_t I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``: the transition
  depends on the key, so the memory is corrected rather than accumulated (DeltaNet, Gated
  DeltaNet, RWKV-7, TTT-Linear);
* **nonlinear**: the memory is a nonlinear model trained online (TTT-MLP, Titans' deep memory);

and softmax attention is the **unbounded** baseline: a memory that keeps every ``(k, v)``.

:func:`memory_scan` is one readable loop that runs any rule of :data:`RULES`, the registry. Each
:class:`UpdateRule` carries its update equation, class, the objective its update is a
gradient step on, its state size and costs, and the specialised implementation elsewhere in
the package that it must agree with (the tests check every row). :func:`registry_table`
renders the chapter's table from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import check_choice
from .attention import naive_attention
from .linear.ops import (
    _check_flags,
    _check_like,
    _check_qkv,
    _compute_dtype,
    _heads,
    _out,
    _scale,
    delta_rule,
    dplr_delta_rule,
    gated_delta_rule,
    gla,
    linear_attention,
    retention,
    retention_log_decays,
)
from .linear.ttt import titans, ttt_linear, ttt_mlp
from .ssm import ssd

__all__ = ["CLASSES", "RULES", "UpdateRule", "memory_scan", "registry_table", "retention_curve"]

CLASSES = ("linear", "bilinear", "nonlinear", "unbounded")

Tensor = torch.Tensor
Inputs = Mapping[str, Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """One row of the unified table: a memory, how it is written and read, what it costs.

    Attributes:
        key: the registry key.
        name: the method's name.
        cls: ``"linear"``, ``"bilinear"``, ``"nonlinear"`` or ``"unbounded"``.
        update: the update equation, LaTeX, in the package's ``S: [K, V]`` convention.
        objective: the loss of which ``update`` is one gradient step (the optimiser view).
        state: the memory per head, as a formula in ``d_k, d_v, t``.
        train, decode: the cost of a length-``T`` sequence and of one decoded token.
        inputs: the per-step inputs besides ``q, k, v`` and their layout (``"[B, T, H]"``,
            ``"[B, T, H, K]"`` or ``"[H]"`` for a constant per head).
        init: ``(b, h, dk, dv, like) -> memory``: the empty memory.
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
    load: Callable[[Any, Tensor], Any] = field(default=lambda s, like: s.to(like.dtype))
    export: Callable[[Any], Any] = field(default=lambda s: s)
    scaled: bool = True
    note: str = ""
    cite: str = ""


# --------------------------------------------------------------------------------------------
# The generic scan
# --------------------------------------------------------------------------------------------


def _to_dtype(state: Any, dtype: torch.dtype) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(dtype)
    return tuple(_to_dtype(s, dtype) for s in state)


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
        initial_state: the memory to start from, in the format of the rule's specialised op
            (``[B, H, K, V]`` for the matrix memories).
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
    b, t, h, dk, dv = _check_qkv(q, k, v)
    _check_flags(output_final_state)
    missing = sorted(set(rule.inputs) - set(inputs))
    extra = sorted(set(inputs) - set(rule.inputs))
    if missing or extra:
        raise ValueError(
            f"rule {rule.key!r} takes the inputs {sorted(rule.inputs)}; missing {missing}, "
            f"unexpected {extra}"
        )
    dims = {"B": b, "T": t, "H": h, "K": dk, "V": dv}
    dtype = _compute_dtype(q.dtype)
    per_step: dict[str, Tensor] = {}
    constant: dict[str, Tensor] = {}
    for name, layout in rule.inputs.items():
        shape = tuple(dims[c] for c in layout.strip("[]").split(", "))
        _check_like(name, inputs[name], shape, layout, q)
        if layout.startswith("[B, T"):
            per_step[name] = _heads(inputs[name], dtype)  # [B, H, T, ...]
        else:
            constant[name] = inputs[name].to(dtype)
    scale = _scale(scale, dk) if rule.scaled else 1.0
    qh, kh, vh = _heads(q, dtype) * scale, _heads(k, dtype), _heads(v, dtype)
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
    return _out(o, q), (rule.export(memory) if output_final_state else None)


# --------------------------------------------------------------------------------------------
# Building blocks of the rules (tensors [B, H, ...], one step)
# --------------------------------------------------------------------------------------------


def _zeros(b: int, h: int, dk: int, dv: int, like: Tensor) -> Tensor:
    return like.new_zeros(b, h, dk, dv)


def _outer(k: Tensor, v: Tensor) -> Tensor:
    return k[..., :, None] * v[..., None, :]  # k v^T: [B, H, K, V]


def _read(s: Tensor, q: Tensor) -> Tensor:
    return torch.einsum("bhkv,bhk->bhv", s, q)  # S^T q


def _predict(s: Tensor, k: Tensor) -> Tensor:
    return torch.einsum("bhkv,bhk->bhv", s, k)  # S^T k


def _gen(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype)


def _unit(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return F.normalize(_gen(shape, gen, dtype), dim=-1)


def _rate(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=dtype)


def _log_gate(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return F.logsigmoid(_gen(shape, gen, dtype) + 2.0)  # decays mostly in (0.7, 1)


def _qkv(b: int, t: int, h: int, dk: int, dv: int, gen: torch.Generator, dtype: torch.dtype,
         unit_keys: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    q = _gen((b, t, h, dk), gen, dtype)
    k = _unit((b, t, h, dk), gen, dtype) if unit_keys else _gen((b, t, h, dk), gen, dtype)
    return q, k, _gen((b, t, h, dv), gen, dtype)


def _state(b: int, h: int, dk: int, dv: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    return _gen((b, h, dk, dv), gen, dtype)


# --------------------------------------------------------------------------------------------
# Linear rules: S_t = a_t * S_{t-1} + b_t k_t v_t^T
# --------------------------------------------------------------------------------------------


def _linear_attention_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        return (*_qkv(b, t, h, dk, dv, gen, dtype), {}, _state(b, h, dk, dv, gen, dtype))

    def specialised(q, k, v, scale, initial_state):
        return linear_attention(q, k, v, scale=scale, initial_state=initial_state,
                                output_final_state=True, mode="recurrent")  # fmt: skip

    return UpdateRule(
        key="linear_attention",
        name="Linear attention",
        cls="linear",
        update=r"S_t = S_{t-1} + k_t v_t^\top",
        objective=r"-\langle S^\top k_t, v_t\rangle",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={},
        init=_zeros,
        step=lambda s, k, v, x, t: s + _outer(k, v),
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        cite="katharopoulos2020transformers",
    )


def _retnet_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        log_gamma = retention_log_decays(h, dtype=dtype)
        return (*_qkv(b, t, h, dk, dv, gen, dtype), {"log_gamma": log_gamma},
                _state(b, h, dk, dv, gen, dtype))  # fmt: skip

    def specialised(q, k, v, scale, initial_state, log_gamma):
        want = retention_log_decays(q.shape[2], dtype=log_gamma.dtype, device=q.device)
        if not torch.allclose(log_gamma, want):
            raise ValueError("retention uses RetNet's fixed decays gamma_h = 1 - 2^(-5-h)")
        return retention(q, k, v, scale=scale, initial_state=initial_state,
                         output_final_state=True, mode="recurrent")  # fmt: skip

    return UpdateRule(
        key="retnet",
        name="RetNet",
        cls="linear",
        update=r"S_t = \gamma S_{t-1} + k_t v_t^\top",
        objective=r"-\langle S^\top k_t, v_t\rangle + \tfrac{1-\gamma}{2}\lVert S\rVert_F^2",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"log_gamma": "[H]"},
        init=_zeros,
        step=lambda s, k, v, x, t: torch.exp(x["log_gamma"])[:, None, None] * s + _outer(k, v),
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        cite="sun2023retentive",
    )


def _gla_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        g = _log_gate((b, t, h, dk), gen, dtype)
        return (*_qkv(b, t, h, dk, dv, gen, dtype), {"g": g}, _state(b, h, dk, dv, gen, dtype))

    def specialised(q, k, v, scale, initial_state, g):
        return gla(q, k, v, g, scale=scale, initial_state=initial_state,
                   output_final_state=True, mode="recurrent")  # fmt: skip

    return UpdateRule(
        key="gla",
        name="GLA",
        cls="linear",
        update=r"S_t = \mathrm{diag}(\alpha_t) S_{t-1} + k_t v_t^\top",
        objective=r"-\langle S^\top k_t, v_t\rangle"
        r" + \tfrac12\lVert \mathrm{diag}(1-\alpha_t)^{1/2} S\rVert_F^2",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"g": "[B, T, H, K]"},
        init=_zeros,
        step=lambda s, k, v, x, t: torch.exp(x["g"])[..., None] * s + _outer(k, v),
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        cite="yang2024gated",
    )


def _mamba2_rule() -> UpdateRule:
    # q, k, v play C_t, B_t and x_t; the memory is Mamba-2's state H transposed ([N, P]).
    def sample(b, t, h, dk, dv, gen, dtype):
        q, k, v = _qkv(b, t, h, dk, dv, gen, dtype)
        dt = F.softplus(_gen((b, t, h), gen, dtype) - 1.0)
        a = -torch.rand(h, generator=gen, dtype=dtype) - 0.5
        return q, k, v, {"dt": dt, "A": a}, _state(b, h, dk, dv, gen, dtype)

    def specialised(q, k, v, scale, initial_state, dt, A):
        if scale is not None and scale != 1.0:
            raise ValueError("Mamba-2 reads its state with C_t unscaled; pass scale=None")
        init = None if initial_state is None else initial_state.transpose(-1, -2)
        y, final = ssd(v, dt, A, k, q, chunk_size=16, initial_states=init,
                       return_final_states=True)  # fmt: skip
        return y, final.transpose(-1, -2)

    def step(s, k, v, x, t):
        dt = x["dt"][..., None, None]
        return torch.exp(dt * x["A"][:, None, None]) * s + dt * _outer(k, v)

    return UpdateRule(
        key="mamba2",
        name="Mamba-2 (SSD)",
        cls="linear",
        update=r"S_t = e^{\Delta_t A} S_{t-1} + \Delta_t B_t x_t^\top",
        objective=r"-\Delta_t\langle S^\top B_t, x_t\rangle"
        r" + \tfrac{1-e^{\Delta_t A}}{2}\lVert S\rVert_F^2",
        state=r"N P",
        train=r"O(T N P)",
        decode=r"O(N P)",
        inputs={"dt": "[B, T, H]", "A": "[H]"},
        init=_zeros,
        step=step,
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        scaled=False,
        note="Mamba-2: q, k, v are C, B, x; the state is Mamba-2's [P, N] state transposed.",
        cite="dao2024transformers",
    )


def _hgrn2_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        g = _log_gate((b, t, h, dk), gen, dtype)
        q, _, v = _qkv(b, t, h, dk, dv, gen, dtype)
        return q, 1 - torch.exp(g), v, {"g": g}, _state(b, h, dk, dv, gen, dtype)

    def specialised(q, k, v, scale, initial_state, g):
        if not torch.allclose(k, 1 - torch.exp(g)):
            raise ValueError("HGRN2 ties its key to the forget gate: k must be 1 - exp(g)")
        return gla(q, k, v, g, scale=scale, initial_state=initial_state,
                   output_final_state=True, mode="recurrent")  # fmt: skip

    return UpdateRule(
        key="hgrn2",
        name="HGRN2",
        cls="linear",
        update=r"S_t = \mathrm{diag}(f_t) S_{t-1} + (1 - f_t) v_t^\top",
        objective=r"-\langle S^\top (1-f_t), v_t\rangle"
        r" + \tfrac12\lVert \mathrm{diag}(1-f_t)^{1/2} S\rVert_F^2",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"g": "[B, T, H, K]"},
        init=_zeros,
        step=lambda s, k, v, x, t: torch.exp(x["g"])[..., None] * s + _outer(k, v),
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        note="HGRN2: the key is tied to the forget gate, k_t = 1 - f_t = 1 - exp(g_t).",
        cite="qin2024hgrn2",
    )


# --------------------------------------------------------------------------------------------
# Bilinear rules: the transition depends on the key
# --------------------------------------------------------------------------------------------


def _delta_step(s: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    return s + beta[..., None, None] * _outer(k, v - _predict(s, k))


def _deltanet_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        beta = _rate((b, t, h), gen, dtype)
        return (*_qkv(b, t, h, dk, dv, gen, dtype, unit_keys=True), {"beta": beta},
                _state(b, h, dk, dv, gen, dtype))  # fmt: skip

    def specialised(q, k, v, scale, initial_state, beta):
        return delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                          output_final_state=True, mode="recurrent")  # fmt: skip

    return UpdateRule(
        key="deltanet",
        name="DeltaNet",
        cls="bilinear",
        update=r"S_t = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top",
        objective=r"\tfrac12\lVert S^\top k_t - v_t\rVert^2",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"beta": "[B, T, H]"},
        init=_zeros,
        step=lambda s, k, v, x, t: _delta_step(s, k, v, x["beta"]),
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        cite="yang2024parallelizing",
    )


def _gated_deltanet_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        x = {"g": _log_gate((b, t, h), gen, dtype), "beta": _rate((b, t, h), gen, dtype)}
        return (*_qkv(b, t, h, dk, dv, gen, dtype, unit_keys=True), x,
                _state(b, h, dk, dv, gen, dtype))  # fmt: skip

    def specialised(q, k, v, scale, initial_state, g, beta):
        return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=True, mode="recurrent")  # fmt: skip

    def step(s, k, v, x, t):
        return _delta_step(torch.exp(x["g"])[..., None, None] * s, k, v, x["beta"])

    return UpdateRule(
        key="gated_deltanet",
        name="Gated DeltaNet",
        cls="bilinear",
        update=r"S_t = \alpha_t (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top",
        objective=r"\tfrac12\lVert (\alpha_t S)^\top k_t - v_t\rVert^2",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"g": "[B, T, H]", "beta": "[B, T, H]"},
        init=_zeros,
        step=step,
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        cite="yang2025gated",
    )


def _rwkv7_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        q, k, v = _qkv(b, t, h, dk, dv, gen, dtype)
        kappa = _unit((b, t, h, dk), gen, dtype)
        iclr = _rate((b, t, h, dk), gen, dtype)
        gk = -torch.exp(torch.tensor(-0.5, dtype=dtype)) * torch.sigmoid(
            _gen((b, t, h, dk), gen, dtype)
        )
        x = {"a": -kappa, "b": kappa * iclr, "gk": gk}
        return q, k, v, x, _state(b, h, dk, dv, gen, dtype)

    def specialised(q, k, v, scale, initial_state, a, b, gk):
        return dplr_delta_rule(q, k, v, a, b, gk, scale=scale, initial_state=initial_state,
                               output_final_state=True)  # fmt: skip

    def step(s, k, v, x, t):
        read_a = torch.einsum("bhk,bhkv->bhv", x["a"], s)  # a_t^T S_{t-1}
        return torch.exp(x["gk"])[..., None] * s + _outer(x["b"], read_a) + _outer(k, v)

    return UpdateRule(
        key="rwkv7",
        name="RWKV-7 (DPLR)",
        cls="bilinear",
        update=r"S_t = (\mathrm{diag}(w_t) + b_t a_t^\top) S_{t-1} + k_t v_t^\top",
        objective=r"\tfrac12\lVert S^\top \hat\kappa_t - v_t\rVert^2"
        r" \text{ (per-channel rates, vector decay)}",
        state=r"d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"a": "[B, T, H, K]", "b": "[B, T, H, K]", "gk": "[B, T, H, K]"},
        init=_zeros,
        step=step,
        read=_read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        note="RWKV-7: w_t = exp(gk_t), a_t = -kappa_t, b_t = kappa_t * (in-context rate).",
        cite="peng2025rwkv7",
    )


def _ttt_linear_rule(mini_batch: int = 16) -> UpdateRule:
    # The mini-batch's starting weights ride along with the memory: (S, S_anchor).
    def sample(b, t, h, dk, dv, gen, dtype):
        eta = 0.5 * _rate((b, t, h), gen, dtype)
        return (*_qkv(b, t, h, dk, dv, gen, dtype, unit_keys=True), {"eta": eta},
                _state(b, h, dk, dv, gen, dtype))  # fmt: skip

    def specialised(q, k, v, scale, initial_state, eta):
        return ttt_linear(q, k, v, eta, scale=scale, mini_batch_size=mini_batch,
                          initial_state=initial_state, output_final_state=True)  # fmt: skip

    def step(mem, k, v, x, t):
        s, anchor = mem
        if t % mini_batch == 0:
            anchor = s
        grad = _outer(k, _predict(anchor, k) - v)
        return s - x["eta"][..., None, None] * grad, anchor

    return UpdateRule(
        key="ttt_linear",
        name="TTT-Linear",
        cls="bilinear",
        update=r"S_t = S_{t-1} - \eta_t k_t (S_0^\top k_t - v_t)^\top",
        objective=r"\tfrac12\lVert S^\top k_t - v_t\rVert^2"
        rf"\text{{, mini-batch GD}}\ (b={mini_batch})",
        state=r"d_k d_v",
        train=r"O(T d_k d_v + T b d)",
        decode=r"O(d_k d_v)",
        inputs={"eta": "[B, T, H]"},
        init=lambda b, h, dk, dv, like: (_zeros(b, h, dk, dv, like),) * 2,
        load=lambda s, like: (s.to(like.dtype), s.to(like.dtype)),
        export=lambda mem: mem[0],
        step=step,
        read=lambda mem, q: _read(mem[0], q),
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: dk * dv,
        note=f"TTT-Linear: S_0 is the memory at the start of the token's mini-batch of "
        f"{mini_batch}; with a mini-batch of 1 the rule is DeltaNet's.",
        cite="sun2024learning",
    )


# --------------------------------------------------------------------------------------------
# Nonlinear rules: a trained model as the memory
# --------------------------------------------------------------------------------------------


def _ttt_mlp_rule(hidden_mult: int = 2) -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        eta = 0.5 * _rate((b, t, h), gen, dtype)
        f = hidden_mult * dk
        w1 = _gen((b, h, dk, f), gen, dtype) * dk**-0.5
        w2 = _gen((b, h, f, dv), gen, dtype) * f**-0.5
        return (*_qkv(b, t, h, dk, dv, gen, dtype, unit_keys=True), {"eta": eta}, (w1, w2))

    def specialised(q, k, v, scale, initial_state, eta):
        return ttt_mlp(q, k, v, eta, initial_state, scale=scale, output_final_state=True)

    def init(b, h, dk, dv, like):
        raise ValueError("TTT-MLP needs initial weights (W1, W2): all zeros never learn")

    def step(mem, k, v, x, t):
        w1, w2 = mem
        z = torch.einsum("bhk,bhkf->bhf", k, w1)
        act = F.gelu(z, approximate="tanh")
        err = torch.einsum("bhf,bhfv->bhv", act, w2) - v
        # the gradient of gelu, by autograd on a detached copy of z (independent of ttt_mlp)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (dgelu,) = torch.autograd.grad(F.gelu(zz, approximate="tanh").sum(), zz)
        d_z = torch.einsum("bhv,bhfv->bhf", err, w2) * dgelu
        lr = x["eta"][..., None, None]
        return w1 - lr * _outer(k, d_z), w2 - lr * _outer(act, err)

    def read(mem, q):
        w1, w2 = mem
        return torch.einsum("bhf,bhfv->bhv", F.gelu(torch.einsum("bhk,bhkf->bhf", q, w1),
                                                    approximate="tanh"), w2)  # fmt: skip

    return UpdateRule(
        key="ttt_mlp",
        name="TTT-MLP",
        cls="nonlinear",
        update=r"W_t = W_{t-1} - \eta_t \nabla_W \tfrac12\lVert f_{W}(k_t) - v_t\rVert^2",
        objective=r"\tfrac12\lVert \mathrm{MLP}_W(k_t) - v_t\rVert^2",
        state=rf"{2 * hidden_mult} d_k d_v \;(d_k = d_v)",
        train=r"O(T d_k F)",
        decode=r"O(d_k F)",
        inputs={"eta": "[B, T, H]"},
        init=init,
        load=lambda s, like: tuple(w.to(like.dtype) for w in s),
        step=step,
        read=read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: hidden_mult * dk * (dk + dv),
        note=f"TTT-MLP: f_W(x) = gelu(x W1) W2 with F = {hidden_mult} d_k hidden units.",
        cite="sun2024learning",
    )


def _titans_rule() -> UpdateRule:
    def sample(b, t, h, dk, dv, gen, dtype):
        x = {
            "theta": 0.5 * _rate((b, t, h), gen, dtype),
            "eta": 0.9 * _rate((b, t, h), gen, dtype),
            "alpha": 0.1 * _rate((b, t, h), gen, dtype),
        }
        state = (_state(b, h, dk, dv, gen, dtype), 0.1 * _state(b, h, dk, dv, gen, dtype))
        return (*_qkv(b, t, h, dk, dv, gen, dtype, unit_keys=True), x, state)

    def specialised(q, k, v, scale, initial_state, theta, eta, alpha):
        return titans(q, k, v, theta, eta, alpha, scale=scale, initial_state=initial_state,
                      output_final_state=True)  # fmt: skip

    def step(mem, k, v, x, t):
        m, u = mem
        u = x["eta"][..., None, None] * u - x["theta"][..., None, None] * _outer(
            k, _predict(m, k) - v
        )
        return (1 - x["alpha"][..., None, None]) * m + u, u

    return UpdateRule(
        key="titans",
        name="Titans (matrix memory)",
        cls="nonlinear",
        update=r"U_t = \eta_t U_{t-1} - \theta_t k_t (M_{t-1}^\top k_t - v_t)^\top,\;"
        r"M_t = (1-\alpha_t) M_{t-1} + U_t",
        objective=r"\tfrac12\lVert M^\top k_t - v_t\rVert^2"
        r" \text{ + momentum + weight decay}",
        state=r"2 d_k d_v",
        train=r"O(T d_k d_v)",
        decode=r"O(d_k d_v)",
        inputs={"theta": "[B, T, H]", "eta": "[B, T, H]", "alpha": "[B, T, H]"},
        init=lambda b, h, dk, dv, like: (_zeros(b, h, dk, dv, like),) * 2,
        load=lambda s, like: tuple(x.to(like.dtype) for x in s),
        step=step,
        read=lambda mem, q: _read(mem[0], q),
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: 2 * dk * dv,
        note="Titans: the survey counts it as nonlinear for its deep (MLP) memory; this row "
        "uses a matrix memory, whose update with momentum is bilinear in (M, U).",
        cite="behrouz2024titans",
    )


# --------------------------------------------------------------------------------------------
# The unbounded baseline: softmax attention keeps every (k, v)
# --------------------------------------------------------------------------------------------


def _softmax_rule(window: int | None = None) -> UpdateRule:
    # memory: the KV cache (K: [B, H, n, K], V: [B, H, n, V]); a prefix is an initial state.
    def sample(b, t, h, dk, dv, gen, dtype):
        prefix = 5
        init = (_gen((b, prefix, h, dk), gen, dtype), _gen((b, prefix, h, dv), gen, dtype))
        return (*_qkv(b, t, h, dk, dv, gen, dtype), {}, init)

    def specialised(q, k, v, scale, initial_state):
        if initial_state is not None:
            k = torch.cat([initial_state[0].to(k.dtype), k], dim=1)
            v = torch.cat([initial_state[1].to(v.dtype), v], dim=1)
        win = None if window is None else (window - 1, 0)
        o = naive_attention(q, k, v, causal=True, scale=scale, window=win)
        if window is not None:
            k, v = k[:, -window:], v[:, -window:]
        return o, (k, v)

    def init(b, h, dk, dv, like):
        return like.new_zeros(b, h, 0, dk), like.new_zeros(b, h, 0, dv)

    def step(mem, k, v, x, t):
        keys = torch.cat([mem[0], k[:, :, None]], dim=2)
        values = torch.cat([mem[1], v[:, :, None]], dim=2)
        if window is not None:
            keys, values = keys[:, :, -window:], values[:, :, -window:]
        return keys, values

    def read(mem, q):
        weights = torch.softmax(torch.einsum("bhk,bhnk->bhn", q, mem[0]), dim=-1)
        return torch.einsum("bhn,bhnv->bhv", weights, mem[1])

    cache = "t" if window is None else r"\min(t, w)"
    return UpdateRule(
        key="softmax_attention" if window is None else "sliding_window",
        name="Softmax attention" if window is None else f"Sliding window (w={window})",
        cls="unbounded",
        update=r"\mathcal{K}_t = \mathcal{K}_{t-1} \cup \{(k_t, v_t)\}"
        if window is None
        else r"\mathcal{K}_t = \{(k_s, v_s)\}_{t-w < s \le t}",
        objective=r"\text{none: stores every pair; the read is kernel regression}",
        state=rf"{cache} (d_k + d_v)",
        train=r"O(T^2 d)" if window is None else r"O(T w d)",
        decode=r"O(t d)" if window is None else r"O(w d)",
        inputs={},
        init=init,
        load=lambda s, like: tuple(x.to(like.dtype).transpose(1, 2) for x in s),
        export=lambda mem: tuple(x.transpose(1, 2) for x in mem),
        step=step,
        read=read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: (t if window is None else min(t, window)) * (dk + dv),
        note="Softmax attention: the initial state is a cached prefix (K, V), each [B, P, H, D].",
        cite="vaswani2017attention",
    )


RULES: dict[str, UpdateRule] = {
    r.key: r
    for r in (
        _linear_attention_rule(),
        _retnet_rule(),
        _gla_rule(),
        _mamba2_rule(),
        _hgrn2_rule(),
        _deltanet_rule(),
        _gated_deltanet_rule(),
        _rwkv7_rule(),
        _ttt_linear_rule(),
        _ttt_mlp_rule(),
        _titans_rule(),
        _softmax_rule(),
        _softmax_rule(window=64),
    )
}
"""The registry: every update rule of the unified table, by key."""


def registry_table(
    rules: Mapping[str, UpdateRule] | None = None,
    *,
    d_k: int = 128,
    d_v: int = 128,
    context: int = 4096,
) -> str:
    """The unified table as Markdown (LaTeX in ``$...$``), one row per rule.

    Columns: method, class, update rule, objective, memory per head (the formula, and its
    value at ``d_k``, ``d_v`` after ``context`` tokens), cost of training on a sequence of
    ``T`` tokens and of decoding one token. Notes follow the table.
    """
    rules = RULES if rules is None else rules
    for name, value in (("d_k", d_k), ("d_v", d_v), ("context", context)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    head = (
        "| Method | Class | Update | Objective (one step of GD on it) | Memory per head "
        f"(at $d_k$={d_k}, $d_v$={d_v}, t={context}) | Training | Decoding / token |"
    )
    lines = [head, "|" + " --- |" * 7]
    notes = []
    for r in rules.values():
        n = r.state_elements(d_k, d_v, context)
        lines.append(
            f"| {r.name} | {r.cls} | ${r.update}$ | ${r.objective}$ | ${r.state}$ = {n:,} | "
            f"${r.train}$ | ${r.decode}$ |"
        )
        if r.note:
            notes.append(f"- {r.note}")
    return "\n".join(lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------------------------
# A probe: how long does a memory keep one binding?
# --------------------------------------------------------------------------------------------

RETENTION_RULES = ("linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "titans")


def retention_curve(
    rule: str,
    *,
    steps: int = 200,
    overlap: float = 0.0,
    log_decay: float = -0.02,
    beta: float = 1.0,
    d_key: int = 32,
    d_value: int = 32,
    seed: int = 0,
) -> Tensor:
    r"""How much of one stored binding a memory still returns, step after step.

    Step 0 writes ``(k_0, v_0)``; steps ``1..steps`` write random pairs whose unit keys have
    cosine ``overlap`` with ``k_0``; every step reads ``k_0``. Returns ``[steps + 1]``, the
    retained fraction ``<o_t, v_0> / ||v_0||^2`` (1 right after the write, in exact
    arithmetic).

    Rules: ``"linear_attention"`` and ``"retnet"`` (its head-0 decay ``1 - 2^-5``) take no
    parameter; ``"gla"`` decays every key row by ``exp(log_decay)``; ``"deltanet"`` writes
    with strength ``beta``, ``"gated_deltanet"`` with ``beta`` and decay ``exp(log_decay)``;
    ``"titans"`` uses learning rate ``beta``, forgetting ``1 - exp(log_decay)`` and no
    momentum. With ``overlap = 0`` later writes never touch ``k_0``: linear attention and
    the delta rule keep all of ``v_0``, and only a decay forgets it.
    """
    check_choice("rule", rule, RETENTION_RULES)
    for name, value in (("steps", steps), ("d_key", d_key), ("d_value", d_value)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(overlap, (int, float)) or not -1 <= overlap <= 1:
        raise ValueError(f"overlap must be a cosine in [-1, 1], got {overlap!r}")
    if not isinstance(log_decay, (int, float)) or log_decay > 0:
        raise ValueError(f"log_decay must be <= 0 (a decay exp(log_decay) <= 1), got {log_decay!r}")
    if not isinstance(beta, (int, float)) or not 0 < beta <= 2:
        raise ValueError(f"beta must lie in (0, 2], got {beta!r}")
    gen = torch.Generator().manual_seed(seed)
    t = steps + 1
    k0 = F.normalize(torch.randn(d_key, generator=gen, dtype=torch.float64), dim=0)
    other = torch.randn(steps, d_key, generator=gen, dtype=torch.float64)
    other = F.normalize(other - (other @ k0)[:, None] * k0, dim=-1)  # orthogonal to k_0
    keys = torch.cat([k0[None], overlap * k0 + (1 - overlap**2) ** 0.5 * other])
    values = torch.randn(t, d_value, generator=gen, dtype=torch.float64)
    q = k0.expand(t, d_key)[None, :, None]  # [1, T, 1, K]
    k, v = keys[None, :, None], values[None, :, None]
    ones = torch.ones(1, t, 1, dtype=torch.float64)
    inputs: dict[str, Tensor] = {}
    if rule == "retnet":
        inputs["log_gamma"] = retention_log_decays(1, dtype=torch.float64)
    elif rule == "gla":
        inputs["g"] = torch.full((1, t, 1, d_key), float(log_decay), dtype=torch.float64)
    elif rule in ("deltanet", "gated_deltanet"):
        inputs["beta"] = beta * ones
        if rule == "gated_deltanet":
            inputs["g"] = float(log_decay) * ones
    elif rule == "titans":
        inputs = {"theta": beta * ones, "eta": 0 * ones, "alpha": (1 - math.exp(log_decay)) * ones}
    o, _ = memory_scan(rule, q, k, v, scale=1.0, **inputs)
    v0 = values[0]
    return (o[0, :, 0] @ v0) / (v0 @ v0)
