"""The Triton grouped-GEMM kernel (chapter 5.2) against a float64 loop over the groups.

On a CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1);
shapes stay small so the suite stays fast.
"""

import pytest
import torch

from effarch._kernels import triton_available
from effarch.moe import MoELayer, experts_grouped, grouped_matmul

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.kernel, needs_triton]


def loop_reference(x, w, ends):
    """``x[rows_g] @ w[g]`` in float64 one group at a time; rows of no group give 0."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(ends):
        out[start:end] = x[start:end].double().cpu() @ w[g].double().cpu()
        start = end
    return out


# group sizes: empty groups, groups larger than a 32-row tile, trailing rows of no group
CASES = {
    "ragged with empty groups": ([5, 0, 40, 1, 0, 17], 0, 24, 40),
    "rows past the last group": ([3, 33, 9], 7, 48, 20),
    "one group, K and N not multiples of 16": ([50], 0, 21, 13),
    "all groups empty": ([0, 0, 0], 4, 16, 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_equal_a_loop_over_groups(case, dtype):
    sizes, extra, kdim, n = CASES[case]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    m = ends[-1] + extra
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, kdim, generator=gen)
    w = torch.randn(len(sizes), kdim, n, generator=gen) / kdim**0.5
    dy = torch.randn(m, n, generator=gen)
    offs = torch.tensor(ends, dtype=torch.int32, device=DEV)
    xk = x.to(DEV, dtype).requires_grad_()
    wk = w.to(DEV, dtype).requires_grad_()
    y = grouped_matmul(xk, wk, offs, backend="triton")
    y.backward(dy.to(DEV, dtype))
    # the reference: the same (rounded) inputs, float64, autograd through the loop
    x64 = xk.detach().double().cpu().requires_grad_()
    w64 = wk.detach().double().cpu().requires_grad_()
    ref = loop_reference(x64, w64, ends)
    ref.backward(dy.to(dtype).double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert y.dtype == dtype and xk.grad.dtype == dtype and wk.grad.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(xk.grad.double().cpu(), x64.grad, **tol)
    torch.testing.assert_close(wk.grad.double().cpu(), w64.grad, **tol)
    if extra:  # rows of no group: output 0, gradient 0
        assert (y[ends[-1] :] == 0).all() and (xk.grad[ends[-1] :] == 0).all()


def test_torch_path_follows_the_same_convention_for_rows_past_the_last_group():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 8, generator=gen), torch.randn(2, 8, 16, generator=gen)
    offs = torch.tensor([3, 6], dtype=torch.int32)
    ref = loop_reference(x, w, [3, 6])
    torch.testing.assert_close(grouped_matmul(x.double(), w.double(), offs), ref)
    torch.testing.assert_close(
        grouped_matmul(x, w, offs, backend="triton").double(), ref, rtol=1e-5, atol=1e-5
    )


def test_transposed_weights_are_read_through_their_strides():
    """The layer passes ``gate_up.transpose(1, 2)``, a non-contiguous view."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(20, 16, generator=gen), torch.randn(3, 24, 16, generator=gen)
    offs = torch.tensor([4, 4, 20], dtype=torch.int32)
    got = grouped_matmul(x, w.transpose(1, 2), offs, backend="triton")
    torch.testing.assert_close(got.double(), loop_reference(x, w.transpose(1, 2), [4, 4, 20]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_moe_layer_triton_path_equals_the_loop_forward_and_backward():
    torch.manual_seed(0)
    base = MoELayer(16, 24, 6, 2, n_shared=1, capacity_factor=1.0)
    out = {}
    for impl in ("loop", "triton"):
        layer = MoELayer(16, 24, 6, 2, n_shared=1, capacity_factor=1.0, impl=impl)
        layer.load_state_dict(base.state_dict())
        x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        out[impl] = (y, x.grad, layer.experts.gate_up_proj.grad, layer.experts.down_proj.grad,
                     layer.gate.weight.grad)  # fmt: skip
    assert (out["loop"][0] != 0).any()
    for a, b in zip(out["loop"], out["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_experts_grouped_backends_agree_in_float16():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 16, generator=gen).half()
    experts = torch.randint(0, 5, (30, 2), generator=gen)
    weights = torch.rand(30, 2, generator=gen)
    gu = (torch.randn(5, 32, 16, generator=gen) / 4).half()
    dn = (torch.randn(5, 16, 16, generator=gen) / 4).half()
    ref = experts_grouped(x.double(), experts, weights, gu.double(), dn.double())
    got = experts_grouped(x, experts, weights, gu, dn, backend="triton")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), ref, rtol=5e-3, atol=5e-3)


def test_bad_backend_and_unsupported_dtype_are_named():
    x, w = torch.randn(4, 16), torch.randn(1, 16, 16)
    offs = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_matmul(x, w, offs, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*float64"):
        grouped_matmul(x.double(), w.double(), offs, backend="triton")


def test_row_tiles_cover_every_row_once_against_a_loop():
    from effarch.moe import row_tiles

    sizes, block = [5, 0, 70, 1, 0, 32], 32
    offs = torch.tensor(sizes).cumsum(0)
    group, start = row_tiles(offs, int(offs[-1]) + 3, block)
    expected, row = [], 0
    for g, n in enumerate(sizes):  # a tile per block_m rows of each group, in order
        expected += [(g, row + i) for i in range(0, n, block)]
        row += n
    got = [(g, s) for g, s in zip(group.tolist(), start.tolist(), strict=True) if g >= 0]
    assert got == expected
    assert len(group) == (int(offs[-1]) + 3 + block - 1) // block + len(sizes)
    assert (group[len(got) :] == -1).all()
