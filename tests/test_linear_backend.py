"""The ops' backend switch: the Triton chunk kernel behind mode="chunk"."""

import pytest
import torch

from effarch.linear import linear_attention, retention, simple_gla

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(t=70, h=2, dk=16, dv=24):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, t, h, dk, generator=gen).to(DEV) for _ in range(2))
    v = torch.randn(1, t, h, dv, generator=gen).to(DEV)
    g = (-torch.rand(1, t, h, generator=gen)).to(DEV)
    return q, k, v, g


@pytest.mark.kernel
@pytest.mark.parametrize("op", ["simple_gla", "retention", "linear_attention"])
def test_triton_backend_equals_torch_backend(op):
    q, k, v, g = qkv()
    s0 = torch.randn(1, 2, 16, 24, device=DEV)
    if op == "simple_gla":
        run = lambda backend: simple_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                                         chunk_size=16, backend=backend)  # fmt: skip
    elif op == "retention":
        run = lambda backend: retention(q, k, v, output_final_state=True, chunk_size=16,
                                        backend=backend)  # fmt: skip
    else:
        run = lambda backend: linear_attention(q, k, v, output_final_state=True, chunk_size=16,
                                               backend=backend)  # fmt: skip
    (o_t, s_t), (o_k, s_k) = run("torch"), run("triton")
    torch.testing.assert_close(o_k, o_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_k, s_t, rtol=1e-4, atol=1e-4)


@pytest.mark.kernel
def test_triton_backend_is_differentiable():
    q, k, v, g = (t.requires_grad_() for t in qkv(t=40))
    o, _ = simple_gla(q, k, v, g, chunk_size=16, backend="triton")
    grads = torch.autograd.grad(o.square().sum(), (q, k, v, g))
    q2, k2, v2, g2 = (t.detach().requires_grad_() for t in (q, k, v, g))
    o2, _ = simple_gla(q2, k2, v2, g2, chunk_size=16, backend="torch")
    want = torch.autograd.grad(o2.square().sum(), (q2, k2, v2, g2))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_uses_torch_on_a_cpu(monkeypatch):
    """Even under the interpreter (set by conftest on a CPU), "auto" runs PyTorch on CPU
    tensors: the kernel's launcher is never reached."""
    if DEV == "cuda":
        pytest.skip("on a GPU auto picks the kernel")

    def boom(*a, **kw):
        raise AssertionError("auto must not run the kernel on a CPU")

    monkeypatch.setattr("effarch_kernels.chunk_scalar_decay.chunk_scalar_decay_fwd", boom)
    q, k, v, g = qkv()
    simple_gla(q, k, v, g)  # backend="auto"
    retention(q, k, v, chunk_size=16)
    linear_attention(q, k, v, chunk_size=16)


def test_the_backend_rule():
    """effarch._kernels.use_triton, the one switch every fast path asks: "torch" never,
    "triton" always or a ValueError with the reason, "auto" only on CUDA tensors."""
    from effarch._kernels import use_triton

    x = torch.zeros(2, 3, device=DEV)
    assert use_triton("torch", x) is False
    assert use_triton("triton", x) is True  # a GPU, or the interpreter on a CPU
    assert use_triton("auto", x) is (DEV == "cuda")
    assert use_triton("auto", x, limit="too big") is False
    with pytest.raises(ValueError, match="backend='triton' cannot run: too big"):
        use_triton("triton", x, limit="too big")
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*forward only"):
        use_triton("triton", x, forward_only=(x.requires_grad_(),))
    with torch.no_grad():  # nothing is recorded, so a forward-only kernel may run
        assert use_triton("triton", x, forward_only=(x,)) is True
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*float64"):
        use_triton("triton", x.double())
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch', 'triton'\]"):
        use_triton("cuda", x)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(mode="recurrent"), "chunk form"),
        (dict(chunk_size=24), "chunk_size must be a power of two >= 16, got 24"),
        (dict(chunk_size=8), "chunk_size must be a power of two >= 16, got 8"),
    ],
)
def test_triton_backend_explains_why_it_cannot_run(kwargs, words):
    q, k, v, g = qkv()
    with pytest.raises(ValueError, match=f"backend='triton' cannot run: .*{words}"):
        simple_gla(q, k, v, g, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="backend must be one of"):
        simple_gla(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="does not normalise"):
        linear_attention(q, k, v, normalize=True, backend="triton")


