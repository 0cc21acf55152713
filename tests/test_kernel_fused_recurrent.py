"""The fused recurrent Triton kernel (interpreter on CPU) against a step loop in float64."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.kernel
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def loop(q, k, v, *, g=None, gk=None, beta=None, scale, h0=None):
    """The recurrence, one step at a time, in float64 (shares nothing with the kernel)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    s = torch.zeros(b, h, dk, dv, dtype=torch.float64) if h0 is None else h0.double().clone()
    out = torch.zeros(b, t, h, dv, dtype=torch.float64)
    for i in range(t):
        qi, ki, vi = (x[:, i].double() for x in (q, k, v))
        if g is not None:
            s = s * g[:, i].double().exp()[..., None, None]
        if gk is not None:
            s = s * gk[:, i].double().exp()[..., None]
        if beta is not None:
            pred = torch.einsum("bhkv,bhk->bhv", s, ki)
            vi = beta[:, i].double()[..., None] * (vi - pred)
        s = s + torch.einsum("bhk,bhv->bhkv", ki, vi)
        out[:, i] = torch.einsum("bhkv,bhk->bhv", s, qi * scale)
    return out, s


VARIANTS = ["linear", "simple_gla", "gla", "delta", "gated_delta"]


def inputs(variant, b=1, t=24, h=2, dk=20, dv=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    kw = {}
    if variant in ("simple_gla", "gated_delta"):
        kw["g"] = -torch.rand(b, t, h, generator=gen)
    if variant == "gla":
        kw["gk"] = -torch.rand(b, t, h, dk, generator=gen)
    if variant in ("delta", "gated_delta"):
        k = torch.nn.functional.normalize(k, dim=-1)  # the delta rule's stable regime
        kw["beta"] = torch.rand(b, t, h, generator=gen)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), {n: x.to(dtype) for n, x in kw.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_kernel_matches_the_step_loop(variant, with_h0):
    from effarch_kernels.fused_recurrent import fused_recurrent

    (q, k, v), kw = inputs(variant)
    h0 = torch.randn(1, 2, 20, 40) if with_h0 else None
    want_o, want_s = loop(q, k, v, scale=20**-0.5, h0=h0, **kw)
    o, s = fused_recurrent(
        *(x.to(DEV) for x in (q, k, v)), scale=20**-0.5, output_final_state=True,
        initial_state=None if h0 is None else h0.to(DEV),
        **{n: x.to(DEV) for n, x in kw.items()},
    )  # fmt: skip
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-5, atol=1e-5)


def test_kernel_fp16_and_poisoned_outputs(poison_empty):
    from effarch_kernels.fused_recurrent import fused_recurrent

    (q, k, v), kw = inputs("gated_delta", dtype=torch.float16, dv=100)  # ragged V blocks
    o, _ = fused_recurrent(*(x.to(DEV) for x in (q, k, v)), scale=20**-0.5,
                           **{n: x.to(DEV) for n, x in kw.items()})  # fmt: skip
    assert o.dtype == torch.float16 and not o.isnan().any()
    want, _ = loop(q, k, v, scale=20**-0.5, **kw)
    assert (o.cpu().double() - want).abs().max() < 2e-2
