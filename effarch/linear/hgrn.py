"""HGRN: the gated linear recurrence ``h_t = exp(g_t) * h_{t-1} + x_t`` (Qin et al., 2023).

HGRN (hierarchically gated recurrent network) keeps one scalar state per channel and
decays it with a data-dependent forget gate ``f_t = exp(g_t)`` in ``(0, 1]`` (``g_t <= 0``
is the log forget gate). The input ``x_t`` already carries the ``(1 - f_t)`` factor and
the output gate lives outside this op, so the core is just the elementwise linear
recurrence, the same contract as flash-linear-attention's ``fla.ops.hgrn``
(``chunk_hgrn`` / ``fused_recurrent_hgrn``).

Two equivalent forms are given: ``"scan"`` runs :func:`effarch.scan.linear_recurrence`
(log-depth parallel scan over the sequence) and ``"recurrent"`` is the step loop.
"""

from __future__ import annotations

import torch

from .._checks import check_bool, check_choice, check_same, check_tensor
from ..scan import linear_recurrence

MODES = ("scan", "recurrent")


def hgrn(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "scan",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated elementwise linear recurrence of HGRN.

    Args:
        x: ``[B, T, D]`` inputs.
        g: ``[B, T, D]`` log forget gates (normally ``<= 0``), same dtype as ``x``.
        initial_state: optional ``[B, D]`` state ``h_{-1}``.
        output_final_state: also return ``h_{T-1}``.
        mode: ``"scan"`` (parallel scan) or ``"recurrent"`` (loop).

    Returns:
        ``(o, final_state)`` with ``o[:, t] = h_t`` where ``h_t = exp(g_t) * h_{t-1} + x_t``,
        ``o`` of shape ``[B, T, D]`` in the dtype of ``x``, and ``final_state`` ``[B, D]``
        (float32, or float64 for float64 inputs) or ``None``. The same arguments (keywords
        here) and result as ``fla.ops.hgrn.fused_recurrent_hgrn(x, g, initial_state,
        output_final_state)``, except the dtype of the final state for half-precision
        inputs: fla's ``fused_recurrent_hgrn`` returns it in the dtype of ``x``, this op (like
        fla's ``chunk_hgrn``) in float32.

    Half-precision inputs are computed in float32. Two calls chained through
    ``initial_state`` give the same outputs as one call on the concatenated sequence.
    """
    check_tensor("x", x, ndim=3, floating=True)
    check_tensor("g", g, ndim=3, floating=True)
    check_same(("x", "g"), (x, g))
    check_choice("mode", mode, MODES)
    check_bool("output_final_state", output_final_state)
    if g.shape != x.shape:
        raise ValueError(f"g must have the shape of x {tuple(x.shape)}, got {tuple(g.shape)}")
    b, t, d = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    h0 = None
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=2, floating=True)
        if tuple(initial_state.shape) != (b, d):
            raise ValueError(
                f"initial_state must have shape [B, D] = {(b, d)}, got {tuple(initial_state.shape)}"
            )
        if initial_state.device != x.device:
            raise ValueError(
                f"initial_state must be on the device of x ({x.device}), got {initial_state.device}"
            )
        h0 = initial_state.to(compute)
    xc, decay = x.to(compute), torch.exp(g.to(compute))

    if mode == "scan":
        h = linear_recurrence(decay, xc, h0)
    else:
        state = torch.zeros(b, d, dtype=compute, device=x.device) if h0 is None else h0
        steps = []
        for i in range(t):
            state = decay[:, i] * state + xc[:, i]
            steps.append(state)
        h = torch.stack(steps, dim=1) if steps else xc.clone()

    final = None
    if output_final_state:
        if t > 0:
            final = h[:, -1]
        elif h0 is not None:
            final = h0
        else:
            final = torch.zeros(b, d, dtype=compute, device=x.device)
    return h.to(x.dtype), final