@pytest.mark.kernel
@pytest.mark.parametrize("variant", ["linear", "simple_gla", "gla", "delta", "gated_delta"])
def test_fused_recurrent_equals_the_ops_recurrent_mode(variant):
    import torch.nn.functional as F

    from effarch.linear import (
        delta_rule,
        fused_recurrent,
        gated_delta_rule,
        gla,
    )

    q, k, v, g = qkv(t=20)
    gk = -torch.rand(1, 20, 2, 16).to(DEV)
    beta = torch.rand(1, 20, 2).to(DEV)
    kn = F.normalize(k, dim=-1)
    if variant == "linear":
        want, _ = linear_attention(q, k, v, mode="recurrent")
        got, _ = fused_recurrent(q, k, v)
    elif variant == "simple_gla":
        want, _ = simple_gla(q, k, v, g, mode="recurrent")
        got, _ = fused_recurrent(q, k, v, g=g)
    elif variant == "gla":
        want, _ = gla(q, k, v, gk, mode="recurrent")
        got, _ = fused_recurrent(q, k, v, gk=gk)
    elif variant == "delta":
        want, _ = delta_rule(q, kn, v, beta, mode="recurrent")
        got, _ = fused_recurrent(q, kn, v, beta=beta)
    else:
        want, _ = gated_delta_rule(q, kn, v, g, beta, mode="recurrent")
        got, _ = fused_recurrent(q, kn, v, g=g, beta=beta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fused_recurrent_rejects_bad_shapes():
    from effarch.linear import fused_recurrent

    q, k, v, g = qkv(t=8)
    with pytest.raises(ValueError, match="beta"):
        fused_recurrent(q, k, v, beta=torch.rand(1, 8, 3))
    with pytest.raises(ValueError, match="k must have the shape of q"):
        fused_recurrent(q, k[..., :8], v)


def test_linear_attention_costs():
    from effarch.linear import linear_attention_costs

    t, k, v = 4096, 64, 32
    rec = linear_attention_costs(t, k, v, form="recurrent")
    par = linear_attention_costs(t, k, v, form="parallel")
    assert rec == {"flops": 4 * t * k * v, "sequential_steps": t, "intermediate": k * v}
    assert par["flops"] == 2 * t * t * (k + v) and par["sequential_steps"] == 1
    # the chunk form interpolates between the two
    whole = linear_attention_costs(t, k, v, form="chunk", chunk_size=t)
    assert whole["flops"] == par["flops"] + rec["flops"] and whole["sequential_steps"] == 1
    one = linear_attention_costs(t, k, v, form="chunk", chunk_size=1)
    assert one["sequential_steps"] == t and one["flops"] == rec["flops"] + 2 * t * (k + v)
    c64 = linear_attention_costs(t, k, v, form="chunk", chunk_size=64)
    assert c64["sequential_steps"] == 64 and c64["flops"] < par["flops"]
    assert c64["intra_flops"] + c64["state_flops"] == c64["flops"]
    assert c64["state_flops"] == rec["flops"]
    with pytest.raises(ValueError, match="form"):
        linear_attention_costs(t, k, v, form="fused")


def test_kernel_limits_have_one_source():
    """The limits live in effarch_kernels.limits (no Triton needed); the ops' reasons and the
    kernel functions' errors are its sentences."""
    from effarch_kernels import limits

    from effarch.linear import chunk_kernel

    assert [c for c in range(1, 300) if limits.chunk_size_supported(c)] == [16, 32, 64, 128, 256]
    assert chunk_kernel.MAX_KEY_DIM == limits.MAX_KEY_DIM == 256
    assert limits.key_dim_reason(256) is None and "K up to 256" in limits.key_dim_reason(257)
    assert limits.state_dim_reason(0) and limits.state_dim_reason(1) is None
    assert chunk_kernel.chunk_kernel_limit("chunk", 64, 256) is None
    assert chunk_kernel.chunk_kernel_limit("chunk", 48, 16) == limits.chunk_size_reason(48)
    q, k, v, g = qkv()
    with pytest.raises(ValueError, match=limits.chunk_size_reason(48)):
        chunk_kernel.chunk_scalar_decay(q, k, v, g, scale=None, chunk_size=48)


def test_chunk_scalar_decay_scale_defaults_to_none():
    """``scale`` had no default although None means ``K ** -0.5``: leaving it out raised a
    TypeError before any check; now the call reaches the checks."""
    import inspect

    from effarch.linear import chunk_kernel

    assert inspect.signature(chunk_kernel.chunk_scalar_decay).parameters["scale"].default is None
    q, k, v, g = qkv()
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        chunk_kernel.chunk_scalar_decay(q, k, v, g, chunk_size=48)
