"""The kernels at shapes where a tensor holds more than 2^31 elements, and the backward
autotuning key.

Once a tensor has more than 2^31 elements, an address computed in int32 (``row * stride``,
``head * head_stride``) wraps around and the kernel reads or writes the wrong memory. The
kernels compute the terms that can grow that large in int64; these tests run them past
2^31 elements and compare the part of the output with the largest offsets (the last rows
of the last head) with PyTorch computed on that part alone.

Most tests need a CUDA GPU and tens of GiB of its memory (they skip, saying why, without
them); each runs in seconds on an H100. Four run anywhere (under the interpreter on a
CPU): the flash-attention forward kernel, the block-sparse kernels (forward and backward)
and the INT8 kernel reading rows or heads more than 2^31 elements into buffers that are
mostly never touched, and the flash backward kernels' autotuning key. The tests of the
forward-only kernels (chunkwise delta rule, fused recurrent, selective scan) also run at a
small size anywhere, which checks the test itself: the same inputs, call and reference.
"""

import pytest
import torch

from effarch._kernels import triton_available

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GiB = 2**30
INT32_ELEMENTS = 2**31  # an offset of this many elements or more does not fit in int32


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next test needs the memory this one held


def need_gpu(gib: int) -> None:
    """Skip unless a CUDA GPU with ``gib`` GiB of free memory is here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the shapes hold more than 2^31 elements")
    free = torch.cuda.mem_get_info()[0]
    if free < gib * GiB:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / GiB:.1f} GiB free")


def assert_close_to_max(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """``max |got - want| <= tol * max |want|`` (``want`` a float64 reference, ``got`` the
    kernel's float32 or half precision): a row read from the wrong address is off by the
    size of the values themselves."""
    err = (got.double() - want.double()).abs().max().item()
    size = want.double().abs().max().item()
    assert err <= tol * size, f"max error {err:.3g}, max |reference| {size:.3g}"


# --- flash attention --------------------------------------------------------------------

H, D = 32, 128
LONG = 2**19 + 64  # [1, LONG, 32, 128] holds 2^31 + 2^18 elements
FLASH = {  # (Tq, Tk, causal): q and o, or k and v, past 2^31 elements
    "long queries": (LONG, 256, False),
    "long keys": (256, LONG, True),
}
# scale 1: the softmax of each row rests on a few keys, so a key or value read from the
# wrong row changes the output by as much as the output itself
SCALE = 1.0


def flash_inputs(tq: int, tk: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, tq, H, D, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(1, tk, H, D, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(1, tk, H, D, device="cuda", dtype=torch.float16, generator=gen)
    assert max(x.numel() for x in (q, k, v)) > INT32_ELEMENTS
    return q, k, v


def flash_head_reference(q, k, v, causal: bool, h: int):
    """Head ``h`` in float64, differentiable: ``((qh, kh, vh), o [Tq, D], lse [Tq])``."""
    qh, kh, vh = (x[0, :, h].double().requires_grad_() for x in (q, k, v))
    s = (qh @ kh.T) * SCALE
    if causal:  # bottom-right aligned: row i sees keys j <= i + Tk - Tq
        tq, tk = s.shape
        i = torch.arange(tq, device=s.device)[:, None]
        j = torch.arange(tk, device=s.device)[None, :]
        s = s.masked_fill(j > i + (tk - tq), float("-inf"))
    return (qh, kh, vh), torch.softmax(s, dim=-1) @ vh, torch.logsumexp(s, dim=-1)


def far_rows(dense: torch.Tensor, row_stride: int, pad: int) -> torch.Tensor:
    """``dense [1, T, H, D]`` copied into a view whose rows lie ``row_stride`` elements apart,
    ``pad`` elements into a buffer that is otherwise never touched (on a CPU, never backed by
    memory); ``None`` when the buffer cannot be had."""
    _, t, h, d = dense.shape
    try:
        buf = torch.empty(pad + (t - 1) * row_stride + h * d, dtype=dense.dtype, device=DEV)
    except (RuntimeError, MemoryError):
        return None
    view = buf.as_strided(dense.shape, (buf.numel(), row_stride, d, 1), pad)
    view.copy_(dense)
    return view


def test_flash_attention_forward_rows_past_2_31_elements_anywhere():
    """Runs anywhere (under the interpreter on a CPU): query and output rows 2^25 + 16
    elements apart, so rows 64 to 127 start past 2^31 elements, where an int32 row offset
    wraps to a negative one. The 2^31 elements in front make that land in the buffer
    (never written), so a wrapped offset gives wrong rows rather than a crash."""
    from effarch_kernels.flash_attention import _config, _fwd_kernel

    b, t, h, d = 1, 128, 2, 32
    row, pad = 2**25 + 16, 2**31
    if DEV == "cuda":
        need_gpu(28)
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device=DEV, generator=gen) for _ in range(3))
    q, k, v = q.half(), k.half(), v.half()
    qf, of = far_rows(q, row, pad), far_rows(torch.zeros_like(q), row, pad)
    if qf is None or of is None:
        pytest.skip("cannot reserve two buffers of 12 GiB of address space")
    lse = torch.empty(b, h, t, device=DEV)
    block_m, block_n, block_d, precision = _config(d, q.dtype)

    def bth(x):
        return x.stride(0), x.stride(1), x.stride(2)

    _fwd_kernel[(-(-t // block_m), b * h)](
        qf, k, v, of, lse, *bth(qf), *bth(k), *bth(v), *bth(of),
        h, 1, t, t, d, d**-0.5,
        CAUSAL=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )  # fmt: skip
    want = torch.nn.functional.scaled_dot_product_attention(
        *(x.double().transpose(1, 2) for x in (q, k, v)), is_causal=True
    ).transpose(1, 2)
    assert_close_to_max(of, want, 1e-2)


@pytest.mark.parametrize("case", list(FLASH))
def test_flash_attention_forward_past_2_31_elements(case):
    need_gpu(16)
    from effarch_kernels.flash_attention import flash_attention_forward

    tq, tk, causal = FLASH[case]
    q, k, v = flash_inputs(tq, tk)
    o, lse = flash_attention_forward(q, k, v, causal, SCALE)
    h = H - 1  # the last head: its rows have the largest offsets
    _, want_o, want_lse = flash_head_reference(q, k, v, causal, h)
    assert_close_to_max(o[0, :, h], want_o, 1e-2)
    torch.testing.assert_close(lse[0, h].double(), want_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", list(FLASH))
def test_flash_attention_backward_past_2_31_elements(case):
    need_gpu(56)  # long keys: dK and dV per query head in float32, their sums, the copies
    from effarch_kernels.flash_attention import flash_attention_backward, flash_attention_forward

    tq, tk, causal = FLASH[case]
    q, k, v = flash_inputs(tq, tk)
    o, lse = flash_attention_forward(q, k, v, causal, SCALE)
    do = torch.randn_like(o)
    dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, causal, SCALE)
    del o, lse
    h = H - 1
    (qh, kh, vh), want_o, _ = flash_head_reference(q, k, v, causal, h)
    want_o.backward(do[0, :, h].double())
    for got, want in ((dq, qh), (dk, kh), (dv, vh)):
        assert_close_to_max(got[0, :, h], want.grad, 1e-2)


# --- chunkwise linear attention: the chunk states ---------------------------------------

# states [B, H, T / 64, K, V] float32: 16 * 16 * 513 * 128 * 128 = 2^31 + 2^22 elements.
# Inputs in float32 (full-precision products): the decay's gradient sums over all 32k steps.
CHUNK = dict(b=16, t=32 * 1024 + 64, h=16, d=128)


def chunk_inputs(b, t, h, d):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device="cuda", generator=gen) for _ in range(3))
    g = -0.1 * torch.rand(b, t, h, device="cuda", generator=gen)  # decays over ~20 steps
    return q, k, v, g


def last_sequence(*tensors):
    """The last batch element's last head, as ``[1, T, 1, ...]`` float64 leaves."""
    return [x[-1:, :, -1:].double().detach().requires_grad_() for x in tensors]


def test_chunk_scalar_decay_forward_past_2_31_state_elements():
    need_gpu(32)
    from effarch.linear.ops import simple_gla

    q, k, v, g = chunk_inputs(**CHUNK)
    n_chunks = -(-CHUNK["t"] // 64)
    assert CHUNK["b"] * CHUNK["h"] * n_chunks * CHUNK["d"] ** 2 > INT32_ELEMENTS
    o, final = simple_gla(q, k, v, g, output_final_state=True, chunk_size=64, backend="triton")
    want_o, want_final = simple_gla(*last_sequence(q, k, v, g), output_final_state=True,
                                    chunk_size=64, backend="torch")  # fmt: skip
    assert_close_to_max(o[-1:, :, -1:], want_o, 1e-2)
    assert_close_to_max(final[-1:, -1:], want_final, 1e-2)


def test_chunk_scalar_decay_backward_past_2_31_state_elements():
    need_gpu(56)  # the states and their gradients, 8.6 GB each, beside inputs and gradients
    from effarch.linear.ops import simple_gla

    q, k, v, g = (x.requires_grad_() for x in chunk_inputs(**CHUNK))
    o, _ = simple_gla(q, k, v, g, chunk_size=64, backend="triton")
    do = torch.randn_like(o)
    o.backward(do)
    del o
    ref = last_sequence(q, k, v, g)
    want_o, _ = simple_gla(*ref, chunk_size=64, backend="torch")
    want_o.backward(do[-1:, :, -1:].double())
    for got, want in zip((q, k, v, g), ref, strict=True):
        assert_close_to_max(got.grad[-1:, :, -1:], want.grad, 1e-2)


# --- INT8 attention scores --------------------------------------------------------------


def int8_inputs(b, tq, tk, hq, hkv, d, block):
    gen = torch.Generator(device=DEV).manual_seed(0)
    qi = torch.randint(-127, 128, (b, tq, hq, d), device=DEV, generator=gen, dtype=torch.int8)
    ki = torch.randint(-127, 128, (b, tk, hkv, d), device=DEV, generator=gen, dtype=torch.int8)
    qs = torch.rand(b, -(-tq // block), hq, device=DEV, generator=gen) + 0.5
    ks = torch.rand(b, -(-tk // block), hkv, device=DEV, generator=gen) + 0.5
    return qi, ki, qs, ks


def test_int8_scores_past_2_31_elements():
    need_gpu(12)
    from effarch_kernels.int8_attention import int8_qk

    from effarch.attention.quantized import int8_qk_reference

    # scores [1, 8, 16448, 16448] float32: 2^31 + 2^24 + 2^15 elements
    t, hq, hkv, block = 16 * 1024 + 64, 8, 2, 64
    qi, ki, qs, ks = int8_inputs(1, t, t, hq, hkv, 64, block)
    s = int8_qk(qi, ki, qs, ks, block, block)
    assert s.numel() > INT32_ELEMENTS
    h, hk, r0 = hq - 1, (hq - 1) // (hq // hkv), t - 2 * block  # last rows of the last head
    want = int8_qk_reference(qi[:, r0:, h : h + 1], ki[:, :, hk : hk + 1],
                             qs[:, r0 // block :, h : h + 1], ks[:, :, hk : hk + 1],
                             block, block)  # fmt: skip
    assert torch.equal(s[:, h : h + 1, r0:], want)


def test_int8_scores_read_query_heads_past_2_31_bytes():
    """Runs anywhere: query head ``h`` lies ``h * sqh`` bytes into a buffer, with ``sqh`` an
    int32 just over 2^30, so heads 2 and 3 lie past 2^31 bytes, where an int32 ``h * sqh``
    wraps to a negative offset. The 2 GiB in front of the queries make that offset land in
    the buffer (zeros there, not the heads), so the scores come out wrong rather than
    crashing. Only the rows read are ever written: on a CPU the rest of the 5 GiB buffer is
    never backed by memory."""
    from effarch_kernels.int8_attention import _config, _int8_qk_kernel

    from effarch.attention.quantized import int8_qk_reference

    b, t, hq, d, block = 1, 64, 4, 32, 64
    pad, sqh = 2**31, 2**30 + 64
    try:
        buf = torch.empty(pad + 3 * sqh + t * d, dtype=torch.int8, device=DEV)
    except (RuntimeError, MemoryError) as e:  # a machine that refuses 5 GiB of address space
        pytest.skip(f"cannot reserve a 5 GiB buffer: {e}")
    qi_dense, ki, qs, ks = int8_inputs(b, t, t, hq, 1, d, block)
    qi = buf.as_strided((b, t, hq, d), (buf.numel(), d, sqh, 1), pad)
    qi.copy_(qi_dense)  # writes hq * t * d bytes of the buffer
    s = torch.empty((b, hq, t, t), device=DEV, dtype=torch.float32)
    block_m, block_n, block_d = _config(d)
    _int8_qk_kernel[(-(-t // block_m), b * hq)](
        qi, ki, qs, ks, s,
        *qi.stride()[:3], *ki.stride()[:3], *qs.stride(), *ks.stride(), *s.stride()[:3],
        hq, hq, t, t, d, block, block,  # n_heads, group (one key head), lengths, blocks
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    want = int8_qk_reference(qi_dense, ki, qs, ks, block, block)
    torch.testing.assert_close(s.cpu(), want.cpu(), rtol=0, atol=0)  # bit for bit


# --- grouped GEMM (the MoE expert product) ----------------------------------------------


def test_grouped_gemm_forward_and_backward_past_2_31_elements():
    need_gpu(20)
    from effarch.moe.layer import grouped_matmul

    # x and dx [2^20 + 64, 2048] float16: 2^31 + 2^17 elements
    m, kdim, n, groups = 2**20 + 64, 2048, 64, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, kdim, device="cuda", dtype=torch.float16, generator=gen)
    w = torch.randn(groups, kdim, n, device="cuda", dtype=torch.float16, generator=gen) / 45
    assert x.numel() > INT32_ELEMENTS
    offs = torch.linspace(0, m, groups + 1, device="cuda")[1:].round().to(torch.int32)
    x.requires_grad_()
    w.requires_grad_()
    y = grouped_matmul(x, w, offs, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    start = int(offs[-2])  # the last group's rows: the largest row offsets
    xs = x[start:].detach().double().requires_grad_()
    ws = w[-1].detach().double().requires_grad_()
    want = xs @ ws
    want.backward(dy[start:].double())
    assert_close_to_max(y[start:], want, 1e-2)
    assert_close_to_max(x.grad[start:], xs.grad, 1e-2)
    assert_close_to_max(w.grad[-1], ws.grad, 1e-2)


# --- the backward kernels' autotuning key (any machine, nothing launched) ---------------


def test_backward_autotuning_key_holds_length_buckets_not_lengths(monkeypatch):
    """Lengths 100 and 120 share a tuning (one power-of-two bucket), 200 gets its own: the
    key the launcher's arguments give, recorded instead of launched."""
    from effarch_kernels import flash_attention as fa

    key = ["head_dim", "tune_q", "tune_k", "CAUSAL"]
    tuned = (fa._bwd_dkdv_tuned, fa._bwd_dq_tuned, fa._bwd_dkdv_tuned_fp32, fa._bwd_dq_tuned_fp32)
    assert all(kernel.keys == key for kernel in tuned)
    assert fa.tune_bucket(100) == fa.tune_bucket(120) == 128 and fa.tune_bucket(129) == 256
    names = fa._bwd_dkdv_tuned.arg_names, fa._bwd_dq_tuned.arg_names
    keys: list[tuple] = []

    class Record:  # stands for a kernel: kernel[grid](*args, **kwargs) records the key
        def __init__(self, arg_names):
            self.arg_names = arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
                keys.append(tuple(named[k] for k in key))

            return launch

    for kernel, arg_names in (("dkdv", names[0]), ("dq", names[1])):
        monkeypatch.setattr(fa, f"_bwd_{kernel}_kernel", Record(arg_names))  # interpreter
        monkeypatch.setattr(fa, f"_bwd_{kernel}_tuned", Record(arg_names))  # GPU
        monkeypatch.setattr(fa, f"_bwd_{kernel}_tuned_fp32", Record(arg_names))  # GPU, float32
    by_length = {}
    for t in (100, 120, 200):
        q = torch.randn(1, t, 2, 16, device=DEV)
        keys.clear()
        fa.flash_attention_backward(q, q, q, q, q, torch.zeros(1, 2, t, device=DEV), True, 0.25)
        assert len(keys) == 2 and keys[0] == keys[1]
        by_length[t] = keys[0]
    assert by_length[100] == by_length[120] == (16, 128, 128, True)
    assert by_length[200] == (16, 256, 256, True)


# --- block-sparse attention -------------------------------------------------------------


def test_block_sparse_forward_and_backward_rows_past_2_31_elements_anywhere(monkeypatch):
    """Runs anywhere (under the interpreter on a CPU): q, k, v and dO with rows 2^25 + 16
    elements apart, as in the flash-attention test above, so rows 64 to 127 start past 2^31
    elements. The forward and dQ kernels walk the key rows of each listed block, the dK/dV
    kernel the query rows, so every address a loop forms is exercised, through full and
    partial (masked) blocks and two query heads sharing a key head. The launchers are run
    on the strided views as they are (they would otherwise copy them into 12 GiB each)."""
    from effarch_kernels import block_sparse_attention as bsa

    from effarch.sparse import block_layout, kernel_tables, masked_attention, sliding_window

    b, t, hq, hkv, d, blk = 1, 128, 2, 1, 32, 32
    row, pad = 2**25 + 16, 2**31
    if DEV == "cuda":
        need_gpu(56)
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(b, t, hq, d, device=DEV, generator=gen).half()
    k, v = (torch.randn(b, t, hkv, d, device=DEV, generator=gen).half() for _ in range(2))
    do = torch.randn(b, t, hq, d, device=DEV, generator=gen).half()
    far = [far_rows(x, row, pad) for x in (q, k, v, do)]
    if any(x is None for x in far):
        pytest.skip("cannot reserve four buffers of 12 GiB of address space")
    monkeypatch.setattr(bsa, "contiguous", lambda *xs: xs)  # no copies of the far views
    mod = sliding_window(48)  # full blocks inside the window, partial ones at its edges
    tables = kernel_tables(
        block_layout(mod, t, t, block_q=blk, block_k=blk, device=DEV), mod, device=DEV
    )
    fwd = [tables[n] for n in ("tile_id", "kv_count", "kv_list", "tile_masks")]
    o, lse = bsa.block_sparse_forward(*far[:3], *fwd, blk, blk, d**-0.5)
    dq, dk, dv = bsa.block_sparse_backward(
        far[3], *far[:3], o, lse, *fwd[:3], tables["q_count"], tables["q_list"],
        tables["tile_masks"], blk, blk, d**-0.5,
    )  # fmt: skip
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = masked_attention(*ref, mod)
    want.backward(do.double())
    assert_close_to_max(o, want, 1e-2)
    for got, r in zip((dq, dk, dv), ref, strict=True):
        assert_close_to_max(got, r.grad, 2e-2)


# --- the forward-only kernels: chunkwise delta rule, fused recurrent, selective scan -----
# Each runs at two sizes: "large" past 2^31 elements (a GPU), and "small" (anywhere, under
# the interpreter on a CPU), which checks the test itself: the inputs, the call and the
# reference on the last sequence are the same code at both sizes.


def at_size(size: str, gib: int) -> None:
    """Skip unless this machine runs ``size``: "large" on a GPU with ``gib`` GiB free,
    "small" under the interpreter (on a GPU the large size is the test)."""
    if size == "large":
        need_gpu(gib)
    elif DEV == "cuda":
        pytest.skip("the small size is for the interpreter")


DELTA = {  # states [B, H, T / 64, K, V] float32 past 2^31 elements, as CHUNK
    "small": dict(b=2, t=100, h=2, d=32),
    "large": CHUNK,
}


@pytest.mark.parametrize("size", list(DELTA))
def test_chunk_delta_rule_past_2_31_state_elements(size):
    at_size(size, gib=48)  # inputs, the W and U rows, the states (8.6 GB each), the outputs
    from effarch.linear.delta import gated_delta_rule
    from effarch.linear.delta_kernel import chunk_delta_rule

    sz = DELTA[size]
    gen = torch.Generator(device=DEV).manual_seed(0)
    shape = (sz["b"], sz["t"], sz["h"], sz["d"])
    q, k, v = (torch.randn(shape, device=DEV, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)  # the delta rule's stable regime
    g = -0.1 * torch.rand(shape[:3], device=DEV, generator=gen)
    beta = torch.rand(shape[:3], device=DEV, generator=gen)
    if size == "large":
        n_chunks = -(-sz["t"] // 64)
        assert sz["b"] * sz["h"] * n_chunks * sz["d"] ** 2 > INT32_ELEMENTS
    o, final = chunk_delta_rule(q, k, v, beta, g, output_final_state=True, chunk_size=64)
    want_o, want_final = gated_delta_rule(*last_sequence(q, k, v, g, beta), output_final_state=True,
                                          chunk_size=64, backend="torch")  # fmt: skip
    assert_close_to_max(o[-1:, :, -1:], want_o, 1e-2)
    assert_close_to_max(final[-1:, -1:], want_final, 1e-2)


FUSED = {  # q, k, v, o [128, 16448, 8, 128] float16: 2^31 + 2^24 elements each
    "small": dict(b=2, t=50, h=2, d=16),
    "large": dict(b=128, t=16 * 1024 + 64, h=8, d=128),
}


@pytest.mark.parametrize("size", list(FUSED))
def test_fused_recurrent_past_2_31_elements(size):
    at_size(size, gib=28)  # q, k, v, o (4.3 GB each) and the normalised keys' copy
    from effarch.linear.chunk_kernel import fused_recurrent
    from effarch.linear.delta import gated_delta_rule

    sz = FUSED[size]
    gen = torch.Generator(device=DEV).manual_seed(0)
    shape = (sz["b"], sz["t"], sz["h"], sz["d"])
    half = dict(device=DEV, dtype=torch.float16, generator=gen)
    q, k, v = (torch.randn(shape, **half) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -0.1 * torch.rand(shape[:3], **half)
    beta = torch.rand(shape[:3], **half)
    if size == "large":
        assert q.numel() > INT32_ELEMENTS
    o, final = fused_recurrent(q, k, v, g=g, beta=beta, output_final_state=True)
    want_o, want_final = gated_delta_rule(*last_sequence(q, k, v, g, beta), output_final_state=True,
                                          chunk_size=64, backend="torch")  # fmt: skip
    assert_close_to_max(o[-1:, :, -1:], want_o, 1e-2)
    assert_close_to_max(final[-1:, -1:], want_final, 1e-2)


SCAN = {  # u, delta, y [64, 16448, 2048] float16: 2^31 + 2^23 elements each
    "small": dict(b=2, t=40, d=64, n=8),
    "large": dict(b=64, t=16 * 1024 + 64, d=2048, n=16),
}


@pytest.mark.parametrize("size", list(SCAN))
def test_selective_scan_past_2_31_elements(size):
    at_size(size, gib=24)  # u, delta, y (4.3 GB each)
    from effarch.ssm import selective_scan

    sz = SCAN[size]
    b, t, d, n = sz["b"], sz["t"], sz["d"], sz["n"]
    gen = torch.Generator(device=DEV).manual_seed(0)
    half = dict(device=DEV, dtype=torch.float16, generator=gen)
    u = torch.randn(b, t, d, **half)
    delta = torch.randn(b, t, d, **half) - 1.0  # softplus(delta + bias) about 0.3-0.5
    B, C = (torch.randn(b, t, n, **half) for _ in range(2))
    A = -torch.rand(d, n, device=DEV, generator=gen) * 2 - 0.1
    D = torch.randn(d, device=DEV, generator=gen)
    bias = 0.5 * torch.rand(d, device=DEV, generator=gen)
    if size == "large":
        assert u.numel() > INT32_ELEMENTS
    kw = dict(delta_softplus=True, return_last_state=True)
    y, last = selective_scan(u, delta, A, B, C, D, delta_bias=bias, backend="triton", **kw)
    ch = slice(d - 16, d)  # the last batch element's last channels: the largest offsets
    want_y, want_last = selective_scan(
        u[-1:, :, ch].double(), delta[-1:, :, ch].double(), A[ch].double(), B[-1:].double(),
        C[-1:].double(), D[ch].double(), delta_bias=bias[ch].double(), backend="torch", **kw,
    )  # fmt: skip
    assert_close_to_max(y[-1:, :, ch], want_y, 1e-2)
    assert_close_to_max(last[-1:, ch], want_last, 1e-2)
