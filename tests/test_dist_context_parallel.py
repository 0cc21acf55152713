"""Chapter 9.2: ring attention and LASP over 2 and 4 gloo processes equal the single-process
ops (naive attention, the linear ops on the whole sequence), outputs and gradients; the bytes
they send and the work they do equal the models."""

import pytest
import torch
import torch.nn.functional as F

from effarch import linear
from effarch.attention import naive_attention
from effarch.dist import (
    check_context_parallel,
    context_parallel_errors,
    lasp,
    lasp_bytes,
    ring_attention,
    ring_attention_bytes,
    ring_chunk_products,
    shard_chunks,
    shard_sequence,
    spawn,
    unshard_sequence,
)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

B, T, H, HKV, D = 1, 16, 4, 2, 8
F64 = torch.float64


def _cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    q, k, v = rnd(B, T, H, D), rnd(B, T, HKV, D), rnd(B, T, HKV, D)
    kn = F.normalize(rnd(B, T, H, D), dim=-1)
    vv, do = rnd(B, T, H, D), rnd(B, T, H, D)
    gk = F.logsigmoid(rnd(B, T, H, D))
    gh = F.logsigmoid(rnd(B, T, H))
    beta = torch.rand(B, T, H, generator=g, dtype=F64)
    a = -F.normalize(rnd(B, T, H, D), dim=-1)
    cases = [
        dict(kind="ring", inputs=[q, k, v], dout=do, kwargs={"causal": c}, layout=lay)
        for c in (True, False)
        for lay in ("zigzag", "contiguous")
    ]
    kw = {"chunk_size": 2}
    for op, gates in [
        (linear.linear_attention, []),
        (linear.retention, []),
        (linear.simple_gla, [gh]),
        (linear.gla, [gk]),
        (linear.delta_rule, [beta]),
        (linear.gated_delta_rule, [gh, beta]),
        (linear.dplr_delta_rule, [a, -a * beta[..., None], gk]),
    ]:
        inputs = [q, kn, vv, *gates]
        cases.append(dict(kind="lasp", op=op, inputs=inputs, dout=do, kwargs=kw))
    return cases


def _reference(case):
    xs = [x.clone().requires_grad_() for x in case["inputs"]]
    if case["kind"] == "ring":
        o = naive_attention(*xs, causal=case["kwargs"]["causal"])
    else:
        o, _ = case["op"](*xs, **case["kwargs"])
    (o * case["dout"]).sum().backward()
    return o.detach(), [x.grad for x in xs]


@pytest.fixture(scope="module", params=[2, 4])
def run(request):
    world, cases = request.param, _cases()
    saved = spawn(check_context_parallel, world, {"cases": cases})
    return world, cases, [saved[f"rank{r}"] for r in range(world)]


def test_equal_to_one_process_forward_and_backward(run):
    world, cases, ranks = run
    for i, case in enumerate(cases):
        layout = case.get("layout", "contiguous")
        want_o, want_grads = _reference(case)
        got_o = unshard_sequence([r[i]["out"] for r in ranks], layout)
        torch.testing.assert_close(got_o, want_o, rtol=1e-11, atol=1e-11)
        for j, want in enumerate(want_grads):
            got = unshard_sequence([r[i]["grads"][j] for r in ranks], layout)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{i} grad {j}")


def test_errors_helper_matches_and_catches_a_wrong_shard(run):
    # the helper chapter 9.2 calls: rounding-small on the real run, and a corrupted shard of
    # one gradient on one rank shows up at its true size in that case only
    world, cases, ranks = run
    errors = context_parallel_errors(cases, ranks)
    assert len(errors) == len(cases) and max(errors) < 1e-10
    bad = [[dict(c, grads=list(c["grads"])) for c in r] for r in ranks]
    bad[-1][1]["grads"][2] = bad[-1][1]["grads"][2] + 0.5
    errors = context_parallel_errors(cases, bad)
    assert abs(errors[1] - 0.5) < 1e-9
    assert max(errors[:1] + errors[2:]) < 1e-10
    with pytest.raises(ValueError, match="one result per case"):
        context_parallel_errors(cases, [r[:-1] for r in ranks])


def test_bytes_sent_equal_the_models(run):
    world, cases, ranks = run
    for i, case in enumerate(cases):
        if case["kind"] == "ring":
            want = ring_attention_bytes(T, world, HKV, D, bytes_per=8, batch=B)
        else:
            dv = case["inputs"][2].shape[-1]
            want = lasp_bytes(case["op"].__name__, world, H, D, dv, bytes_per=8, batch=B)
        for r in ranks:
            assert r[i]["bytes"]["forward"] == want["forward"]
            assert r[i]["bytes"]["backward"] == want["backward"]


