"""tiled_attention and the Triton flash_attention against float64 references.

On a machine without a GPU the kernel runs under the Triton interpreter (see conftest).
"""

import math

import pytest
import torch

from effarch.attention import (
    attention_mask,
    flash_attention,
    naive_attention,
    sdpa_attention,
    tiled_attention,
)
from effarch.attention.flash import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def reference(q, k, v, causal):
    """naive_attention in float64 and the log-sum-exp of its masked, scaled scores."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    o = naive_attention(q64, k64, v64, causal=causal)
    g = q.shape[2] // k.shape[2]
    kk = k64.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q64, kk) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~attention_mask(q.shape[1], k.shape[1], causal=True), -math.inf)
    return o, torch.logsumexp(s, dim=-1)


# (Tq, Tk, Hq, Hkv, D, causal): T in {1, 17, 64, 100, 257}, GQA ratios 1, 2, 4 and all
# (MQA), Tq != Tk both ways, head dims that are not powers of two.
CASES = [
    (1, 1, 2, 2, 16, False),
    (1, 64, 4, 1, 32, True),  # one decoding step against a cache
    (17, 17, 4, 2, 16, True),
    (17, 100, 4, 4, 24, True),
    (64, 64, 8, 2, 64, False),
    (64, 64, 8, 8, 64, True),
    (100, 100, 4, 1, 40, True),
    (100, 17, 2, 2, 16, True),  # more queries than keys: the first rows see nothing
    (257, 257, 2, 1, 32, True),
    (257, 100, 4, 2, 128, False),
]


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), CASES)
@pytest.mark.parametrize(("block_q", "block_k"), [(64, 64), (16, 48)])
def test_tiled_matches_reference(tq, tk, hq, hkv, d, causal, block_q, block_k):
    q, k, v = (rand(2, t, h, d, dtype=torch.float64) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    o, lse = tiled_attention(
        q, k, v, causal=causal, block_q=block_q, block_k=block_k, return_lse=True
    )
    ref_o, ref_lse = reference(q, k, v, causal)
    torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-12)
    assert lse.dtype == torch.float32 and lse.shape == (2, hq, tq)
    torch.testing.assert_close(lse.double(), ref_lse.float().double(), rtol=1e-6, atol=1e-6)


def test_tiled_empty_rows_are_zero_with_minus_infinite_lse():
    q, k, v = rand(1, 9, 2, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8)
    o, lse = tiled_attention(q, k, v, causal=True, return_lse=True, block_q=4, block_k=4)
    assert torch.equal(o[:, :5], torch.zeros_like(o[:, :5]))  # rows 0..4 see no key
    assert torch.isinf(lse[..., :5]).all() and torch.isfinite(lse[..., 5:]).all()


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), CASES[2:8])
def test_tiled_gradients_match_autograd_through_the_reference(tq, tk, hq, hkv, d, causal):
    q, k, v = (
        rand(1, t, h, d, dtype=torch.float64).requires_grad_()
        for t, h in ((tq, hq), (tk, hkv), (tk, hkv))
    )
    do = rand(1, tq, hq, d, dtype=torch.float64)
    got = torch.autograd.grad(tiled_attention(q, k, v, causal=causal, block_q=32), (q, k, v), do)
    want = torch.autograd.grad(naive_attention(q, k, v, causal=causal), (q, k, v), do)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_tiled_half_precision_accumulates_in_float32():
    q, k, v = (rand(1, 100, 2, 32) for _ in range(3))
    o = tiled_attention(q.half(), k.half(), v.half(), causal=True)
    assert o.dtype == torch.float16
    ref, _ = reference(q.half(), k.half(), v.half(), True)
    assert (o.double() - ref).abs().max() < 2e-3


@pytest.mark.parametrize(("block_q", "block_k"), [(0, 64), (64, -1), (8.0, 64)])
def test_tiled_rejects_bad_blocks(block_q, block_k):
    q = rand(1, 8, 1, 8)
    with pytest.raises((ValueError, TypeError), match="block_"):
        tiled_attention(q, q, q, block_q=block_q, block_k=block_k)


# --- the Triton kernel (GPU, or the CPU interpreter) ------------------------------------


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), CASES)
def test_kernel_forward_matches_reference(tq, tk, hq, hkv, d, causal):
    q, k, v = (rand(2, t, h, d, device=DEV) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    o, lse = flash_attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    ref_o, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), causal)
    torch.testing.assert_close(o.cpu().double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("d", [16, 40, 64, 128, 256])
def test_kernel_forward_at_the_float32_tiles_of_a_gpu(monkeypatch, d):
    """The tiles a GPU takes at float32 (at most 2^17 products per step, so fewer query rows
    as head_dim grows), run here under the interpreter, which otherwise takes 64 x 64: a
    causal mask with Tq < Tk, ragged ends and grouped heads."""
    from effarch_kernels import flash_attention as fa

    monkeypatch.setattr(fa, "interpreting", lambda: False)  # only _config reads it here
    block_m, block_n, block_d, _ = fa._config(d, torch.float32)
    assert block_m * block_n * block_d <= 2**17 and 16 <= min(block_m, block_n) and block_d >= d
    q = rand(1, 45, 4, d, device=DEV)
    k, v = (rand(1, 70, 2, d, device=DEV) for _ in range(2))
    o, lse = flash_attention(q, k, v, causal=True, backend="triton", return_lse=True)
    ref_o, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), True)
    torch.testing.assert_close(o.cpu().double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


def float32_backward_tiles():
    from effarch_kernels import flash_attention as fa

    return [("dkdv", t) for t in fa._DKDV_TILES_FP32] + [("dq", t) for t in fa._DQ_TILES_FP32]


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("kernel", "tile"), float32_backward_tiles() if triton_available() else [])
def test_kernel_backward_at_the_float32_tiles_of_a_gpu(monkeypatch, kernel, tile, d):
    """Each tiling the backward tunes among at float32 on a GPU, run here under the
    interpreter (which otherwise takes the forward's 64 x 64): the other kernel keeps its
    fixed tiles. A causal mask with Tq < Tk, ragged ends and grouped heads."""
    from effarch_kernels import flash_attention as fa

    on_gpu = {"dkdv": fa._bwd_dkdv_kernel, "dq": fa._bwd_dq_kernel}
    other = {"dkdv": "dq", "dq": "dkdv"}[kernel]
    # a single configuration is launched untimed
    monkeypatch.setattr(fa, f"_bwd_{kernel}_tuned_fp32", fa._tuned(on_gpu[kernel], [tile]))
    monkeypatch.setattr(fa, f"_bwd_{other}_tuned_fp32", fa._tuned(on_gpu[other], [(64, 64, 4, 1)]))
    monkeypatch.setattr(fa, "interpreting", lambda: False)  # _config and the launch choice
    q = rand(1, 45, 4, d, device=DEV).requires_grad_()
    k, v = (rand(1, 70, 2, d, device=DEV).requires_grad_() for _ in range(2))
    do = rand(1, 45, 4, d, device=DEV)
    got = torch.autograd.grad(flash_attention(q, k, v, causal=True, backend="triton"),
                              (q, k, v), do)  # fmt: skip
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(naive_attention(q64, k64, v64, causal=True), (q64, k64, v64),
                               do.cpu().double())  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), CASES[1:9])
def test_kernel_gradients_match_autograd_through_the_reference(tq, tk, hq, hkv, d, causal):
    q, k, v = (
        rand(1, t, h, d, device=DEV).requires_grad_() for t, h in ((tq, hq), (tk, hkv), (tk, hkv))
    )
    do = rand(1, tq, hq, d, device=DEV)
    got = torch.autograd.grad(flash_attention(q, k, v, causal=causal, backend="triton"),
                              (q, k, v), do)  # fmt: skip
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(
        naive_attention(q64, k64, v64, causal=causal), (q64, k64, v64), do.cpu().double()
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_gradients_include_a_loss_on_the_log_sum_exp(causal):
    q, k, v = (rand(1, t, h, 16, device=DEV).requires_grad_() for t, h in ((9, 4), (9, 2), (9, 2)))
    do, dl = rand(1, 9, 4, 16, device=DEV), rand(1, 4, 9, device=DEV)
    o, lse = flash_attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    got = torch.autograd.grad((o * do).sum() + (lse * dl).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_o, ref_lse = reference(q64, k64, v64, causal)
    loss = (ref_o * do.cpu().double()).sum() + (ref_lse * dl.cpu().double()).sum()
    want = torch.autograd.grad(loss, (q64, k64, v64))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5)


def backward_products(q, k, v, do, causal, mm):
    """The backward kernels' formulas (module docstring of flash_attention) for one head in
    float32, with every matrix product taken by ``mm``; lse and O from float64, as the
    forward hands them over in float32."""
    scale = q.shape[-1] ** -0.5
    o, lse = reference(*(t[None, :, None] for t in (q, k, v)), causal)
    o, lse = o[0, :, 0].float(), lse[0, 0].float()
    delta = (do * o).sum(-1)
    p = (mm(q, k.T) * scale - lse[:, None]).exp()
    if causal:
        p = p.masked_fill(~attention_mask(len(q), len(k), causal=True), 0.0)
    ds = p * (mm(do, v.T) - delta[:, None])
    return mm(ds, k) * scale, mm(ds.T, q) * scale, mm(p.T, do)


@pytest.mark.parametrize("causal", [False, True])
def test_3xtf32_products_keep_the_float32_backward_as_accurate_as_float32(causal):
    """At float32 the backward kernels take each product as three TF32 ones on a GPU
    (``BACKWARD_FP32_PRECISION``). Emulated here at head_dim 128 over 256 keys, dQ, dK and dV
    stay as close to float64 autograd as with float32 products, within the 1e-5 the kernel
    tests ask; one TF32 product per float32 one misses it by far."""
    from tf32 import PRODUCTS

    gen = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(256, 128, generator=gen) for _ in range(4))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = naive_attention(*(t[None, :, None] for t in leaves), causal=causal)[0, :, 0]
    want = torch.autograd.grad(o64, leaves, do.double())
    err = {}
    for name, mm in PRODUCTS.items():
        got = backward_products(q, k, v, do, causal, mm)
        err[name] = max((g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True))
    assert err["float32"] < 1e-5 and err["tf32x3"] < 1e-5, err
    assert err["tf32x3"] < 2 * err["float32"], err  # the same accuracy, within a factor 2
    assert err["tf32"] > 100 * err["tf32x3"], err


def low_precision_attention(q, k, v, causal):
    """Attention computed with every operation in float16: the error a plain fp16 PyTorch
    run makes, against which the kernel's error is calibrated (as flash-attn does)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~attention_mask(q.shape[1], k.shape[1], causal=True), -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), [CASES[2], CASES[5], CASES[8]])
def test_kernel_fp16_error_is_within_twice_a_pytorch_fp16_run(tq, tk, hq, hkv, d, causal):
    q, k, v = (rand(2, t, h, d).half() for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    ref, _ = reference(q, k, v, causal)
    ours = flash_attention(q.to(DEV), k.to(DEV), v.to(DEV), causal=causal, backend="triton")
    assert ours.dtype == torch.float16
    ours_err = (ours.cpu().double() - ref).abs().max().item()
    torch_err = (low_precision_attention(q, k, v, causal).double() - ref).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-5, (ours_err, torch_err)


@pytest.mark.kernel
@needs_triton
def test_kernel_writes_every_output_element(poison_empty):
    """Outputs come from torch.empty*: they start as NaN, and none may survive."""
    q = rand(1, 100, 4, 24, device=DEV).requires_grad_()
    k = rand(1, 70, 2, 24, device=DEV).requires_grad_()
    v = rand(1, 70, 2, 24, device=DEV).requires_grad_()
    o, lse = flash_attention(q, k, v, causal=True, backend="triton", return_lse=True)
    grads = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert not o.isnan().any() and not lse.isnan().any()
    assert not any(g.isnan().any() for g in grads)


@pytest.mark.kernel
@needs_triton
def test_kernel_bfloat16_under_the_interpreter_runs_in_float32():
    if DEV == "cuda":
        pytest.skip("the CPU interpreter path")
    q = rand(1, 33, 2, 16).bfloat16()
    o = flash_attention(q, q, q, causal=True, backend="triton")
    ref, _ = reference(q, q, q, True)
    assert o.dtype == torch.bfloat16 and (o.double() - ref).abs().max() < 1e-2


def test_torch_backend_and_auto_fall_back_to_sdpa(monkeypatch):
    q, k, v = rand(1, 40, 4, 16), rand(1, 40, 2, 16), rand(1, 40, 2, 16)
    want = sdpa_attention(q, k, v, causal=True)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True, backend="torch"), want)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEV == "cpu":  # no GPU, no interpreter: auto must pick torch
        torch.testing.assert_close(flash_attention(q, k, v, causal=True), want)
        with pytest.raises(ValueError, match="backend='triton' cannot run: .*CUDA GPU"):
            flash_attention(q, k, v, backend="triton")


