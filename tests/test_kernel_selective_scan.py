"""The selective-scan Triton kernel (interpreter on CPU), forward only, against a step loop in
float64, and its wiring behind selective_scan's backend switch."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.kernel
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """Mamba's recurrence, one step at a time, in float64 (shares nothing with the kernel)."""
    u, delta, A, B, C = (x.double() for x in (u, delta, A, B, C))
    b, t, d = u.shape
    B = B if B.ndim == 4 else B[:, :, None]
    C = C if C.ndim == 4 else C[:, :, None]
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for i in range(t):
        dt = delta[:, i] + (delta_bias.double() if delta_bias is not None else 0.0)
        if delta_softplus:
            dt = torch.log1p(torch.exp(dt))
        b_i = B[:, i].repeat_interleave(d // B.shape[2], dim=1)  # [b, d, N]: channel's group
        c_i = C[:, i].repeat_interleave(d // C.shape[2], dim=1)
        h = torch.exp(dt[..., None] * A) * h + (dt * u[:, i])[..., None] * b_i
        y = (h * c_i).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, i]
        if z is not None:
            zi = z[:, i].double()
            y = y * zi * torch.sigmoid(zi)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def inputs(t, d, n, *, groups_b=1, groups_c=1, full=True, dtype=torch.float32):
    """Mamba-like inputs: negative A, moderate steps. ``groups = 0`` means ungrouped
    ``[B, T, N]``; ``full`` adds D, z and delta_bias."""
    gen = torch.Generator().manual_seed(t * 100 + d + n)
    u = torch.randn(1, t, d, generator=gen)
    delta = torch.randn(1, t, d, generator=gen) - 1.0  # softplus(delta) around 0.3
    A = -torch.rand(d, n, generator=gen) * 2 - 0.1
    B = torch.randn(1, t, *([groups_b] if groups_b else []), n, generator=gen)
    C = torch.randn(1, t, *([groups_c] if groups_c else []), n, generator=gen)
    kw = {}
    if full:
        kw = dict(D=torch.randn(d, generator=gen), z=torch.randn(1, t, d, generator=gen),
                  delta_bias=torch.rand(d, generator=gen) * 0.5)  # fmt: skip
    if dtype != torch.float32:
        u, delta, B, C = (x.to(dtype) for x in (u, delta, B, C))
        if "z" in kw:
            kw["z"] = kw["z"].to(dtype)
    return (u, delta, A, B, C), kw


def kernel(args, kw, **flags):
    from effarch.ssm.scan_kernel import selective_scan_kernel

    on = {n: x.to(DEV) for n, x in kw.items()}
    return selective_scan_kernel(*(x.to(DEV) for x in args), **on, **flags)


# (T, D, N, groups of B, groups of C (0: ungrouped [B, T, N]), D/z/delta_bias, softplus)
FORWARD = [
    (1, 8, 4, 1, 1, False, False),
    (17, 24, 12, 2, 3, True, True),
    (100, 40, 16, 0, 0, True, True),
    (64, 20, 5, 4, 1, False, True),
    (33, 12, 16, 0, 2, True, False),
]


@pytest.mark.parametrize(("t", "d", "n", "gb", "gc", "full", "softplus"), FORWARD)
def test_forward_matches_the_step_loop(t, d, n, gb, gc, full, softplus):
    args, kw = inputs(t, d, n, groups_b=gb, groups_c=gc, full=full)
    if not softplus:  # keep the steps positive without the softplus
        args = (args[0], args[1].abs() * 0.5, *args[2:])
    want_y, want_h = loop(*args, **kw, delta_softplus=softplus)
    y, h = kernel(args, kw, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu().double(), want_h, rtol=1e-5, atol=1e-5)


def test_initial_state_is_loaded_and_backend_auto_wires_it():
    from effarch.ssm.selective import selective_scan

    args, kw = inputs(9, 20, 6, groups_b=2)
    h0 = torch.randn(1, 20, 6)
    want_y, want_h = loop(*args, **kw, delta_softplus=True, h0=h0)
    y, h = kernel(args, kw, delta_softplus=True, return_last_state=True, initial_state=h0.to(DEV))
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu().double(), want_h, rtol=1e-5, atol=1e-5)
    on = {n: x.to(DEV) for n, x in kw.items()}
    y_t, h_t = selective_scan(*(x.to(DEV) for x in args), **on, delta_softplus=True,
                              return_last_state=True, backend="triton",
                              initial_state=h0.to(DEV))  # fmt: skip
    torch.testing.assert_close(y_t, y)
    torch.testing.assert_close(h_t, h)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        kernel(args, kw, initial_state=torch.zeros(1, 6, 20, device=DEV))