def test_lasp_bytes_do_not_grow_with_length_ring_bytes_do():
    assert lasp_bytes("gla", 4, 8, 64, 64) == lasp_bytes("gla", 4, 8, 64, 64)
    short, long = ring_attention_bytes(1024, 4, 8, 64), ring_attention_bytes(4096, 4, 8, 64)
    assert long["forward"] == 4 * short["forward"]
    # per rank, more ranks send about the same total: (P - 1) blocks of T / P tokens
    assert ring_attention_bytes(4096, 8, 8, 64)["forward"] == 7 * 2 * 512 * 8 * 64 * 2


def test_ring_chunk_products_counted_and_balanced(run):
    world, cases, ranks = run
    for i, case in enumerate(cases):
        if case["kind"] != "ring":
            continue
        want = ring_chunk_products(world, case["layout"], case["kwargs"]["causal"])
        assert [r[i]["bytes"]["products"] for r in ranks] == want
    # brute force over every (query chunk, key chunk) pair of the causal mask
    for p in (2, 3, 4, 8):
        contiguous = ring_chunk_products(p, "contiguous")
        assert contiguous == [4 * r + 3 for r in range(p)]
        assert ring_chunk_products(p, "zigzag") == [2 * p + 1] * p
        assert sum(contiguous) == p * (2 * p + 1)


def test_shards_round_trip_and_zigzag_order():
    x = torch.arange(24).view(1, 24)
    for layout in ("zigzag", "contiguous"):
        for world in (1, 2, 3):
            shards = [shard_sequence(x, world, r, layout) for r in range(world)]
            assert torch.equal(unshard_sequence(shards, layout), x)
    assert shard_chunks(4, 1, "zigzag") == [1, 6]
    assert shard_sequence(x, 2, 0, "zigzag").tolist() == [[*range(6), *range(18, 24)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_process_is_plain_attention(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 12, 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 12, 2, 8, dtype=dtype, requires_grad=True)
    o = ring_attention(q, k, v, causal=True, softmax_scale=0.3)
    ref = naive_attention(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(o.double(), ref, rtol=tol, atol=tol)
    assert o.dtype == dtype
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for got, w in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), w.double(), rtol=tol, atol=tol)


def test_bad_input_is_named():
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match="two chunks"):
        ring_attention(q[:, :5], q[:, :5], q[:, :5])
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="multiple of 2"):
        shard_sequence(q, 2, 0)
    with pytest.raises(ValueError, match="world must be a positive int, got 0"):
        shard_sequence(q, 0, 0)  # not a ZeroDivisionError
    with pytest.raises(TypeError, match="world must be an int"):
        shard_sequence(q, 2.0, 0)
    v_wide = torch.randn(1, 6, 2, 6)  # Dv = 6 != D = 4: keys and values travel as one block
    with pytest.raises(ValueError, match=r"v must have the head dim of q and k \(4\).*got 6"):
        ring_attention(q, q, v_wide)
    with pytest.raises(ValueError, match="rank"):
        shard_chunks(2, 2)
    with pytest.raises(TypeError, match="op must be one of"):
        lasp(torch.matmul, q, q, q)
    with pytest.raises(ValueError, match="initial_state"):
        lasp(linear.gla, q, q, q, q, initial_state=None)
    with pytest.raises(ValueError, match="normalize"):
        lasp(linear.linear_attention, q, q, q, normalize=True)


def test_sixteen_bit_inputs_send_what_the_models_say():
    # keys and values travel in float16, their gradients and LASP's states in float32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, HKV, HKV))
    kn = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    vv, do = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, D, generator=g)
    gk = F.logsigmoid(torch.randn(B, T, H, D, generator=g))
    half = [x.half() for x in (q, k, v)]
    cases = [
        dict(kind="ring", inputs=half, dout=do.half(), kwargs={"causal": True}, layout="zigzag"),
        dict(kind="lasp", op=linear.gla, inputs=[x.half() for x in (q, kn, vv, gk)],
             dout=do.half(), kwargs={"chunk_size": 2}),
    ]  # fmt: skip
    saved = spawn(check_context_parallel, 2, {"cases": cases})
    ranks = [saved[f"rank{r}"] for r in range(2)]
    ring_want = ring_attention_bytes(T, 2, HKV, D, bytes_per=2, batch=B)
    _, state = linear.gla(*cases[1]["inputs"], chunk_size=2, output_final_state=True)
    lasp_want = lasp_bytes("gla", 2, H, D, D, bytes_per=state.element_size(), batch=B)
    assert state.dtype == torch.float32  # the state of 16-bit inputs
    for r in ranks:
        assert r[0]["bytes"]["forward"] == ring_want["forward"]
        assert r[0]["bytes"]["backward"] == ring_want["backward"]
        assert r[1]["bytes"]["forward"] == lasp_want["forward"]
    got = unshard_sequence([r[0]["out"] for r in ranks], "zigzag").double()
    want = naive_attention(q.half().double(), k.half().double(), v.half().double(), causal=True)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
