"""Every memory-update rule of the survey's table as an :class:`UpdateRule`, grouped by
class (linear, bilinear, nonlinear, the unbounded softmax baseline); :data:`RULES` is the
registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import naive_attention
from ..linear.ops import (
    delta_rule,
    dplr_delta_rule,
    gated_delta_rule,
    gla,
    linear_attention,
    retention,
    retention_log_decays,
)
from ..linear.ttt import titans, ttt_linear, ttt_mlp
from ..ssm import ssd
from .rule import Tensor, UpdateRule

__all__ = ["RULES"]


# --------------------------------------------------------------------------------------------
# Building blocks of the rules (tensors [B, H, ...], one step)
# --------------------------------------------------------------------------------------------


# The specialised ops run their chunkwise form (section 2.1) with short chunks, so that even
# a short check crosses chunk boundaries and carries the state between chunks.
_CHUNK = 16


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
                                output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

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
                         output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

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
                   output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

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
                   output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

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
                          output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

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
                                output_final_state=True, chunk_size=_CHUNK)  # fmt: skip

    def step(s, k, v, x, t):
        return _delta_step(torch.exp(x["g"])[..., None, None] * s, k, v, x["beta"])

    return UpdateRule(
        key="gated_deltanet",
        name="Gated DeltaNet",
        cls="bilinear",
        update=r"S_t = \alpha_t (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top",
        objective=r"\text{decay by } \alpha_t\text{, then one step on } "
        r"\tfrac12\lVert S^\top k_t - v_t\rVert^2",
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
        r" \text{ (the erase only: per-channel rates, vector decay; the write is at full"
        r" strength)}",
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
        state=r"2 d_k d_v" if mini_batch > 1 else r"d_k d_v",
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
        # S and the anchor S_0 of the mini-batch in progress (with m = 1 the anchor is S)
        state_elements=lambda dk, dv, t: (2 if mini_batch > 1 else 1) * dk * dv,
        note=f"TTT-Linear: S_0 is the memory at the start of the token's mini-batch of "
        f"{mini_batch}; the memory carries S and the anchor S_0 of the mini-batch in "
        "progress; with a mini-batch of 1 the rule is DeltaNet's.",
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
        state_layout=("[B, H, K, F]", "[B, H, F, V]"),
        load=lambda s, like: tuple(w.to(like.dtype) for w in s),
        step=step,
        read=read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: hidden_mult * dk * (dk + dv),
        note=f"TTT-MLP: f_W(x) = gelu(x W1) W2 with F = {hidden_mult} d_k hidden units "
        "(the paper uses 4 d_k).",
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
        state_layout=("[B, H, K, V]", "[B, H, K, V]"),
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
        cls="unbounded" if window is None else "windowed",
        update=r"\mathcal{K}_t = \mathcal{K}_{t-1} \cup \{(k_t, v_t)\}"
        if window is None
        else r"\mathcal{K}_t = \{(k_s, v_s)\}_{t-w < s \le t}",
        objective=r"\text{none: stores every pair; the read is kernel regression}",
        state=rf"{cache} (d_k + d_v)",
        train=r"O(T^2 d)" if window is None else r"O(T w d)",
        decode=r"O(t d)" if window is None else r"O(w d)",
        inputs={},
        init=init,
        state_layout=("[B, P, H, K]", "[B, P, H, V]"),
        load=lambda s, like: tuple(x.to(like.dtype).transpose(1, 2) for x in s),
        export=lambda mem: tuple(x.transpose(1, 2) for x in mem),
        step=step,
        read=read,
        specialised=specialised,
        sample=sample,
        state_elements=lambda dk, dv, t: (t if window is None else min(t, window)) * (dk + dv),
        note="Softmax attention: the initial state is a cached prefix (K, V), each [B, P, H, D]."
        if window is None
        else f"Sliding window: a bounded cache of the last {window} pairs (K, V), each "
        "[B, min(t, w), H, D]; a longer prefix is cut to its last w pairs.",
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