def test_softplus_of_large_and_very_negative_steps():
    args, kw = inputs(8, 12, 4, full=False)
    delta = torch.tensor([-40.0, -16.0, -3.0, 0.0, 5.0, 19.0, 21.0, 60.0])
    args = (args[0], delta[None, :, None].expand(1, 8, 12).contiguous(), *args[2:])
    want_y, want_h = loop(*args, delta_softplus=True)
    y, h = kernel(args, kw, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu().double(), want_h, rtol=1e-5, atol=1e-5)


def test_fp16_within_twice_the_error_of_a_pytorch_fp16_run():
    from effarch.ssm.selective import selective_scan

    args, kw = inputs(100, 24, 16, groups_b=2, groups_c=2, dtype=torch.float16)
    want, _ = loop(*args, **kw, delta_softplus=True)  # float64 from the same fp16 inputs
    torch_y = selective_scan(*args, **kw, delta_softplus=True, backend="torch")
    budget = (torch_y.double() - want).abs().max().item()  # fp16 output rounding and more
    y = kernel(args, kw, delta_softplus=True)
    assert y.dtype == torch.float16
    assert (y.cpu().double() - want).abs().max().item() <= 2 * budget


def test_bfloat16_is_computed_in_float32():
    args, kw = inputs(17, 16, 8, dtype=torch.bfloat16)
    y, h = kernel(args, kw, delta_softplus=True, return_last_state=True)
    want_y, want_h = loop(*args, **kw, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y.cpu().double(), want_y.bfloat16().double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.cpu().double(), want_h, rtol=1e-5, atol=1e-5)


def test_no_output_element_is_left_unwritten(poison_empty):
    args, kw = inputs(6, 300, 12, groups_b=3, groups_c=5)  # a ragged last block of channels
    y, h = kernel(args, kw, delta_softplus=True, return_last_state=True)
    assert not y.isnan().any() and not h.isnan().any()
    want_y, want_h = loop(*args, **kw, delta_softplus=True)
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    from effarch.ssm.scan_kernel import selective_scan_kernel

    (u, delta, A, B, C), kw = inputs(4, 8, 4)
    with pytest.raises(ValueError, match="forward only"):
        selective_scan_kernel(u.requires_grad_(), delta, A, B, C)
    u = u.detach()
    with pytest.raises(ValueError, match="state size N from 1 to 256"):
        selective_scan_kernel(u, delta, torch.zeros(8, 300), *(torch.zeros(1, 4, 300),) * 2)
    with pytest.raises(ValueError, match="groups of B"):
        selective_scan_kernel(u, delta, A, torch.zeros(1, 4, 3, 4), C)
    with pytest.raises(TypeError, match="delta_softplus must be a bool"):
        selective_scan_kernel(u, delta, A, B, C, delta_softplus=1)
    with pytest.raises(ValueError, match="float32"):  # float64 is refused, not downcast
        selective_scan_kernel(*(x.to(DEV) for x in (u.double(), delta, A, B, C)))


# ------------------------------------------------------------------------------------------
# selective_scan's backend switch
# ------------------------------------------------------------------------------------------


def test_backend_triton_equals_the_recurrent_mode():
    from effarch.ssm.selective import selective_scan

    args, kw = inputs(40, 24, 8, groups_b=2)
    args = tuple(x.to(DEV) for x in args)
    kw = {n: x.to(DEV) for n, x in kw.items()}
    want_y, want_h = selective_scan(*args, **kw, delta_softplus=True, return_last_state=True,
                                    mode="recurrent")  # fmt: skip
    y, h = selective_scan(*args, **kw, delta_softplus=True, return_last_state=True,
                          backend="triton")  # fmt: skip
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    y_only = selective_scan(*args, backend="triton")  # without return_last_state: one tensor
    assert isinstance(y_only, torch.Tensor) and y_only.shape == args[0].shape


def test_backend_errors_and_auto(monkeypatch):
    from effarch.ssm import selective as sel

    (u, delta, A, B, C), _ = inputs(6, 8, 4)
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*forward only"):
        sel.selective_scan(u, delta, A.requires_grad_(), B, C, backend="triton")
    A = A.detach()
    with pytest.raises(ValueError, match="backend must be one of"):
        sel.selective_scan(u, delta, A, B, C, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*N from 1 to 256"):
        big = torch.zeros(1, 6, 300)
        sel.selective_scan(u, delta, torch.zeros(8, 300), big, big, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        sel.selective_scan(u.double(), delta, A, B, C, backend="triton")

    # auto keeps PyTorch on a CPU, and wherever an input requires grad (here: training)
    def boom(*a, **kw):
        raise AssertionError("auto must not run the forward-only kernel here")

    monkeypatch.setattr("effarch_kernels.selective_scan.selective_scan_fwd", boom)
    if DEV == "cpu":
        sel.selective_scan(u, delta, A, B, C)
    ud = u.to(DEV).requires_grad_()
    y = sel.selective_scan(ud, delta.to(DEV), A.to(DEV), B.to(DEV), C.to(DEV))
    y.sum().backward()
    assert ud.grad is not None
