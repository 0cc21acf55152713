"""Quantized (SageAttention-style) attention: INT8 blocks, smoothed keys, the INT8 kernel.

On a machine without a GPU the kernel runs under the Triton interpreter (see conftest).
"""

import math

import pytest
import torch

from effarch.attention.flash import triton_available
from effarch.attention.naive import attention_mask, naive_attention
from effarch.attention.quantized import (
    attention_error,
    dequantize_per_block,
    int8_kernel_reason,
    int8_qk_reference,
    quantize_per_block,
    quantized_attention,
    smooth_k,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# --- quantize_per_block / dequantize_per_block ------------------------------------------


@pytest.mark.parametrize(("t", "block"), [(1, 64), (64, 64), (100, 64), (100, 7), (5, 1)])
def test_round_trip_error_is_at_most_half_a_step(t, block):
    x = rand(2, t, 3, 40) * 3
    xq, s = quantize_per_block(x, block_size=block)
    n_blocks = math.ceil(t / block)
    assert xq.dtype == torch.int8 and xq.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, n_blocks, 3)
    assert xq.min() >= -127 and xq.max() <= 127
    step = s.double().repeat_interleave(block, dim=1)[:, :t, :, None]  # per element
    err = (x.double() - xq.double() * step).abs()
    assert (err <= step / 2 * (1 + 1e-4)).all()
    # each block's largest magnitude lands on +-127: the scale is absmax / 127
    xb = torch.nn.functional.pad(xq.abs().int(), (0, 0, 0, 0, 0, n_blocks * block - t))
    assert (xb.view(2, n_blocks, block, 3, 40).amax(dim=(2, 4)) == 127).all()
    deq = dequantize_per_block(xq, s, block)
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq.double(), xq.double() * step, rtol=1e-6, atol=0)


def test_ragged_last_block_has_its_own_scale_and_blocks_are_independent():
    x = rand(1, 100, 2, 16)
    x[0, 3, 1, 5] = 1000.0  # an outlier token in block 0 of head 1
    xq, s = quantize_per_block(x, block_size=64)
    assert s.shape == (1, 2, 2)
    assert s[0, 0, 1] == pytest.approx(1000.0 / 127)
    assert s[0, 1, 1] == pytest.approx(x[0, 64:, 1].abs().max().item() / 127)  # 36 tokens
    assert s[0, 0, 0] == pytest.approx(x[0, :64, 0].abs().max().item() / 127)
    assert xq[0, 3, 1, 5] == 127


def test_zero_blocks_get_zero_scale_and_zero_values():
    x = rand(1, 70, 2, 8)
    x[:, :64, 0] = 0.0
    x[:, 64:, 1] = 0.0
    xq, s = quantize_per_block(x, block_size=64)
    assert s[0, 0, 0] == 0 and s[0, 1, 1] == 0 and (s[0, 0, 1] > 0) and (s[0, 1, 0] > 0)
    assert (xq[:, :64, 0] == 0).all() and (xq[:, 64:, 1] == 0).all()
    deq = dequantize_per_block(xq, s, 64)
    assert torch.isfinite(deq).all() and (deq[:, :64, 0] == 0).all()


def test_dim_argument_quantizes_a_heads_first_layout_the_same_way():
    x = rand(2, 50, 3, 16)
    xq, s = quantize_per_block(x, block_size=16)
    xq2, s2 = quantize_per_block(x.transpose(1, 2), block_size=16, dim=2)  # [B, H, T, D]
    assert s2.shape == (2, 3, 4)
    assert torch.equal(xq2, xq.transpose(1, 2)) and torch.equal(s2, s.transpose(1, 2))
    back = dequantize_per_block(xq2, s2, 16, dim=2)
    torch.testing.assert_close(back, dequantize_per_block(xq, s, 16).transpose(1, 2))


