"""Token-mixing layers of effarch.linear.layers and effarch.ssm.layers.

For every layer, in float64: one call on the whole sequence equals decoding token by token and
equals a prefix followed by the rest (outputs and final states). In float32: a backward pass
reaches every parameter. Bad inputs raise ValueError. Mamba is checked against a loop written
here from its equations; S4D's convolution mode against its recurrent mode.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from effarch.linear.layers import (
    GLA,
    HGRN,
    RWKV7,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    RetNet,
    ShortConvolution,
    TTTLinear,
)
from effarch.ssm.layers import S4D, Mamba, Mamba2

D_MODEL, BATCH, T, SPLIT = 32, 2, 13, 5

# Chunk sizes below T so that the chunk forms carry state across several chunks.
LAYERS = {
    "linear_attention": lambda: LinearAttention(D_MODEL, 4, chunk_size=4),
    "linear_attention_relu": lambda: LinearAttention(
        D_MODEL, 2, "relu", normalize=False, chunk_size=4
    ),
    "retnet": lambda: RetNet(D_MODEL, 4, chunk_size=4),
    "gla": lambda: GLA(D_MODEL, 4, gate_low_rank=8, chunk_size=4),
    "deltanet": lambda: DeltaNet(D_MODEL, 4, chunk_size=4),
    "gated_deltanet": lambda: GatedDeltaNet(D_MODEL, 2, chunk_size=4),
    "mamba": lambda: Mamba(D_MODEL, d_state=8),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=8, headdim=16, ngroups=2, chunk_size=4),
    "hgrn": lambda: HGRN(D_MODEL),
    "hgrn_lower_bound": lambda: HGRN(D_MODEL, lower_bound=0.5),
    "s4d": lambda: S4D(D_MODEL, d_state=8),
    "rwkv7": lambda: RWKV7(
        D_MODEL, 4, decay_low_rank=8, a_low_rank=8, gate_low_rank=8, chunk_size=4
    ),
    # mini-batches of 4: the splits at 5 and at every token land inside a mini-batch
    "ttt_linear": lambda: TTTLinear(D_MODEL, 4, mini_batch_size=4),
    "ttt_linear_m1": lambda: TTTLinear(D_MODEL, 2, mini_batch_size=1),
}


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert_close(a, b, rtol=1e-9, atol=1e-10)
    else:
        assert a == b


@pytest.mark.parametrize("name", LAYERS)
def test_full_equals_decoding_and_prefix(name):
    layer = LAYERS[name]().double()
    x = torch.randn(BATCH, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.abs().mean() > 1e-3  # not trivially zero

        steps, s = [], None
        for t in range(T):
            y_t, s = layer(x[:, t : t + 1], s)
            steps.append(y_t)
        _close(torch.cat(steps, dim=1), y)
        _close(s, state)

        y1, s1 = layer(x[:, :SPLIT])
        y2, s2 = layer(x[:, SPLIT:], s1)
        _close(torch.cat([y1, y2], dim=1), y)
        _close(s2, state)


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_every_parameter(name):
    layer = LAYERS[name]()
    x = torch.randn(BATCH, T, D_MODEL, requires_grad=True)
    y, _ = layer(x)
    assert y.dtype == torch.float32
    y.pow(2).mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", LAYERS)
def test_bad_input_raises(name):
    layer = LAYERS[name]()
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        layer(torch.randn(T, D_MODEL))
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(BATCH, T, D_MODEL + 1))
    with pytest.raises(ValueError, match="at least one time step"):
        layer(torch.randn(BATCH, 0, D_MODEL))
    _, state = layer(torch.randn(BATCH, 3, D_MODEL))
    with pytest.raises(ValueError, match="state"):  # state of another batch size
        layer(torch.randn(BATCH + 1, 3, D_MODEL), state)
    with pytest.raises(ValueError, match="missing"):
        layer(torch.randn(BATCH, 3, D_MODEL), {})


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible"):
        DeltaNet(30, 4)
    with pytest.raises(ValueError, match="positive features"):
        LinearAttention(D_MODEL, 4, "relu")
    with pytest.raises(ValueError, match="even"):
        S4D(D_MODEL, d_state=7)
    with pytest.raises(ValueError, match="lower_bound"):
        HGRN(D_MODEL, lower_bound=1.0)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(D_MODEL, headdim=16, ngroups=3)
    # GLA's widths: int(d_model * expand) silently truncated 30 * 0.25 = 7.5 to 7
    with pytest.raises(ValueError, match=r"d_model \* expand_k must be a whole number "
                                         r"\(a layer width\), got 30 \* 0.25 = 7.5"):  # fmt: skip
        GLA(30, 1, expand_k=0.25)
    with pytest.raises(ValueError, match=r"d_model \* expand_v must be a whole number"):
        GLA(D_MODEL, 4, expand_v=1.1)
    # a whole width up to rounding (100 * 1.1 = 110.00000000000001) is that width
    assert GLA(100, 2, expand_v=1.1).value_dim == 110


def test_retnet_state_needs_its_offset():
    layer = RetNet(D_MODEL, 4, chunk_size=4).double()
    x = torch.randn(BATCH, T, D_MODEL, dtype=torch.float64)
    _, state = layer(x[:, :SPLIT])
    assert state["offset"] == SPLIT
    # without the offset RoPE restarted at position 0 and decoding went silently wrong
    with pytest.raises(ValueError, match=r"state of RetNet must hold .*missing \['offset'\]"):
        layer(x[:, SPLIT:], {"S": state["S"]})
    with pytest.raises(ValueError, match="offset"):
        layer(x[:, SPLIT:], {**state, "offset": -1})


def test_short_convolution_matches_padded_conv1d():
    conv = ShortConvolution(6, 3, bias=True, activation=False).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y, cache = conv(x)
    ref = F.conv1d(
        F.pad(x.transpose(1, 2), (2, 0)), conv.conv.weight, conv.conv.bias, groups=6
    ).transpose(1, 2)
    assert_close(y, ref)
    assert_close(cache, x[:, -2:])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_rejects_input_of_another_dtype(name):
    layer = LAYERS[name]()  # float32 parameters
    with pytest.raises(TypeError, match="x must have the dtype of the .* layer's parameters"):
        layer(torch.randn(BATCH, T, D_MODEL, dtype=torch.float64))


def test_repeat_kv_gives_each_query_head_its_group():
    from effarch.nn import repeat_kv

    x = torch.randn(2, 5, 3, 4)  # three key/value heads
    y = repeat_kv(x, 6)
    for h in range(6):  # query head h reads key/value head h // 2
        assert torch.equal(y[:, :, h], x[:, :, h // 2])
    assert torch.equal(y, x.repeat_interleave(2, dim=2))
    with pytest.raises(ValueError, match="n_heads"):
        repeat_kv(x, 4)


def test_building_blocks_reject_bad_input():
    from effarch.nn import GatedRMSNorm, SwiGLU, split_heads
    from effarch.ssm import selective_scan, ssd

    norm, x = GatedRMSNorm(8), torch.randn(2, 3, 8)
    for gate in (torch.randn(2, 3, 1), torch.randn(8)):  # would broadcast silently
        with pytest.raises(ValueError, match="gate must have the shape of x"):
            norm(x, gate)
    with pytest.raises(ValueError, match=r"n_heads \(3\)"):
        split_heads(torch.randn(1, 2, 8), 3)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        split_heads(torch.randn(1, 2, 8), 0)
    conv = ShortConvolution(6, 3)
    with pytest.raises(TypeError, match="cache must be a torch.Tensor"):
        conv(torch.randn(1, 4, 6), [[0.0] * 6] * 2)
    for args in ((4, 0), (4.5, 8)):
        with pytest.raises((TypeError, ValueError), match="d_model|d_ff"):
            SwiGLU(*args)
    b, t, d, n = 1, 4, 2, 3
    u, delta, B, C = (
        torch.randn(b, t, d),
        torch.rand(b, t, d),
        torch.randn(b, t, n),
        torch.randn(b, t, n),
    )
    with pytest.raises(TypeError, match="delta_softplus must be a bool"):
        selective_scan(u, delta, -torch.rand(d, n), B, C, delta_softplus="no")
    xs, dt = torch.randn(1, 4, 2, 3), torch.rand(1, 4, 2)
    Bs, Cs = torch.randn(1, 4, 1, 5), torch.randn(1, 4, 1, 5)
    with pytest.raises(TypeError, match="dt_softplus must be a bool"):
        ssd(xs, dt, -torch.rand(2), Bs, Cs, chunk_size=2, dt_softplus=1)
    with pytest.raises(TypeError, match="return_final_states must be a bool"):
        ssd(xs, dt, -torch.rand(2), Bs, Cs, chunk_size=2, return_final_states="yes")


def _mamba_loop(m, x):
    """Mamba from its equations: one token at a time, explicit convolution window and state."""
    e, n, w = m.d_inner, m.d_state, m.d_conv
    xs, z = m.in_proj(x).chunk(2, dim=-1)
    padded = F.pad(xs, (0, 0, w - 1, 0))
    kernel, conv_bias = m.conv.conv.weight[:, 0], m.conv.conv.bias  # [E, W], [E]
    A = -torch.exp(m.A_log)
    h = x.new_zeros(x.shape[0], e, n)
    outs = []
    for t in range(x.shape[1]):
        window = padded[:, t : t + w]  # inputs t-W+1 .. t
        xc = F.silu((window.transpose(1, 2) * kernel).sum(-1) + conv_bias)  # [B, E]
        dt_raw, B, C = m.x_proj(xc).split([m.dt_rank, n, n], dim=-1)
        dt = F.softplus(m.dt_proj(dt_raw))  # [B, E]
        h = torch.exp(dt[..., None] * A) * h + (dt * xc)[..., None] * B[:, None, :]
        y = (h * C[:, None, :]).sum(-1) + m.D * xc
        outs.append(m.out_proj(y * F.silu(z[:, t])))
    return torch.stack(outs, dim=1), h


def test_mamba_matches_loop():
    m = Mamba(16, d_state=4, d_conv=3, expand=2, dt_rank=3).double()
    with torch.no_grad():  # larger steps than at init, so the state decays visibly
        m.dt_proj.bias.add_(2.0)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = m(x)
        ref, h = _mamba_loop(m, x)
    assert_close(y, ref)
    assert_close(state["ssm"], h)


@pytest.mark.parametrize("with_state", [False, True])
def test_s4d_convolution_equals_recurrence(with_state):
    layer = S4D(D_MODEL, d_state=8, dt_min=0.01, dt_max=0.5).double()
    x = torch.randn(BATCH, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        state = (
            layer(torch.randn(BATCH, 4, D_MODEL, dtype=torch.float64))[1] if with_state else None
        )
        y_conv, s_conv = layer(x, state, mode="conv")
        y_rec, s_rec = layer(x, state, mode="recurrent")
    assert s_conv["s"].is_complex()
    assert_close(y_conv, y_rec, rtol=1e-9, atol=1e-10)
    assert_close(s_conv["s"], s_rec["s"], rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="mode"):
        layer(x, mode="fft")


def test_s4d_float32_convolution_stays_accurate_over_long_sequences():
    # The kernel's powers A_bar^l come from the exponent, exp(l dt A), as the reference
    # S4D kernel computes them; a running product A_bar^l = A_bar^(l-1) A_bar rounds at
    # every step and was 1.4e-6 to 2.4e-6 off at this length.
    torch.manual_seed(0)
    layer = S4D(8, d_state=16)
    x = torch.randn(2, 4096, 8)
    with torch.no_grad():
        y32, s32 = layer(x, mode="conv")
        y64, s64 = layer.double()(x.double(), mode="recurrent")
    assert (y32 - y64).abs().max() / y64.abs().max() < 1e-6
    assert (s32["s"] - s64["s"]).abs().max() / s64["s"].abs().max() < 1e-5
