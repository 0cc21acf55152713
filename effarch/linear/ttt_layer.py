r"""TTT-Linear as a token mixer: the layer around the op of :mod:`effarch.linear.ttt`.

Same interface as the layers of :mod:`effarch.linear.layers` (which re-exports it)::

    y, new_state = layer(x, state=None)  # x, y: [B, T, d_model]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    State,
    check_divides,
    check_layer_input,
    check_layer_state,
    check_positive_int,
    check_positive_number,
)
from ..nn import l2norm, merge_heads, split_heads
from .conv_qkv import ConvQKV
from .ttt import ttt_linear, ttt_linear_resume

__all__ = ["TTTLinear"]


class TTTLinear(nn.Module):
    r"""A TTT-Linear token mixer (Sun et al., 2024): a linear model trained as it reads.

    Per head (``K = V = d_model / H``), the op :func:`~effarch.linear.ttt_linear` with
    mini-batches of ``m`` tokens, wrapped the way TTT's layer wraps its inner model::

        q_t, k_t = L2norm(silu(conv(W_q x))_t), L2norm(silu(conv(W_k x))_t)     # [H, K]
        v_t      = silu(conv(W_v x))_t                                          # [H, V]
        eta_t    = eta_base sigmoid(W_eta x_t + b_eta)                          # [H]
        S        = ttt_linear(q, k, v, eta, mini_batch_size=m, initial_state=S_init)
        y_t      = W_o ( LN_h(o_t) * gelu(W_g x_t) )

    ``S_init: [H, K, V]`` (TTT's learned ``W_0``) is a parameter, zero at first; the per-head
    layer norm ``LN_h`` and the GELU output gate are TTT's post-norm and gate. Departures
    from the paper, all deliberate: the inner model is ``S^T x`` without TTT's internal
    ``x + LN(.)`` (so that the op stays the delta-rule family of this chapter); keys are
    L2-normalised instead, which keeps each single-token step ``I - eta k k^T``
    non-expansive for ``0 <= eta <= 2``; and short convolutions on ``q, k, v`` as in
    :class:`~effarch.linear.DeltaNet` stand in for the convolutions of TTT's Mamba backbone.
    A whole mini-batch applies ``I - K^T diag(eta) K``, which stays non-expansive only while
    the largest eigenvalue of ``K^T diag(eta) K`` is at most 2: guaranteed when the rates of
    a mini-batch sum to at most 2, not by ``eta <= 2`` (the op sums a mini-batch's steps,
    where TTT's code averages them; see :func:`~effarch.linear.ttt_linear`).

    Decoding: a mini-batch read in pieces still takes every gradient at the state it began
    from, so the state carries that ``anchor`` and the token count ``pos`` besides ``S``;
    calls may split the stream anywhere (``layer(x) == layer(x[:, :n])`` then the rest with
    the state, token by token included), and ``m = 1`` makes it a DeltaNet with learned
    ``S_init`` and TTT's wrapping.

    Args:
        d_model, n_heads: width and heads.
        mini_batch_size: ``m``, tokens per inner gradient step (TTT's default 16).
        eta_base: the largest inner learning rate. With L2-normalised keys one token's step
            is non-expansive up to 2; a mini-batch of ``m`` tokens is guaranteed to be only
            while its rates sum to at most 2 (``eta_base <= 2 / m``).
        conv_size: width of the short convolutions.

    State: ``{"S": [B, H, K, V], "anchor": [B, H, K, V], "pos": [] (int64), "conv_q",
    "conv_k", "conv_v"}``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        mini_batch_size: int = 16,
        eta_base: float = 1.0,
        conv_size: int = 4,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        self.mini_batch_size = check_positive_int("mini_batch_size", mini_batch_size)
        self.eta_base = check_positive_number("eta_base", eta_base)
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = check_divides("d_model", d_model, "n_heads", n_heads)
        d = self.head_dim
        self.qkv = ConvQKV(d_model, d_model, d_model, conv_size)
        self.eta_proj = nn.Linear(d_model, n_heads, bias=True)
        self.S_init = nn.Parameter(torch.zeros(n_heads, d, d))
        self.ln_weight = nn.Parameter(torch.ones(n_heads, d))
        self.ln_bias = nn.Parameter(torch.zeros(n_heads, d))
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        b, t = check_layer_input(x, self.d_model, self)
        h, d, m = self.n_heads, self.head_dim, self.mini_batch_size
        shapes = {"S": (b, h, d, d), "anchor": (b, h, d, d), "pos": (), **self.qkv.state_shapes(b)}
        st = check_layer_state(state, shapes, "TTTLinear")
        q, k, v, conv = self.qkv(x, st)
        q, k, v = l2norm(split_heads(q, h)), l2norm(split_heads(k, h)), split_heads(v, h)
        eta = self.eta_base * torch.sigmoid(self.eta_proj(x))
        if st:
            s, anchor, pos = st["S"], st["anchor"], int(st["pos"])
        else:
            s = anchor = self.S_init.expand(b, h, d, d)
            pos = 0
        # Split the tokens at mini-batch boundaries: the rest of the mini-batch in progress,
        # whole mini-batches, then the start of the next one.
        head = min(t, (-pos) % m)
        body = (t - head) // m * m

        def part(lo: int, hi: int) -> tuple[torch.Tensor, ...]:
            return tuple(z[:, lo:hi] for z in (q, k, v, eta))

        outs = []
        if head:
            o, s = ttt_linear_resume(*part(0, head), s, anchor)
            outs.append(o)
            if (pos + head) % m == 0:
                anchor = s
        if body:
            o, s = ttt_linear(
                *part(head, head + body), mini_batch_size=m, initial_state=s,
                output_final_state=True,
            )  # fmt: skip
            outs.append(o)
            anchor = s
        if head + body < t:
            o, s = ttt_linear_resume(*part(head + body, t), s, s)
            outs.append(o)
        o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        o = F.layer_norm(o, (d,)) * self.ln_weight + self.ln_bias
        o = o * F.gelu(split_heads(self.g_proj(x), h), approximate="tanh")
        new = {"S": s, "anchor": anchor, "pos": torch.tensor(pos + t), **conv}
        return self.o_proj(merge_heads(o)), new

    def state_size(self, seq_len: int) -> int:
        """Elements one sequence carries between tokens: ``2 H K K`` for ``m > 1``, else ``H K K``.

        ``S: [H, K, V]`` and, for ``m > 1``, the anchor of the mini-batch in progress (the
        same shape; with ``m = 1`` it is ``S`` itself), whatever ``seq_len``. The token count
        ``pos`` and the convolution caches are not counted.
        """
        check_positive_int("seq_len", seq_len)
        return (2 if self.mini_batch_size > 1 else 1) * self.n_heads * self.head_dim**2
