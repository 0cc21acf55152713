"""Launch shapes for cards with less shared memory per block (T4 64 KiB, L4 99 KiB).

A GPU refuses a compiled kernel that asks for more shared memory than a block may have
(Triton raises ``OutOfResources`` before launching). The launchers with fixed tiles then
fall back on smaller ones (``first_that_fits``); here, under the interpreter, the preferred
shapes are refused the same way and the answers still equal the references. Which shapes a
real card refuses is compile data: ``benchmarks/compile_report.py --arch 75`` (or 86), which
refuses them as the card would (tests/test_compile_report_smaller_cards.py).
"""

import pytest
import torch

from effarch._kernels import triton_available

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fresh_choices(monkeypatch):
    """Forget the shapes chosen so far (first_that_fits remembers them by key)."""
    from effarch_kernels import common

    monkeypatch.setattr(common, "_FITTED", {})


class Refusing:
    """A kernel that raises ``OutOfResources`` for launches ``refuse(constants)`` is true
    of, as a card with too little shared memory does; it records the launches it ran."""

    def __init__(self, kernel, refuse):
        self.kernel, self.refuse, self.ran, self.refused = kernel, refuse, [], 0

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kwargs):
            constants = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_stages"}
            if self.refuse(constants):
                self.refused += 1
                raise OutOfResources(100 * 1024, 64 * 1024, "shared memory")
            self.ran.append(constants)
            return self.kernel[grid](*args, **kwargs)

        return launch


def refuse(monkeypatch, module, name, predicate) -> Refusing:
    wrapper = Refusing(getattr(module, name), predicate)
    monkeypatch.setattr(module, name, wrapper)
    return wrapper


# --- the two helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "n", "stages"), [(64, 32, 3), (16, 64, 3), (128, 128, 4), (16, 16, 1)]
)
def test_smaller_tiles_shrink_to_the_least_tile_dividing_each_before(m, n, stages):
    from effarch_kernels.common import smaller_tiles

    shapes = smaller_tiles(m, n, stages)
    assert shapes[0] == (m, n, stages) and shapes[-1] == (16, 16, 1)
    assert len(set(shapes)) == len(shapes)
    for (m0, n0, s0), (m1, n1, s1) in zip(shapes, shapes[1:], strict=False):
        # each shape asks for no more: tiles that divide the last, stages no more
        assert m0 % m1 == 0 and n0 % n1 == 0 and s1 <= s0
        assert (m1, n1) != (m0, n0) or s1 < s0
        assert s1 >= 2 or (m1, n1) == (16, 16)  # one stage only for the least tile
    assert smaller_tiles(64, 32, 3) == [(64, 32, 3), (64, 32, 2), (32, 32, 2), (16, 32, 2),
                                        (16, 16, 2), (16, 16, 1)]  # fmt: skip
    assert smaller_tiles(64, 64, 3, least_m=64)[-1] == (64, 16, 1)


def test_first_that_fits_takes_and_remembers_the_first_shape_the_card_holds(fresh_choices):
    from effarch_kernels.common import NoShapeFits, first_that_fits
    from triton.runtime.errors import OutOfResources

    tried = []

    def launch(size):
        tried.append(size)
        if size > 32:
            raise OutOfResources(size * 1024, 32 * 1024, "shared memory")
        return f"ran at {size}"

    assert first_that_fits("k", [128, 64, 32, 16], launch) == "ran at 32"
    assert tried == [128, 64, 32]
    tried.clear()
    assert first_that_fits("k", [128, 64, 32, 16], launch) == "ran at 32"  # remembered
    assert tried == [32]
    # none fits: an OutOfResources (a launcher one level up goes on to its next shape) that
    # names the launch and what its last shape needed
    with pytest.raises(OutOfResources, match="no launch shape of other fits this GPU") as err:
        first_that_fits(("other", 1), [128, 64], launch)
    assert "the last of the 2 tried needs 65536 bytes of shared memory" in str(err.value)
    assert "the card has 32768" in str(err.value) and isinstance(err.value, NoShapeFits)
    with pytest.raises(ValueError, match="candidates must not be empty"):
        first_that_fits("none", [], launch)


# --- each launcher, its preferred shapes refused ------------------------------------------


