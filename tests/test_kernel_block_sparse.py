"""The block-sparse FlashAttention kernel (chapter 3.4) against masked_attention in float64.

On a CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1);
shapes stay small so the suite stays fast.
"""

import pytest
import torch

from effarch._kernels import triton_available
from effarch.sparse import (
    bigbird,
    block_layout,
    block_sparse_attention,
    causal,
    kernel_tables,
    masked_attention,
    sliding_window,
    strided,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.kernel, needs_triton]

CASES = {
    "window, ragged": (70, 70, 4, 2, sliding_window(20), (32, 16)),
    "causal, Tq < Tk": (40, 90, 2, 1, causal(50), (16, 32)),
    "bigbird": (64, 64, 2, 2, bigbird(9, 2, 1, 16), (32, 32)),
    "strided, Tq > Tk": (50, 30, 4, 1, strided(5), (16, 16)),
    "a row sees nothing": (64, 64, 2, 2, lambda b, h, q, kv: (q >= kv) & (q != 5), (32, 16)),
    "per head": (64, 64, 2, 1, lambda b, h, q, kv: (q >= kv) & (q - kv < 8 + 20 * h), (16, 16)),
}


def inputs(tq, tk, hq, hkv, dtype, dv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, tq, hq, 16, generator=gen).to(DEV, dtype)
    k = torch.randn(2, tk, hkv, 16, generator=gen).to(DEV, dtype)
    v = torch.randn(2, tk, hkv, dv, generator=gen).to(DEV, dtype)
    return q, k, v


def check_against_dense(q, k, v, mod, bq, bk, dtype):
    """The kernel's output and gradients against masked_attention in float64; returns o."""
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = block_sparse_attention(q, k, v, mod, block_q=bq, block_k=bk, backend="triton")
    grad = torch.randn_like(o)
    o.backward(grad)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref = masked_attention(*ref_in, mod)
    ref.backward(grad.cpu().double())
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(o.cpu().double(), ref, rtol=tol, atol=tol)
    for got, want in zip((q.grad, k.grad, v.grad), ref_in, strict=True):
        torch.testing.assert_close(got.cpu().double(), want.grad, rtol=4 * tol, atol=4 * tol)
    return o


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_equal_the_dense_reference(name, dtype):
    tq, tk, hq, hkv, mod, (bq, bk) = CASES[name]
    o = check_against_dense(*inputs(tq, tk, hq, hkv, dtype), mod, bq, bk, dtype)
    assert o.dtype == dtype and o.shape == (2, tq, hq, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocks_computed_in_smaller_tiles_give_the_same_attention(monkeypatch, dtype):
    """Where a block would not fit in shared memory the kernels compute it in smaller tiles
    (key tiles in the forward and dQ loops, query tiles in the dK/dV loop, query rows in
    separate programs); forced here, with a ragged end, a partial diagonal and GQA."""
    from effarch_kernels import block_sparse_attention as bsa

    monkeypatch.setattr(bsa, "_tiles", lambda *args: dict(TILE_M=16, TILE_N=16))
    tq, tk, hq, hkv, mod, (bq, bk) = 70, 90, 4, 2, causal(40), (32, 64)
    check_against_dense(*inputs(tq, tk, hq, hkv, dtype), mod, bq, bk, dtype)


def test_tiles_divide_the_blocks_and_keep_to_the_compiled_limits(monkeypatch):
    """The tiles for a GPU (the interpreter computes whole blocks): powers of two that divide
    the caller's blocks, whole blocks where those are small enough, and at most the side that
    compiled without spilling (64 at 16 bits up to head_dim 128, 32 at 256; 16 at float32 from
    head_dim 64 on). The limits themselves come from benchmarks/compile_report.py."""
    from effarch_kernels import block_sparse_attention as bsa

    monkeypatch.setattr(bsa, "interpreting", lambda: False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (16, 32, 64, 128, 256):
            for bm in (16, 32, 64, 128, 256):
                for bn in (16, 64, 128):
                    tm, tn = bsa._tiles(bm, bn, d, d, dtype).values()
                    side = bsa._TILE_SIDE[dtype.itemsize][d]
                    assert bm % tm == 0 and bn % tn == 0 and max(tm, tn) <= side
                    assert (tm, tn) == (min(bm, side), min(bn, side))
    assert bsa._tiles(128, 128, 64, 256, torch.float16) == dict(TILE_M=32, TILE_N=32)  # v's
    assert bsa._tiles(128, 128, 128, 128, torch.float16) == dict(TILE_M=64, TILE_N=64)
    assert bsa._tiles(128, 128, 128, 128, torch.float32) == dict(TILE_M=16, TILE_N=16)
    assert bsa._tiles(32, 16, 32, 32, torch.float32) == dict(TILE_M=32, TILE_N=16)  # whole


def test_kernel_tables_list_exactly_the_non_empty_tiles():
    layout = block_layout(sliding_window(20), 100, 90, block_q=32, block_k=16)
    t = kernel_tables(layout, sliding_window(20))
    kind = layout.kind[0, 0]
    for i in range(kind.shape[0]):
        n = int(t["kv_count"][0, 0, i])
        assert t["kv_list"][0, 0, i, :n].tolist() == (kind[i] != 0).nonzero().flatten().tolist()
    for j in range(kind.shape[1]):
        n = int(t["q_count"][0, 0, j])
        assert t["q_list"][0, 0, j, :n].tolist() == (kind[:, j] != 0).nonzero().flatten().tolist()
    partial = (t["tile_id"] >= 0).sum().item()
    assert partial == (kind == 1).sum().item() == t["tile_masks"].shape[0]


def test_the_kernel_refuses_tiles_it_cannot_take():
    q, k, v = inputs(32, 32, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="backend='triton' cannot run: block_q must be a power"):
        block_sparse_attention(q, k, v, causal(), block_q=24, block_k=16, backend="triton")


def test_nsa_selected_branch_runs_on_the_kernel():
    from effarch.sparse import nsa_attention

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 48, 4, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 48, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    gates = torch.rand(1, 48, 4, 3, generator=gen, dtype=torch.float64)
    kw = dict(block=16, top_n=2, window=16)
    want = nsa_attention(q, k, v, gates, **kw)
    got = nsa_attention(*(x.to(DEV, torch.float32) for x in (q, k, v, gates)), selected="tiles",
                        backend="triton", **kw)  # fmt: skip
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
