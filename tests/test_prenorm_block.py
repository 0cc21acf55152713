"""PreNormBlock, the layer TinyLM and HybridLM stack: checked against the equations written
out in float64, a short convolution as an explicit loop, and its bad input."""

import pytest
import torch
from torch import nn

from effarch.models import HybridLM, PreNormBlock, RecurrentState, TinyLM
from effarch.nn import ShortConvolution, SwiGLU

F64 = torch.float64


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_block_is_the_pre_norm_residual_pair_with_a_causal_convolution():
    torch.manual_seed(0)
    b, t, d, width, eps = 2, 6, 8, 3, 1e-5
    mixer, ffn = nn.Linear(d, d).double(), SwiGLU(d, 12).double()
    conv = ShortConvolution(d, width, activation=False).double()
    block = PreNormBlock(d, mixer, ffn, conv=conv, eps=eps).double()
    with torch.no_grad():
        block.mixer_norm.weight.uniform_(0.5, 1.5)
        block.mlp_norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(b, t, d, dtype=F64)
    out, cache = block(h)

    u = _rms(h, block.mixer_norm.weight, eps)
    w = conv.conv.weight[:, 0]  # [d, width]: tap j multiplies the input j - (width-1) back
    c = torch.zeros_like(u)
    for i in range(t):
        for j in range(width):
            src = i - (width - 1) + j
            if src >= 0:
                c[:, i] += w[:, j] * u[:, src]
    mid = h + mixer(c)
    want = mid + ffn(_rms(mid, block.mlp_norm.weight, eps))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache, u[:, -(width - 1) :])


def test_block_without_ffn_or_conv_is_one_residual_step_and_unwraps_tuples():
    class Pair(nn.Module):  # a mixer returning (y, state), as the linear layers do
        def forward(self, x, state=None):
            return 2 * x, "state"

    h = torch.randn(1, 4, 6, dtype=F64)
    block = PreNormBlock(6, Pair(), eps=1e-6).double()
    assert block.mlp is None and block.mlp_norm is None and block.conv is None
    out, cache = block(h)
    torch.testing.assert_close(out, h + 2 * _rms(h, block.mixer_norm.weight, 1e-6))
    assert cache is None
    state = RecurrentState()
    out2, _ = block(h, state)
    torch.testing.assert_close(out2, out)
    assert state.state == "state" and state.length == 4


def test_both_models_stack_the_shared_block():
    tiny = TinyLM(20, 16, 2, "gla")
    hyb = HybridLM.preset("samba", 20, 16, 2)
    assert all(type(b) is PreNormBlock for b in [*tiny.blocks, *hyb.blocks])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mixer": None}, TypeError, r"mixer must be an nn.Module, got NoneType"),
        ({"ffn": lambda x: x}, TypeError, r"ffn must be an nn.Module or None, got function"),
        ({"conv": nn.Conv1d(8, 8, 2)}, TypeError, r"conv must be a ShortConvolution"),
        ({"conv": ShortConvolution(4, 2)}, ValueError, r"conv must have d_model=8 channels, got 4"),
        ({"d_model": 0}, ValueError, r"d_model"),
        ({"eps": 0.0}, ValueError, r"eps"),
    ],
)
def test_block_bad_input(kwargs, error, match):
    args = {"d_model": 8, "mixer": nn.Identity(), **kwargs}
    with pytest.raises(error, match=match):
        PreNormBlock(args.pop("d_model"), args.pop("mixer"), **args)