def test_flash_attention_forward_in_smaller_tiles(monkeypatch, fresh_choices):
    from effarch_kernels import flash_attention as fa
    from test_attention_tiled_flash import rand, reference

    from effarch.attention import flash_attention

    fwd = refuse(monkeypatch, fa, "_fwd_kernel", lambda c: c["BLOCK_M"] >= 64)
    q = rand(1, 45, 4, 40, device=DEV)
    k, v = (rand(1, 70, 2, 40, device=DEV) for _ in range(2))
    o, lse = flash_attention(q, k, v, causal=True, backend="triton", return_lse=True)
    # the interpreter's 64 x 64 in 3 stages, then in 2, refused: 32 x 64 in 2 stages
    assert fwd.refused == 2 and [
        (c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in fwd.ran
    ] == [(32, 64, 2)]
    ref_o, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), True)
    torch.testing.assert_close(o.cpu().double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_sparse_kernels_in_smaller_tiles(monkeypatch, fresh_choices, dtype):
    """Each of the three kernels refuses tiles of more than 16 x 16 (the interpreter's are
    whole 32 x 64 blocks): a causal mask, ragged ends, grouped heads."""
    from effarch_kernels import block_sparse_attention as bsa
    from test_kernel_block_sparse import check_against_dense, inputs

    from effarch.sparse import causal

    too_big = lambda c: c["TILE_M"] * c["TILE_N"] > 16 * 16  # noqa: E731
    kernels = [refuse(monkeypatch, bsa, n, too_big)
               for n in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")]  # fmt: skip
    check_against_dense(*inputs(70, 90, 4, 2, dtype), causal(40), 32, 64, dtype)
    for kernel in kernels:
        assert kernel.refused >= 1 and kernel.ran
        assert all((c["TILE_M"], c["TILE_N"]) == (16, 16) for c in kernel.ran)


@pytest.mark.parametrize("gated", [True, False])
def test_chunk_scalar_decay_in_shorter_chunks_and_narrower_blocks(
    monkeypatch, fresh_choices, gated
):
    """The forward's states kernel refuses chunks of 64 (so the whole forward runs in chunks
    of 32) and more than 16 value columns; the backward's dq/dk/dv kernel refuses chunks of
    64 and 32 (the backward runs in chunks of 16). Outputs, final state and every gradient
    against autograd through the float64 recurrence."""
    from effarch_kernels import chunk_scalar_decay as csd
    from test_kernel_chunk_scalar_decay import _grads, inputs, kernel, reference

    states = refuse(monkeypatch, csd, "_fwd_states_kernel",
                    lambda c: c["BT"] == 64 or c["BV"] > 16)  # fmt: skip
    output = refuse(monkeypatch, csd, "chunk_output_kernel", lambda c: c["BV"] > 16)
    dqkv = refuse(monkeypatch, csd, "_bwd_dqkv_kernel", lambda c: c["BT"] > 16)
    tensors = inputs(1, 100, 2, 24, 40, gated=gated, with_h0=True)
    gen = torch.Generator().manual_seed(3)
    do, ds = torch.randn(1, 100, 2, 40, generator=gen), torch.randn(1, 2, 24, 40, generator=gen)
    want = _grads(lambda *x: reference(*x, 0.2), tensors, do, ds)
    got = _grads(lambda *x: kernel(*x, 0.2, chunk_size=64), tensors, do, ds)
    for name, a, b in zip(("q", "k", "v", "g", "initial_state"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    o, s = kernel(*tensors, 0.2, chunk_size=64)
    want_o, want_s = reference(*tensors, 0.2)
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-4, atol=1e-4)
    assert {(c["BT"], c["BV"]) for c in states.ran} <= {(32, 16), (16, 16)}
    assert {c["BT"] for c in output.ran} == {32} and {c["BV"] for c in output.ran} == {16}
    assert {c["BT"] for c in dqkv.ran} == {16} and dqkv.refused >= 2


def test_delta_rule_in_shorter_chunks_and_narrower_blocks(monkeypatch, fresh_choices):
    """The states kernel refuses chunks of 64, more than 16 value columns and more than one
    stage: the whole forward (W/U, states, outputs) runs in chunks of 32."""
    from effarch_kernels import chunk_delta_rule as cdr
    from test_kernel_chunk_delta_rule import inputs, kernel, loop

    states = refuse(monkeypatch, cdr, "_delta_states_kernel",
                    lambda c: c["BT"] == 64 or c["BV"] > 16 or c["num_stages"] > 1)  # fmt: skip
    wy = refuse(monkeypatch, cdr, "_wy_kernel", lambda c: False)
    output = refuse(monkeypatch, cdr, "chunk_output_kernel", lambda c: False)
    q, k, v, beta, g, h0 = inputs(70, 24, 40, with_h0=True)
    o, s = kernel(q, k, v, beta, g, h0, 0.2, chunk_size=64)
    want_o, want_s = loop(q, k, v, beta, g, 0.2, h0)
    torch.testing.assert_close(o.cpu().double(), want_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-4, atol=1e-4)
    assert [(c["BT"], c["BV"], c["num_stages"]) for c in states.ran] == [(32, 16, 1)]
    assert states.refused >= 2
    assert [c["BT"] for c in wy.ran] == [64, 32] and [c["BT"] for c in output.ran] == [32]
