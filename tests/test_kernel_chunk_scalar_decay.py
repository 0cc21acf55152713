"""The chunkwise scalar-decay Triton kernel (interpreter on CPU), forward and backward, against
autograd through the float64 recurrent ops."""

import pytest
import torch

from effarch.attention.flash import triton_available
from effarch.linear.ops import linear_attention, simple_gla

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b, t, h, dk, dv, *, gated=True, with_h0=False, decay=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(t * 1000 + dk + dv)
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    g = -decay * torch.rand(b, t, h, generator=gen) if gated else None
    h0 = torch.randn(b, h, dk, dv, generator=gen) if with_h0 else None
    cast = [x.to(dtype) for x in (q, k, v)]
    return (*cast, g, h0)


def reference(q, k, v, g, h0, scale):
    """The recurrent op in float64 (differentiable): ``(o, final_state)``."""
    q, k, v = q.double(), k.double(), v.double()
    h0 = h0.double() if h0 is not None else None
    kw = dict(scale=scale, initial_state=h0, output_final_state=True, mode="recurrent")
    if g is None:
        return linear_attention(q, k, v, **kw)
    return simple_gla(q, k, v, g.double(), **kw)


def kernel(q, k, v, g, h0, scale, **kw):
    from effarch.linear.chunk_kernel import chunk_scalar_decay

    on = [x.to(DEV) if x is not None else None for x in (q, k, v, g, h0)]
    return chunk_scalar_decay(*on[:4], scale=scale, initial_state=on[4],
                              output_final_state=True, **kw)  # fmt: skip


# (T, K, V, gated, with_h0, chunk_size): ragged T, K and V not powers of two, many chunks.
FORWARD = [
    (1, 16, 16, True, False, 64),
    (17, 24, 40, True, True, 64),
    (100, 24, 40, False, True, 64),
    (100, 40, 24, True, False, 16),
    (200, 40, 24, True, True, 64),
    (128, 128, 100, False, False, 64),
]


@pytest.mark.parametrize(("t", "dk", "dv", "gated", "with_h0", "chunk"), FORWARD)
def test_forward_matches_the_recurrence(t, dk, dv, gated, with_h0, chunk):
    q, k, v, g, h0 = inputs(2, t, 2, dk, dv, gated=gated, with_h0=with_h0)
    want_o, want_s = reference(q, k, v, g, h0, dk**-0.5)
    o, s = kernel(q, k, v, g, h0, dk**-0.5, chunk_size=chunk)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-4, atol=1e-4)


def test_strong_decay_underflows_without_nan():
    q, k, v, g, h0 = inputs(1, 200, 2, 24, 40, with_h0=True, decay=8.0)
    want_o, want_s = reference(q, k, v, g, h0, 0.5)
    o, s = kernel(q, k, v, g, h0, 0.5)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-4, atol=1e-4)