def test_half_and_double_inputs_quantize_like_float32():
    x = rand(1, 40, 2, 16).half().float()
    xq, s = quantize_per_block(x, block_size=32)
    for dtype in (torch.float16, torch.float64):
        xq2, s2 = quantize_per_block(x.to(dtype), block_size=32)
        assert torch.equal(xq2, xq) and torch.equal(s2, s)


# --- smooth_k ---------------------------------------------------------------------------


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "causal"), [
    (33, 33, 4, 2, False), (33, 33, 4, 2, True), (10, 50, 4, 1, True), (50, 10, 2, 2, True),
])  # fmt: skip
def test_smoothing_keys_leaves_exact_attention_unchanged(tq, tk, hq, hkv, causal):
    q = rand(2, tq, hq, 24, dtype=torch.float64)
    k = rand(2, tk, hkv, 24, dtype=torch.float64) + 5 * rand(2, 1, hkv, 24, dtype=torch.float64)
    v = rand(2, tk, hkv, 24, dtype=torch.float64)
    ks, mean = smooth_k(k)
    assert ks.dtype == k.dtype and ks.shape == k.shape and mean.shape == (2, 1, hkv, 24)
    torch.testing.assert_close(ks.mean(dim=1), torch.zeros_like(mean[:, 0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(ks + mean, k, rtol=0, atol=1e-12)
    want = naive_attention(q, k, v, causal=causal)
    got = naive_attention(q, ks, v, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- the INT8 Q K^T kernel --------------------------------------------------------------


def int8_scores_float64(qi, ki, qs, ks, block_q, block_k):
    """The exact integer product (int64) times the scales, in float64."""
    g = qi.shape[2] // ki.shape[2]
    kk = ki.long().repeat_interleave(g, dim=2)
    prod = torch.einsum("bqhd,bkhd->bhqk", qi.long(), kk)
    qrow = qs.double().repeat_interleave(block_q, dim=1)[:, : qi.shape[1]].transpose(1, 2)
    kcol = ks.double().repeat_interleave(g, dim=2).repeat_interleave(block_k, dim=1)
    kcol = kcol[:, : ki.shape[1]].transpose(1, 2)
    return prod.double() * qrow[..., :, None] * kcol[..., None, :]


def random_int8_inputs(b, tq, tk, hq, hkv, d, block_q, block_k, extreme=False):
    lo, hi = (127, 128) if extreme else (-127, 128)
    qi = torch.randint(lo, hi, (b, tq, hq, d), dtype=torch.int8)
    ki = torch.randint(lo, hi, (b, tk, hkv, d), dtype=torch.int8)
    if extreme:
        ki = -ki  # the most negative dot product: -127^2 * d
    qs = torch.rand(b, math.ceil(tq / block_q), hq) * 0.1
    ks = torch.rand(b, math.ceil(tk / block_k), hkv) * 0.1
    return qi, ki, qs, ks


# (B, Tq, Tk, Hq, Hkv, D, block_q, block_k): ragged T, GQA 1, 2, 4, head_dim 64, 40, 16.
KERNEL_CASES = [
    (1, 1, 1, 1, 1, 16, 64, 64),
    (2, 17, 100, 4, 2, 40, 16, 32),
    (1, 64, 64, 2, 2, 64, 64, 64),
    (1, 130, 70, 4, 1, 64, 64, 32),
    (1, 200, 256, 2, 1, 40, 128, 64),
]


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "d", "bq", "bk"), KERNEL_CASES)
def test_int8_kernel_equals_the_exact_integer_product(b, tq, tk, hq, hkv, d, bq, bk):
    from effarch_kernels.int8_attention import int8_qk

    qi, ki, qs, ks = random_int8_inputs(b, tq, tk, hq, hkv, d, bq, bk)
    got = int8_qk(qi.to(DEV), ki.to(DEV), qs.to(DEV), ks.to(DEV), bq, bk).cpu()
    assert got.dtype == torch.float32 and got.shape == (b, hq, tq, tk)
    # bit for bit the PyTorch path: the same integers, the same two float32 roundings
    assert torch.equal(got, int8_qk_reference(qi, ki, qs, ks, bq, bk))
    # and within those two roundings of the exact value
    exact = int8_scores_float64(qi, ki, qs, ks, bq, bk)
    torch.testing.assert_close(got.double(), exact, rtol=3e-7, atol=0)


@pytest.mark.kernel
@needs_triton
def test_int8_kernel_writes_every_score(poison_empty):
    """The score matrix comes from torch.empty (NaN here): ragged blocks leave no hole."""
    from effarch_kernels.int8_attention import int8_qk

    qi, ki, qs, ks = random_int8_inputs(1, 130, 70, 4, 1, 64, 64, 32)
    got = int8_qk(qi.to(DEV), ki.to(DEV), qs.to(DEV), ks.to(DEV), 64, 32).cpu()
    assert not got.isnan().any()
    assert torch.equal(got, int8_qk_reference(qi, ki, qs, ks, 64, 32))


@pytest.mark.kernel
@needs_triton
def test_int8_kernel_accumulates_the_largest_products_exactly():
    from effarch_kernels.int8_attention import int8_qk

    qi, ki, _, _ = random_int8_inputs(1, 20, 30, 2, 1, 256, 64, 64, extreme=True)
    qs, ks = torch.ones(1, 1, 2), torch.ones(1, 1, 1)
    got = int8_qk(qi.to(DEV), ki.to(DEV), qs.to(DEV), ks.to(DEV), 64, 64).cpu()
    assert (got == -(127**2) * 256).all()


# --- quantized_attention ----------------------------------------------------------------


def on_int8_grid(b, t, h, d, block, step=2.0**-7):
    """Values already on the INT8 grid with scale ``step`` in every block: quantization
    is then exact, which isolates masking, GQA and the softmax from quantization error."""
    x = torch.randint(-127, 128, (b, t, h, d)).double()
    x[:, ::block, :, 0] = 127.0  # each block's absmax is 127 * step
    return x * step


@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "causal"), [
    (40, 40, 2, 2, False), (40, 40, 4, 2, True), (17, 90, 4, 1, True), (90, 17, 2, 1, True),
    (90, 17, 2, 2, False), (1, 70, 4, 4, True),
])  # fmt: skip
def test_exactly_representable_inputs_give_attention_to_float32_rounding(tq, tk, hq, hkv, causal):
    q = on_int8_grid(2, tq, hq, 32, 16)
    k = on_int8_grid(2, tk, hkv, 32, 32)
    v = rand(2, tk, hkv, 32, dtype=torch.float64)
    got = quantized_attention(
        q, k, v, causal=causal, smooth=False, block_q=16, block_k=32, pv_dtype=torch.float32
    )
    want = naive_attention(q, k, v, causal=causal)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_that_see_no_key_are_zero():
    q, k, v = rand(1, 9, 2, 16), rand(1, 4, 1, 16), rand(1, 4, 1, 16)
    o = quantized_attention(q, k, v, causal=True, block_q=4, block_k=4)
    assert torch.equal(o[:, :5], torch.zeros_like(o[:, :5]))  # rows 0..4 see no key
    assert (o[:, 5:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("tq", "tk", "hq", "hkv"), [(64, 64, 4, 2), (30, 100, 4, 1)])
def test_random_inputs_stay_close_to_float64_attention(tq, tk, hq, hkv, causal):
    q, k, v = rand(2, tq, hq, 64), rand(2, tk, hkv, 64), rand(2, tk, hkv, 64)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=causal)
    for pv_dtype in (torch.float16, torch.float32):
        o = quantized_attention(q, k, v, causal=causal, pv_dtype=pv_dtype)
        assert o.dtype == torch.float32
        err = attention_error(o, ref)
        assert err["max_abs"] < 0.05 and err["cos_sim"] > 0.9995, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_has_the_dtype_of_q(dtype):
    q = rand(1, 20, 2, 16).to(dtype)
    o = quantized_attention(q, q, q, causal=True)
    assert o.dtype == dtype and o.shape == q.shape and torch.isfinite(o).all()