@needs_triton
def test_auto_is_sdpa_on_cpu_tensors_even_under_the_interpreter(monkeypatch):
    """The backend rule of effarch._kernels: "auto" runs the kernel on CUDA tensors only; the
    interpreter is reached with backend="triton" alone."""
    if DEV == "cuda":
        pytest.skip("on a GPU auto picks the kernel")

    def boom(*a, **kw):
        raise AssertionError("auto must not run the kernel on CPU tensors")

    monkeypatch.setattr("effarch_kernels.flash_attention.flash_attention_forward", boom)
    q, k, v = rand(1, 40, 4, 16), rand(1, 40, 2, 16), rand(1, 40, 2, 16)
    torch.testing.assert_close(flash_attention(q, k, v), sdpa_attention(q, k, v))
    with pytest.raises(ValueError, match="return_lse=True needs the Triton kernel"):
        flash_attention(q, k, v, return_lse=True)


@pytest.mark.parametrize(
    ("kwargs", "shapes", "err", "words"),
    [
        (dict(backend="cuda"), None, ValueError, "backend must be one of"),
        (
            dict(backend="triton"),
            ((1, 8, 2, 300), (1, 8, 2, 300), (1, 8, 2, 300)),
            ValueError,
            "head_dim up to 256",
        ),
        (
            dict(backend="triton"),
            ((1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 32)),
            ValueError,
            "v's head_dim",
        ),
        (dict(backend="torch", return_lse=True), None, ValueError, "return_lse"),
        ({}, ((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "multiple"),
        ({}, ((2, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "batch size"),
        ({}, ((8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "q must have 4 dim"),
    ],
)
def test_flash_attention_rejects_bad_input(kwargs, shapes, err, words):
    if kwargs.get("backend") == "triton" and not triton_available():
        pytest.skip("needs triton")
    shapes = shapes or ((1, 8, 2, 16),) * 3
    q, k, v = (rand(*s) for s in shapes)
    with pytest.raises(err, match=words):
        flash_attention(q, k, v, **kwargs)


def test_flash_attention_rejects_mixed_dtypes():
    q = rand(1, 8, 2, 16)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        flash_attention(q, q.double(), q)


# --- the teaching helpers of chapter 4.1 ------------------------------------------------


@pytest.mark.parametrize("block", [1, 3, 8, 50])
def test_online_softmax_steps_end_at_the_softmax(block):
    from effarch.attention import online_softmax_steps

    s = torch.randn(37, dtype=torch.float64) * 4
    v = torch.randn(37, 5, dtype=torch.float64)
    steps = online_softmax_steps(s, v, block)
    assert len(steps) == math.ceil(37 / block)
    torch.testing.assert_close(steps[-1]["o"], torch.softmax(s, 0) @ v)
    torch.testing.assert_close(steps[-1]["l"], torch.exp(s - s.max()).sum())
    ms = [float(st["m"]) for st in steps]
    assert ms == sorted(ms) and ms[-1] == float(s.max())
    for st in steps:  # each intermediate output is the softmax over the keys seen so far
        n = int(st["seen"])
        torch.testing.assert_close(st["o"], torch.softmax(s[:n], 0) @ v[:n])


def test_online_softmax_steps_rejects_bad_input():
    from effarch.attention import online_softmax_steps

    with pytest.raises(ValueError, match="scores must be a 1-D"):
        online_softmax_steps(torch.ones(2, 2), torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="values must be"):
        online_softmax_steps(torch.ones(3), torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="block"):
        online_softmax_steps(torch.ones(3), torch.ones(3, 2), 0)


def test_hbm_traffic_model():
    from effarch.attention import attention_hbm_bytes

    n, d = 4096, 64
    std = attention_hbm_bytes(n, d, bytes_per_element=1)
    assert std == 4 * n * d + 4 * n * n  # S written, read; P written, read; Q K V O once
    assert attention_hbm_bytes(n, d, masked=True, bytes_per_element=1) == std + 2 * n * n
    tiled = attention_hbm_bytes(n, d, method="tiled", block_q=128, bytes_per_element=1)
    assert tiled == 2 * n * d + 2 * n * n * d / 128
    assert std / tiled == pytest.approx((4 * n * d + 4 * n * n) / (2 * n * d + n * n))
    assert attention_hbm_bytes(n, d, heads=8, batch=2) == 16 * std * 2
    with pytest.raises(ValueError, match="method"):
        attention_hbm_bytes(n, d, method="flash3")


def test_hbm_traffic_rejects_a_non_positive_bytes_per_element():
    """Regression: a negative bytes_per_element gave negative traffic."""
    from effarch.attention import attention_hbm_bytes

    for bad in (-2, 0, float("nan")):
        with pytest.raises(ValueError, match="bytes_per_element"):
            attention_hbm_bytes(64, 16, bytes_per_element=bad)
    assert attention_hbm_bytes(64, 16, bytes_per_element=0.5) == attention_hbm_bytes(64, 16) / 4


def test_online_softmax_update_merges_blocks_into_the_softmax():
    """The merge tiled_attention and MoBA's gathered path share: block by block it ends at
    softmax(s) @ v, and a row masked in every block stays at l = 0, acc = 0 (no NaN)."""
    from effarch.attention import online_softmax_update

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    s[1] = float("-inf")  # a row that sees no key
    s[2, :4] = float("-inf")  # a row whose first block is masked
    v = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    m = torch.full((3,), float("-inf"), dtype=torch.float64)
    l_sum, acc = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    for lo in range(0, 10, 4):
        m, l_sum, acc = online_softmax_update(m, l_sum, acc, s[:, lo : lo + 4], v[lo : lo + 4],
                                              "qk,kd->qd")  # fmt: skip
    seen = torch.tensor([True, False, True])
    torch.testing.assert_close(acc[seen] / l_sum[seen, None], torch.softmax(s[seen], -1) @ v)
    torch.testing.assert_close(m[seen], s[seen].amax(-1))
    assert l_sum[1] == 0 and m[1] == float("-inf") and not acc.isnan().any() and (acc[1] == 0).all()