def _grads(fn, tensors, do, ds):
    """Gradients of ``<o, do> + <S_T, ds>`` (a term dropped when its weight is None)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in tensors]
    o, s = fn(*leaves)
    loss = 0.0
    if do is not None:
        loss = loss + (o.double() * do.to(o.device).double()).sum()
    if ds is not None:
        loss = loss + (s.double() * ds.to(s.device).double()).sum()
    loss.backward()
    # a tensor the loss does not reach (q when only the state is used) has a zero gradient
    return [
        None
        if x is None
        else torch.zeros_like(x.double())
        if x.grad is None
        else x.grad.cpu().double()
        for x in leaves
    ]


# (T, K, V, gated, with_h0, use_o, use_state, chunk_size)
BACKWARD = [
    (17, 24, 40, True, True, True, True, 64),
    (100, 40, 24, True, False, True, False, 64),
    (100, 24, 40, True, True, False, True, 16),
    (200, 24, 40, False, True, True, True, 64),
]


@pytest.mark.parametrize(("t", "dk", "dv", "gated", "with_h0", "use_o", "use_s", "chunk"), BACKWARD)
def test_gradients_match_autograd_through_the_recurrence(
    t, dk, dv, gated, with_h0, use_o, use_s, chunk
):
    tensors = inputs(1, t, 2, dk, dv, gated=gated, with_h0=with_h0)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, t, 2, dv, generator=gen) if use_o else None
    ds = torch.randn(1, 2, dk, dv, generator=gen) if use_s else None
    scale = dk**-0.5
    want = _grads(lambda *x: reference(*x, scale), tensors, do, ds)
    got = _grads(lambda *x: kernel(*x, scale, chunk_size=chunk), tensors, do, ds)
    for name, a, b in zip(("q", "k", "v", "g", "initial_state"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dk", [40, 128, 256])
def test_gradients_at_the_blocks_of_a_gpu(monkeypatch, dk):
    """The blocks a GPU takes (value blocks of at most 64 columns, 32 or 16 in the backward
    dq/dk/dv kernel, which then loops over several; at K = 256 and float32 a backward in
    chunks of 32), run here under the interpreter, which otherwise takes all of V at once in
    the outputs and dq/dk/dv kernels."""
    from effarch_kernels import chunk_scalar_decay as csd

    monkeypatch.setattr(csd, "interpreting", lambda: False)  # only the block sizes read it
    assert csd._config(dk, 100, 16, torch.float32)[2] < 100
    tensors = inputs(1, 100, 2, dk, 100, gated=True, with_h0=True)
    gen = torch.Generator().manual_seed(2)
    do, ds = torch.randn(1, 100, 2, 100, generator=gen), torch.randn(1, 2, dk, 100, generator=gen)
    want = _grads(lambda *x: reference(*x, 0.1), tensors, do, ds)
    # at K = 256 and float32 the backward cuts chunks of 32 where the forward cut 64
    got = _grads(lambda *x: kernel(*x, 0.1, chunk_size=64), tensors, do, ds)
    for name, a, b in zip(("q", "k", "v", "g", "initial_state"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_fp16_forward_within_the_error_of_a_pytorch_fp16_run():
    q, k, v, g, _ = inputs(2, 100, 2, 24, 40, dtype=torch.float16)
    want, _ = reference(q, k, v, g, None, 24**-0.5)  # float64 from the same fp16 inputs
    torch_o, _ = simple_gla(q, k, v, g.half(), scale=24**-0.5, mode="chunk")
    budget = (torch_o.double() - want).abs().max().item()  # fp16 output rounding and more
    o, _ = kernel(q, k, v, g.half(), None, 24**-0.5)
    assert o.dtype == torch.float16
    assert (o.cpu().double() - want).abs().max().item() <= 4 * budget


def test_bfloat16_on_cpu_is_computed_in_float32():
    if DEV != "cpu":
        pytest.skip("the float32 fallback is for the interpreter")
    q, k, v, g, _ = inputs(1, 17, 2, 16, 16, dtype=torch.bfloat16)
    o, _ = kernel(q, k, v, g, None, 0.25)
    want, _ = reference(q, k, v, g, None, 0.25)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.double(), want.bfloat16().double(), rtol=1e-2, atol=1e-2)


def test_no_output_element_is_left_unwritten(poison_empty):
    tensors = inputs(1, 100, 2, 24, 40, with_h0=True)
    do, ds = torch.randn(1, 100, 2, 40), torch.randn(1, 2, 24, 40)
    o, s = kernel(*tensors, 0.2)
    assert not o.isnan().any() and not s.isnan().any()
    grads = _grads(lambda *x: kernel(*x, 0.2), tensors, do, ds)
    assert all(not x.isnan().any() for x in grads)


def test_clear_errors():
    from effarch.linear.chunk_kernel import chunk_scalar_decay

    q, k, v, g, _ = inputs(1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="log decays"):
        chunk_scalar_decay(q, k, v, -g, scale=0.25)
    with pytest.raises(ValueError, match="power of two"):
        chunk_scalar_decay(q, k, v, g, scale=0.25, chunk_size=48)
    with pytest.raises(ValueError, match="K up to 256"):
        chunk_scalar_decay(*(torch.zeros(1, 8, 1, 300) for _ in range(3)), scale=1.0)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_scalar_decay(q, k, v, g, scale=0.25, initial_state=torch.zeros(1, 1, 16, 8))


def test_cpu_without_the_interpreter_or_triton_is_refused(monkeypatch):
    from effarch.linear.chunk_kernel import chunk_scalar_decay

    q, k, v, g, _ = inputs(1, 8, 1, 16, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 is not set"):
        chunk_scalar_decay(q, k, v, g, scale=0.25)
    monkeypatch.setattr("effarch._kernels.triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        chunk_scalar_decay(q.to(DEV), k.to(DEV), v.to(DEV), g.to(DEV), scale=0.25)


def test_the_poison_fixture_poisons(poison_empty):
    """The kernel tests' NaN fixture does fill what torch.empty* return (floats only)."""
    assert torch.empty(3, 4).isnan().all()
    assert torch.empty_like(torch.zeros(5, dtype=torch.float16)).isnan().all()
    assert torch.empty(3, dtype=torch.int64).dtype == torch.int64