def fp16_attention(q, k, v, causal):
    """Attention with every operation in float16: a plain fp16 PyTorch run."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~attention_mask(q.shape[1], k.shape[1], causal=True), -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vv)


def outlier_example():
    """Keys with a large bias in a few channels, shared by all tokens (SageAttention's
    observation about real models' keys)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 256, 4, 64, generator=gen)
    k = torch.randn(2, 256, 2, 64, generator=gen)
    v = torch.randn(2, 256, 2, 64, generator=gen)
    k[..., :4] += 30.0
    return q, k, v


def test_smoothing_k_removes_the_error_of_a_channel_bias():
    q, k, v = outlier_example()
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True)
    plain = attention_error(quantized_attention(q, k, v, causal=True, smooth=False), ref)
    smooth = attention_error(quantized_attention(q, k, v, causal=True, smooth=True), ref)
    fp16 = attention_error(fp16_attention(q.half(), k.half(), v.half(), True), ref)
    assert smooth["max_abs"] * 3 <= plain["max_abs"], (plain, smooth)
    assert smooth["mean_abs"] * 3 <= plain["mean_abs"], (plain, smooth)
    assert smooth["max_abs"] <= 10 * fp16["max_abs"], (smooth, fp16)
    assert smooth["cos_sim"] > 0.9999 > plain["cos_sim"], (plain, smooth)


