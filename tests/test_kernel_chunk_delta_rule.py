"""The chunkwise (gated) delta-rule Triton kernel (interpreter on CPU), forward only, against a
step loop in float64, and its wiring behind delta_rule / gated_delta_rule."""

import pytest
import torch
import torch.nn.functional as F
from tf32 import PRODUCTS

pytest.importorskip("triton")
pytestmark = pytest.mark.kernel
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def loop(q, k, v, beta, g, scale, h0=None):
    """The recurrence, one step at a time, in float64 (shares nothing with the kernel)."""
    b, t, h, dk = q.shape
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    if h0 is not None:
        s = h0.double().clone()
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        qi, ki, vi = (x[:, i].double() for x in (q, k, v))
        if g is not None:
            s = s * g[:, i].double().exp()[..., None, None]
        err = vi - torch.einsum("bhkv,bhk->bhv", s, ki)
        s = s + torch.einsum("bhk,bhv->bhkv", ki, beta[:, i].double()[..., None] * err)
        out[:, i] = torch.einsum("bhkv,bhk->bhv", s, qi * scale)
    return out, s


def inputs(t, dk, dv, *, h=2, gated=True, with_h0=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(t * 1000 + dk * 10 + dv)
    q = torch.randn(1, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(1, t, h, dk, generator=gen), dim=-1)  # the stable regime
    v = torch.randn(1, t, h, dv, generator=gen)
    beta = torch.rand(1, t, h, generator=gen)
    g = -torch.rand(1, t, h, generator=gen) if gated else None
    h0 = torch.randn(1, h, dk, dv, generator=gen) if with_h0 else None
    return q.to(dtype), k.to(dtype), v.to(dtype), beta, g, h0


def kernel(q, k, v, beta, g, h0, scale, **kw):
    from effarch.linear.delta_kernel import chunk_delta_rule

    on = [x.to(DEV) if x is not None else None for x in (q, k, v, beta, g, h0)]
    return chunk_delta_rule(*on[:5], scale=scale, initial_state=on[5],
                            output_final_state=True, **kw)  # fmt: skip


# (T, K, V, gated, with_h0, chunk_size): ragged T, K != V, dims not powers of two.
FORWARD = [
    (1, 16, 16, True, False, 16),
    (17, 20, 40, True, True, 16),
    (17, 24, 12, False, True, 32),
    (100, 24, 40, True, False, 32),
    (100, 40, 24, False, True, 16),
    (100, 12, 20, True, True, 64),
    (40, 128, 100, True, True, 32),
]


@pytest.mark.parametrize(("t", "dk", "dv", "gated", "with_h0", "chunk"), FORWARD)
def test_forward_matches_the_step_loop(t, dk, dv, gated, with_h0, chunk):
    q, k, v, beta, g, h0 = inputs(t, dk, dv, gated=gated, with_h0=with_h0)
    want_o, want_s = loop(q, k, v, beta, g, dk**-0.5, h0)
    o, s = kernel(q, k, v, beta, g, h0, dk**-0.5, chunk_size=chunk)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_fp16_within_twice_the_error_of_a_pytorch_fp16_run(gated):
    from effarch.linear.ops import delta_rule, gated_delta_rule

    q, k, v, beta, g, h0 = inputs(100, 24, 40, gated=gated, with_h0=True, dtype=torch.float16)
    want, _ = loop(q, k, v, beta, g, 24**-0.5, h0)  # float64 from the same fp16 inputs
    kw = dict(scale=24**-0.5, initial_state=h0, chunk_size=32, backend="torch")
    if gated:
        torch_o, _ = gated_delta_rule(q, k, v, g, beta, **kw)
    else:
        torch_o, _ = delta_rule(q, k, v, beta, **kw)
    budget = (torch_o.double() - want).abs().max().item()  # fp16 output rounding and more
    o, _ = kernel(q, k, v, beta, g, h0, 24**-0.5, chunk_size=32)
    assert o.dtype == torch.float16
    assert (o.cpu().double() - want).abs().max().item() <= 2 * budget


def test_bfloat16_is_computed_in_float32():
    q, k, v, beta, g, _ = inputs(17, 16, 16, dtype=torch.bfloat16)
    o, s = kernel(q, k, v, beta, g, None, 0.25, chunk_size=16)
    want, want_s = loop(q, k, v, beta, g, 0.25)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(o.cpu().double(), want.bfloat16().double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-4, atol=1e-4)


def test_forward_at_the_blocks_of_a_gpu(monkeypatch):
    """The value blocks a GPU takes (64 columns, 32 in the states kernel), run here under
    the interpreter, which otherwise takes all of V at once."""
    from effarch_kernels import chunk_delta_rule as cdr

    monkeypatch.setattr(cdr, "interpreting", lambda: False)  # only _config reads it
    assert cdr._config(128, 100, 16)[2] == 64
    q, k, v, beta, g, h0 = inputs(40, 128, 100, with_h0=True)
    o, s = kernel(q, k, v, beta, g, h0, 0.1, chunk_size=16)
    want_o, want_s = loop(q, k, v, beta, g, 0.1, h0)
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-5, atol=1e-5)


def test_no_output_element_is_left_unwritten(poison_empty):
    q, k, v, beta, g, h0 = inputs(50, 20, 36, with_h0=True)
    o, s = kernel(q, k, v, beta, g, h0, 0.2, chunk_size=16)
    assert not o.isnan().any() and not s.isnan().any()
    want_o, want_s = loop(q, k, v, beta, g, 0.2, h0)
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    from effarch.linear.delta_kernel import chunk_delta_rule

    q, k, v, beta, g, _ = inputs(8, 16, 16, h=1)
    with pytest.raises(ValueError, match="log decays"):
        chunk_delta_rule(q, k, v, beta, -g)
    with pytest.raises(ValueError, match="power of two"):
        chunk_delta_rule(q, k, v, beta, g, chunk_size=48)
    with pytest.raises(ValueError, match="K up to 256"):
        big = torch.zeros(1, 8, 1, 300)
        chunk_delta_rule(big, big, big, beta)
    with pytest.raises(ValueError, match=r"beta must have shape \[B, T, H\]"):
        chunk_delta_rule(q, k, v, beta[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_rule(q, k, v, beta, g, initial_state=torch.zeros(1, 1, 16, 8))
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        chunk_delta_rule(q, k, v.double(), beta)
    with pytest.raises(ValueError, match="forward only"):
        chunk_delta_rule(q, k, v.requires_grad_(), beta, g)
    with torch.no_grad():  # inference on tensors that require grad is fine
        o, _ = chunk_delta_rule(q.to(DEV), k.to(DEV), v.to(DEV), beta.to(DEV), g.to(DEV))
    assert not o.requires_grad


# ------------------------------------------------------------------------------------------
# The kernels' matrix products: 3xTF32 ("tf32x3") keeps the float32 accuracy
# ------------------------------------------------------------------------------------------


def kernel_algorithm(q, k, v, beta, g, scale, h0, mm, bt=64):
    """The kernels' chunkwise algorithm (module docstring of chunk_delta_rule) in float32
    PyTorch with every matrix product taken by ``mm``: A, T = (I + A)^-1 by doubling, W and
    U, then X = U - W S, the outputs and the state update, chunk after chunk."""
    b, t, h, dk = q.shape
    state = h0.float().clone()
    out = torch.zeros(b, t, h, v.shape[-1])
    for c0 in range(0, t, bt):
        qc, kc, vc = (x[:, c0 : c0 + bt].float().transpose(1, 2) for x in (q, k, v))
        bc = beta[:, c0 : c0 + bt].transpose(1, 2)
        gc = g[:, c0 : c0 + bt].transpose(1, 2).cumsum(-1)
        i = torch.arange(qc.shape[2])
        gap = gc[..., :, None] - gc[..., None, :]
        a = mm(kc, kc.mT) * gap.masked_fill(i[:, None] <= i, -torch.inf).exp() * bc[..., None]
        t_inv = torch.eye(len(i)).expand_as(a)
        diff, lvl = i[:, None] ^ i, 0
        while 1 << lvl < len(i):
            t_inv = t_inv - mm(mm(t_inv, a * ((diff >> lvl) == 1)), t_inv)
            lvl += 1
        w = mm(t_inv, kc * (bc * gc.exp())[..., None])
        x = mm(t_inv, vc * bc[..., None]) - mm(w, state)
        scores = mm(qc, kc.mT) * gap.masked_fill(i[:, None] < i, -torch.inf).exp()
        o = mm(qc * gc.exp()[..., None], state) + mm(scores, x)
        out[:, c0 : c0 + bt] = (o * scale).transpose(1, 2)
        last = gc[..., -1:]
        state = state * last[..., None].exp() + mm((kc * (last - gc).exp()[..., None]).mT, x)
    return out, state


def test_3xtf32_products_keep_the_forward_as_accurate_as_float32():
    """The GPU kernels take each float32 product as three TF32 ones (``PRECISION``): emulated
    here at K = V = 128 over 512 steps, the outputs and the final state stay as close to the
    float64 step loop as with float32 products, within the 1e-5 the kernel tests ask; one
    TF32 product per float32 one (the tensor cores' default) misses that by far."""
    q, k, v, beta, g, h0 = inputs(512, 128, 128, with_h0=True)
    want_o, want_s = loop(q, k, v, beta, g, 128**-0.5, h0)
    err = {}
    for name, mm in PRODUCTS.items():
        o, s = kernel_algorithm(q, k, v, beta, g, 128**-0.5, h0, mm)
        err[name] = max((o.double() - want_o).abs().max(), (s.double() - want_s).abs().max())
    assert err["float32"] < 1e-5 and err["tf32x3"] < 1e-5, err
    assert err["tf32x3"] < 2 * err["float32"], err  # the same accuracy, within a factor 2
    assert err["tf32"] > 100 * err["tf32x3"], err


# ------------------------------------------------------------------------------------------
# The ops' backend switch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_backend_triton_equals_the_recurrent_mode(gated):
    from effarch.linear.ops import delta_rule, gated_delta_rule

    tensors = inputs(40, 20, 24, gated=gated, with_h0=True)
    q, k, v, beta, g, h0 = (x.to(DEV) if x is not None else None for x in tensors)

    def run(**kw):
        common = dict(initial_state=h0, output_final_state=True, **kw)
        if gated:
            return gated_delta_rule(q, k, v, g, beta, **common)
        return delta_rule(q, k, v, beta, **common)

    want_o, want_s = run(mode="recurrent", backend="torch")
    o, s = run(mode="chunk", chunk_size=16, backend="triton")
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=1e-5)


def test_backend_errors_and_auto(monkeypatch):
    from effarch.linear import ops

    q, k, v, beta, g, _ = inputs(20, 16, 16)
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*forward only"):
        ops.gated_delta_rule(q.requires_grad_(), k, v, g, beta, backend="triton")
    q = q.detach()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.delta_rule(q, k, v, beta, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*chunk form"):
        ops.delta_rule(q, k, v, beta, mode="recurrent", backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*K up to 256"):
        big = torch.zeros(1, 4, 1, 300)
        ops.delta_rule(big, big, big, torch.zeros(1, 4, 1), backend="triton")

    # auto keeps PyTorch on a CPU, and wherever an input requires grad
    def boom(*a, **kw):
        raise AssertionError("auto must not run the forward-only kernel here")

    monkeypatch.setattr("effarch_kernels.chunk_delta_rule.chunk_delta_rule_fwd", boom)
    if DEV == "cpu":
        ops.delta_rule(q, k, v, beta)
    qd, kd, vd, bd, gd = (t.to(DEV) for t in (q, k, v, beta, g))
    ops.gated_delta_rule(qd.requires_grad_(), kd, vd, gd, bd)