@pytest.mark.kernel
@needs_triton
@pytest.mark.parametrize(("tq", "tk", "hq", "hkv", "d", "causal"), [
    (100, 100, 4, 2, 64, True), (17, 130, 2, 1, 40, True), (130, 17, 2, 2, 40, False),
])  # fmt: skip
def test_triton_backend_equals_torch_backend(tq, tk, hq, hkv, d, causal):
    q, k, v = (
        x.to(DEV) for x in (rand(1, tq, hq, d), rand(1, tk, hkv, d) + 3, rand(1, tk, hkv, d))
    )
    # the kernel only forms the dequantized scores, which are exact (integer products, then
    # the same two float32 scalings): on the same device everything after them is the same
    want = quantized_attention(q, k, v, causal=causal, block_q=32, backend="torch")
    got = quantized_attention(q, k, v, causal=causal, block_q=32, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_attention_error_metrics():
    ref = rand(2, 5, 3, 4)
    e = attention_error(ref, ref)
    assert e["max_abs"] == 0 and e["rel_l1"] == 0 and e["cos_sim"] == pytest.approx(1.0)
    e = attention_error(ref + 0.5, ref)
    assert e["max_abs"] == pytest.approx(0.5) and e["mean_abs"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="o must have the shape of ref"):
        attention_error(ref[:1], ref)


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "shapes", "err", "words"),
    [
        (dict(backend="cuda"), None, ValueError, "backend must be one of"),
        (dict(block_q=0), None, ValueError, "block_q must be a positive int"),
        (dict(block_k=-3), None, ValueError, "block_k must be a positive int"),
        (dict(block_k=8.0), None, TypeError, "block_k must be an int"),
        (dict(pv_dtype=torch.bfloat16), None, ValueError, "pv_dtype must be one of"),
        (dict(smooth="yes"), None, TypeError, "smooth must be a bool"),
        ({}, ((8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "q must have 4 dim"),
        ({}, ((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "multiple"),
        ({}, ((2, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), ValueError, "batch size"),
        ({}, ((1, 8, 2, 16), (1, 8, 2, 8), (1, 8, 2, 8)), ValueError, "head_dim of q"),
        ({}, ((1, 8, 2, 16), (1, 8, 2, 16), (1, 9, 2, 16)), ValueError, "v must match k"),
    ],
)
def test_quantized_attention_rejects_bad_input(kwargs, shapes, err, words):
    shapes = shapes or ((1, 8, 2, 16),) * 3
    q, k, v = (rand(*s) for s in shapes)
    with pytest.raises(err, match=words):
        quantized_attention(q, k, v, **kwargs)


def test_quantized_attention_rejects_integer_and_mixed_inputs():
    q = rand(1, 8, 2, 16)
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        quantized_attention(q.to(torch.int8), q, q)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        quantized_attention(q, q.double(), q)


def test_triton_backend_explains_why_it_cannot_run(monkeypatch):
    q = rand(1, 8, 2, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEV == "cpu":
        with pytest.raises(ValueError, match="backend='triton' cannot run: .*CUDA GPU"):
            quantized_attention(q, q, q, backend="triton")
    monkeypatch.setattr("effarch._kernels.triton_available", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' cannot run: triton is not installed"):
        quantized_attention(q, q, q, backend="triton")


class OnAGpu:
    """Stands for a tensor on a GPU: the reasons read only its device and dtype."""

    device = torch.device("cuda", 0)

    def __init__(self, dtype=torch.float16):
        self.dtype = dtype


@pytest.mark.parametrize(
    ("capability", "int8", "bf16"), [((7, 5), False, False), ((8, 0), True, True)]
)
def test_the_int8_kernel_and_bfloat16_need_compute_capability_8(
    monkeypatch, capability, int8, bf16
):
    """Triton compiles no INT8 matrix product for a T4 (compute capability 7.5): its compiler
    fails on the kernel's tl.dot, so the kernel is refused there with the reason, as
    bfloat16 is."""
    from effarch._kernels import triton_unusable_reason

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr("effarch._kernels.triton_available", lambda: True)
    reason = int8_kernel_reason(OnAGpu())
    want = "the INT8 kernel needs compute capability >= 8.0 and Tesla T4 has 7.5"
    assert reason is None if int8 else reason == want
    reason = triton_unusable_reason(OnAGpu(torch.bfloat16))
    want = "bfloat16 needs compute capability >= 8.0 and Tesla T4 has 7.5: use float16"
    assert reason is None if bf16 else reason == want
    assert triton_unusable_reason(OnAGpu(torch.float16)) is None


def test_quantize_rejects_bad_input():
    x = rand(1, 8, 2, 16)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        quantize_per_block(x, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize_per_block(x, block_size=2.5)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantize_per_block(x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quantize_per_block([1.0, 2.0])
    for dim in (3, -1, 4, -5):
        with pytest.raises(ValueError, match="dim must name a token axis"):
            quantize_per_block(x, dim=dim)
    xq, s = quantize_per_block(x, block_size=4)
    with pytest.raises(ValueError, match=r"scale must have shape \(1, 1, 2\) .* got \(1, 2, 2\)"):
        dequantize_per_block(xq, s, 8)
    with pytest.raises(TypeError, match="x_int8 must have dtype in"):
        dequantize_per_block(x, s, 4)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        smooth_k(x[0])
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        smooth_k(x.long())


def test_int8_reference_rejects_mismatched_scales_and_heads():
    qi, ki, qs, ks = random_int8_inputs(1, 10, 12, 4, 2, 16, 4, 8)
    with pytest.raises(ValueError, match=r"q_scale must have shape \(1, 3, 4\)"):
        int8_qk_reference(qi, ki, qs[:, :2], ks, 4, 8)
    with pytest.raises(ValueError, match=r"k_scale must have shape \(1, 3, 2\), got \(1, 2, 2\)"):
        int8_qk_reference(qi, ki, qs, ks, 4, 4)
    with pytest.raises(ValueError, match="k_int8 must be"):
        int8_qk_reference(qi, ki[:, :, :, :8], qs, ks, 4, 8)
    with pytest.raises(TypeError, match="q_int8 must have dtype in"):
        int8_qk_reference(qi.float(), ki, qs, ks, 4, 8)
