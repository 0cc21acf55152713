"""Linearization: the layer (effarch.linear.linearize), LoRA (effarch.nn.lora), attention
transfer and the sweeps (effarch.experiments.linearization).

The exact checks run in float64 against formulas written out here, one query at a time: the
linear path against normalised ``phi(q) . phi(k)`` attention, the sliding-window hybrid
against its definition, and the degenerate cases (a window covering the whole sequence is
softmax attention; a zero linear weight is sliding-window attention). Training is checked on
held-out data: attention transfer must cut the untrained map's error by more than half.
"""

import functools

import pytest
import torch
from einops import rearrange

from effarch.attention import MultiHeadAttention, apply_rope, naive_attention
from effarch.experiments import (
    LinearizationTask,
    TransferResult,
    attention_transfer,
    linearization_sweep,
    linearization_task,
    low_rank_finetune,
)
from effarch.linear.linearize import (
    LinearizedAttention,
    linearization_error,
    softmax_attention_weights,
)
from effarch.nn import LoRALinear, add_lora

F64 = torch.float64


def _layer(d_model=32, n_heads=4, n_kv_heads=None, dtype=F64, sharpness=2.0, **kw):
    layer = MultiHeadAttention(d_model, n_heads, n_kv_heads, **kw).to(dtype)
    with torch.no_grad():
        layer.q_proj.weight.mul_(sharpness)
        layer.k_proj.weight.mul_(sharpness)
    return layer


def _randomise(lin):
    """Move the learnable parts away from their initialisation (identity / zero)."""
    with torch.no_grad():
        for p in lin.transfer_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lin


def _qkv(layer, x):
    """q [B, T, H, D], k and v repeated to H heads, written out from the weights."""
    dh, h = layer.head_dim, layer.n_heads
    q = rearrange(x @ layer.q_proj.weight.T, "b t (h d) -> b t h d", d=dh)
    k = rearrange(x @ layer.k_proj.weight.T, "b t (g d) -> b t g d", d=dh)
    v = rearrange(x @ layer.v_proj.weight.T, "b t (g d) -> b t g d", d=dh)
    pos = torch.arange(x.shape[1])
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    r = h // k.shape[2]
    return q, k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)


def _brute_force(lin, x):
    """The linearized layer one (batch, head, query) at a time, from the definitions."""
    q, k, v = _qkv(lin, x)
    fq = lin.phi_q(q)
    g = lin.n_kv_heads
    fk = lin.phi_k(rearrange(k, "b t (g r) d -> b t g r d", g=g)[:, :, :, 0])
    fk = fk.repeat_interleave(lin.n_heads // g, dim=2)
    b, t, h, d = q.shape
    w = lin.window
    lam = lin.log_linear_weight.exp()
    o = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                scores = []
                for j in range(i + 1):
                    if w is not None and j > i - w:
                        m = max(
                            float(q[bi, i, hi] @ k[bi, s, hi]) * d**-0.5
                            for s in range(max(0, i - w + 1), i + 1)
                        )
                        s_ij = torch.exp(q[bi, i, hi] @ k[bi, j, hi] * d**-0.5 - m)
                    else:
                        s_ij = fq[bi, i, hi] @ fk[bi, j, hi]
                        if w is not None:
                            s_ij = lam[hi] * s_ij
                    scores.append(s_ij)
                scores = torch.stack(scores)
                o[bi, i, hi] = (scores[:, None] * v[bi, : i + 1, hi]).sum(0) / scores.sum()
    return rearrange(o, "b t h d -> b t (h d)") @ lin.o_proj.weight.T


def _from_weights(lin, x):
    """``W_o [Ahat V]`` with the quadratic weights of ``attention_weights``."""
    _, _, v = _qkv(lin, x)
    o = torch.einsum("bhij,bjhd->bihd", lin.attention_weights(x), v)
    return rearrange(o, "b t h d -> b t (h d)") @ lin.o_proj.weight.T


# --------------------------------------------------------------------------------------------
# Exact checks (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize(
    ("feature_map", "feature_dim"), [("hedgehog", None), ("hedgehog", 6), ("elu", None)]
)
def test_linear_path_matches_brute_force(n_kv_heads, feature_map, feature_dim):
    layer = _layer(n_kv_heads=n_kv_heads)
    lin = LinearizedAttention.from_attention(layer, feature_map, feature_dim)
    _randomise(lin)
    x = torch.randn(2, 9, 32, dtype=F64)
    ref = _brute_force(lin, x)
    torch.testing.assert_close(lin(x), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_from_weights(lin, x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_window_hybrid_matches_brute_force(n_kv_heads, window):
    layer = _layer(n_kv_heads=n_kv_heads)
    lin = _randomise(LinearizedAttention.from_attention(layer, "hedgehog", 5, window=window))
    x = torch.randn(2, 10, 32, dtype=F64)
    ref = _brute_force(lin, x)
    torch.testing.assert_close(lin(x), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_from_weights(lin, x), ref, rtol=1e-10, atol=1e-12)


def test_chunked_linear_path_matches_single_chunk():
    layer = _layer()
    x = torch.randn(2, 23, 32, dtype=F64)
    for window in (None, 4):
        a = _randomise(LinearizedAttention.from_attention(layer, window=window, chunk_size=64))
        b = LinearizedAttention.from_attention(layer, window=window, chunk_size=5)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("feature_map", "feature_dim", "window", "n_kv_heads"),
    [("hedgehog", 5, 4, 2), ("hedgehog", None, None, None), ("elu", None, 1, 1),
     ("performer", 12, 3, None), ("hedgehog", 5, 16, 2)],
)  # fmt: skip
@pytest.mark.parametrize("splits", [[11], [1] * 11, [3, 4, 1, 3], [6, 5]])
def test_step_continues_the_sequence_in_any_split(
    feature_map, feature_dim, window, n_kv_heads, splits
):
    """The recurrent form: a prefill, chunks, single tokens; each call continues the last,
    equal to the brute force on the whole sequence, holding ``state_size(T)`` numbers."""
    lin = LinearizedAttention.from_attention(
        _layer(n_kv_heads=n_kv_heads), feature_map, feature_dim, window
    )
    _randomise(lin)
    x = torch.randn(2, 11, 32, dtype=F64)
    ref = _brute_force(lin, x)
    state, outs, t = None, [], 0
    with torch.no_grad():
        for n in splits:
            y, state = lin.step(x[:, t : t + n], state)
            outs.append(y)
            t += n
            held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
            assert held == 2 * lin.state_size(t) and state["offset"] == t
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-10, atol=1e-12)


def test_step_rejects_a_state_that_does_not_fit():
    lin = LinearizedAttention(32, 4, 2, window=4)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        _, state = lin.step(x)
        with pytest.raises(ValueError, match="offset"):
            lin.step(x[:, :1], {**state, "offset": -1})
        with pytest.raises(ValueError, match="min\\(offset, window\\)"):
            lin.step(x[:, :1], {**state, "offset": 2})
        with pytest.raises(ValueError, match="shape"):
            lin.step(x[:1, :1], state)  # a state of batch 2 for one sequence
        with pytest.raises(TypeError, match="state must be None or the dict"):
            lin.step(x, state=[1, 2])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("rope", [True, False])
def test_window_covering_the_sequence_is_softmax_attention(n_kv_heads, rope):
    layer = _layer(n_kv_heads=n_kv_heads, rope=rope)
    x = torch.randn(3, 12, 32, dtype=F64)
    for window in (12, 40):
        lin = _randomise(LinearizedAttention.from_attention(layer, window=window))
        torch.testing.assert_close(lin(x), layer(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            lin.attention_weights(x), softmax_attention_weights(layer, x), rtol=1e-10, atol=1e-12
        )


def test_zero_linear_weight_is_sliding_window_attention():
    layer = _layer(n_kv_heads=2)
    w = 4
    windowed = MultiHeadAttention(
        32, 4, 2, attention=functools.partial(naive_attention, window=(w - 1, 0))
    ).to(F64)
    windowed.load_state_dict(layer.state_dict())
    lin = _randomise(LinearizedAttention.from_attention(layer, window=w))
    with torch.no_grad():
        lin.log_linear_weight.fill_(float("-inf"))
    x = torch.randn(2, 15, 32, dtype=F64)
    torch.testing.assert_close(lin(x), windowed(x), rtol=1e-10, atol=1e-12)


def test_softmax_attention_weights_reproduce_the_layer():
    layer = _layer(n_kv_heads=2)
    x = torch.randn(2, 11, 32, dtype=F64)
    a = softmax_attention_weights(layer, x)
    assert a.shape == (2, 4, 11, 11)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 11, dtype=F64))
    assert torch.all(a.triu(1) == 0)
    _, _, v = _qkv(layer, x)
    o = rearrange(torch.einsum("bhij,bjhd->bihd", a, v), "b t h d -> b t (h d)")
    torch.testing.assert_close(layer.o_proj(o), layer(x), rtol=1e-10, atol=1e-12)


def test_linearized_weights_are_normalised_and_causal():
    layer = _layer()
    x = torch.randn(2, 10, 32, dtype=F64)
    for window in (None, 3):
        a = LinearizedAttention.from_attention(layer, window=window).attention_weights(x)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 10, dtype=F64))
        assert torch.all(a.triu(1) == 0) and torch.all(a >= 0)


def test_performer_features_approximate_softmax_with_many_features():
    layer = _layer(sharpness=0.5)
    x = torch.randn(2, 16, 32, dtype=F64)
    errors = [
        linearization_error(layer, LinearizedAttention.from_attention(layer, "performer", m), x)[
            "rel_l1"
        ]
        for m in (4, 1024)
    ]
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.1


# --------------------------------------------------------------------------------------------
# Copying, freezing and LoRA
# --------------------------------------------------------------------------------------------


def test_from_attention_copies_and_freezes():
    layer = _layer(dtype=torch.float32, bias=True)
    lin = LinearizedAttention.from_attention(layer, feature_dim=8, window=4)
    assert lin.q_proj is not layer.q_proj
    torch.testing.assert_close(lin.q_proj.bias, layer.q_proj.bias)
    assert lin.q_proj.weight.dtype == torch.float32
    frozen = [p for n, p in lin.named_parameters() if n.split(".")[0].endswith("_proj")]
    assert frozen and not any(p.requires_grad for p in frozen)
    names = {n for n, _ in lin.named_parameters()}
    assert names - {n for n, p in lin.named_parameters() if p.requires_grad} == {
        f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")
    }
    assert len(lin.transfer_parameters()) == 5  # phi_q and phi_k weight and bias, lambda
    unfrozen = LinearizedAttention.from_attention(layer, freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_lora_with_zero_b_leaves_outputs_unchanged():
    layer = _layer()
    lin = _randomise(LinearizedAttention.from_attention(layer, feature_dim=8, window=3))
    x = torch.randn(2, 10, 32, dtype=F64)
    before = lin(x)
    params = add_lora(lin, 4)
    assert len(params) == 8 and all(p.requires_grad for p in params)
    assert isinstance(lin.q_proj, LoRALinear) and not lin.q_proj.base.weight.requires_grad
    torch.testing.assert_close(lin(x), before, rtol=0, atol=0)
    # a second call adds nothing and returns the same adapters
    assert [id(p) for p in add_lora(lin, 4)] == [id(p) for p in params]
    with torch.no_grad():
        lin.o_proj.lora_b.normal_()
    assert not torch.allclose(lin(x), before)
    # the effective weight is W + scale B A
    torch.testing.assert_close(lin.o_proj(x[0]), x[0] @ lin.o_proj.weight.T)


def test_lora_alpha_scales_the_update():
    base = torch.nn.Linear(6, 5, bias=False).double()
    lora = LoRALinear(base, 2, alpha=6.0)
    assert lora.scaling == 3.0
    with torch.no_grad():
        lora.lora_b.fill_(1.0)
    x = torch.randn(4, 6, dtype=F64)
    expected = base(x) + 3.0 * (x @ lora.lora_a.T) @ lora.lora_b.T
    torch.testing.assert_close(lora(x), expected)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task():
    return linearization_task(seq_len=64, n_train=128, n_test=32, seed=0)


@pytest.fixture(scope="module")
def small_task():
    return linearization_task(seq_len=32, n_train=64, n_test=16, seed=1)


def test_linearization_task_is_peaked_and_seeded(task):
    assert isinstance(task, LinearizationTask)
    assert task.train.shape == (128, 64, 64) and task.test.shape == (32, 64, 64)
    assert task.entropy < 0.6 * task.uniform_entropy
    again = linearization_task(seq_len=64, n_train=128, n_test=32, seed=0)
    torch.testing.assert_close(again.test, task.test, rtol=0, atol=0)
    assert "entropy" in task.description


def test_attention_transfer_beats_the_untrained_map(task):
    layer = task.layer
    before = {n: p.clone() for n, p in layer.named_parameters()}
    lin = LinearizedAttention.from_attention(layer, "hedgehog", 32)
    frozen = lin.q_proj.weight.clone()
    untrained = linearization_error(layer, lin, task.test)["rel_l1"]
    res = attention_transfer(
        layer, lin, task.train, steps=150, lr=3e-2, eval_data=task.test, progress=False
    )
    assert isinstance(res, TransferResult)
    assert res.initial_error == pytest.approx(untrained)
    assert res.final_error == pytest.approx(linearization_error(layer, lin, task.test)["rel_l1"])
    assert res.final_error < 0.5 * untrained, (untrained, res.error)
    assert res.steps[0] == 0 and res.steps[-1] == 150 and len(res.loss) == 150
    assert res.records()[-1] == {"step": 150, "error": res.final_error}
    # only the feature maps moved; the teacher and the projections did not
    torch.testing.assert_close(lin.q_proj.weight, frozen, rtol=0, atol=0)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    assert not lin.q_proj.weight.requires_grad and lin.phi_q.weight.requires_grad


def test_window_transfer_and_weights_loss(task, small_task):
    layer = task.layer
    lin = LinearizedAttention.from_attention(layer, "hedgehog", 16, window=16)
    res = attention_transfer(layer, lin, task.train, steps=60, eval_data=task.test, progress=False)
    assert res.final_error < 0.6 * res.initial_error, res.error
    task = small_task
    layer = task.layer
    lin = LinearizedAttention.from_attention(layer, "hedgehog", 16)
    res = attention_transfer(
        layer, lin, task.train, steps=40, loss="weights", eval_data=task.test, eval_every=20,
        progress=False,
    )  # fmt: skip
    assert res.steps == [0, 20, 40]
    assert res.final_error < 0.9 * res.initial_error and res.loss[-1] < res.loss[0], res.error


def test_transfer_accepts_a_callable_and_is_seeded(small_task):
    task = small_task
    layer = task.layer
    gen = torch.Generator().manual_seed(1)

    def batches():
        return task.train[torch.randint(64, (4,), generator=gen)]

    lin = LinearizedAttention.from_attention(layer, feature_dim=8)
    res = attention_transfer(layer, lin, batches, steps=5, progress=False)
    assert len(res.loss) == 5
    runs = []
    for _ in range(2):
        lin = LinearizedAttention.from_attention(layer, feature_dim=8, seed=3)
        runs.append(attention_transfer(layer, lin, task.train, steps=5, progress=False).loss)
    assert runs[0] == runs[1]


def test_low_rank_finetune_starts_exact_and_improves(small_task):
    task = small_task
    layer = task.layer
    lin = LinearizedAttention.from_attention(layer, "hedgehog", 16)
    attention_transfer(layer, lin, task.train, steps=40, progress=False)
    transferred = linearization_error(layer, lin, task.test)["rel_l1"]
    phi = lin.phi_q.weight.clone()
    res = low_rank_finetune(
        layer, lin, task.train, rank=4, steps=40, lr=3e-3, eval_data=task.test, progress=False
    )
    assert res.initial_error == pytest.approx(transferred)
    assert res.final_error < res.initial_error, res.error
    torch.testing.assert_close(lin.phi_q.weight, phi, rtol=0, atol=0)  # feature maps frozen
    assert isinstance(lin.v_proj, LoRALinear) and isinstance(layer.v_proj, torch.nn.Linear)


def test_linearization_sweep_records(small_task):
    records = linearization_sweep(
        small_task, feature_dims=(8,), windows=(None, 8), steps=3, progress=False
    )
    # per window: elu, performer (no window) or the window alone, hedgehog untrained and trained
    assert len(records) == 8
    keys = {"feature_map", "feature_dim", "n_features", "window", "trained", "steps", "error",
            "cos_sim", "seconds"}  # fmt: skip
    assert all(set(r) == keys for r in records)
    assert {(r["feature_map"], r["window"], r["trained"]) for r in records} == {
        (m, w, t) for w in (None, 8) for m, t in
        (("elu", False), ("performer", False), ("none", False), ("hedgehog", False),
         ("hedgehog", True))
        if (m != "performer" or w is None) and (m != "none" or w is not None)
    }  # fmt: skip
    hh = [r for r in records if r["feature_map"] == "hedgehog"]
    assert all(r["n_features"] == 16 for r in hh)
    assert all(r["error"] > 0 for r in records)
    assert [r["feature_dim"] for r in records if r["feature_map"] == "none"] == [0]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(task):
    layer = _layer()
    lin = LinearizedAttention.from_attention(layer)
    with pytest.raises(TypeError, match="layer must be a MultiHeadAttention"):
        LinearizedAttention.from_attention(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="layer must be causal"):
        LinearizedAttention.from_attention(MultiHeadAttention(32, 4, causal=False))
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearizedAttention.from_attention(layer, "cosine")
    with pytest.raises(TypeError, match="feature_map must be a str"):
        LinearizedAttention.from_attention(layer, 3)
    with pytest.raises(ValueError, match="feature_dim must be a positive int"):
        LinearizedAttention.from_attention(layer, feature_dim=0)
    with pytest.raises(ValueError, match="feature_map='elu' keeps the head dim"):
        LinearizedAttention.from_attention(layer, "elu", 16)
    with pytest.raises(ValueError, match="window must be a positive int"):
        LinearizedAttention.from_attention(layer, window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        LinearizedAttention.from_attention(layer, window=2.5)
    with pytest.raises(TypeError, match="freeze must be a bool"):
        LinearizedAttention.from_attention(layer, freeze="yes")
    with pytest.raises(ValueError, match="n_heads .* must be a multiple of n_kv_heads"):
        LinearizedAttention(32, 4, 3)
    with pytest.raises(ValueError, match="d_model .* must be divisible by n_heads"):
        LinearizedAttention(30, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model\] with d_model=32"):
        lin(torch.randn(2, 5, 16, dtype=F64))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        lin(torch.randn(5, 32, dtype=F64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lin.attention_weights([[1.0]])
    with pytest.raises(ValueError, match="at least one sequence and token"):
        lin(torch.randn(2, 0, 32, dtype=F64))
    with pytest.raises(ValueError, match="x must be"):
        softmax_attention_weights(layer, torch.randn(2, 5, 8, dtype=F64))

    t = task.layer
    tl = LinearizedAttention.from_attention(t)
    train = task.train[:8]
    with pytest.raises(TypeError, match="linearized must be a LinearizedAttention"):
        attention_transfer(t, t, train, steps=1)
    with pytest.raises(ValueError, match="linearized must have the layer's d_model"):
        attention_transfer(t, lin, train, steps=1)
    with pytest.raises(TypeError, match="data must be a"):
        attention_transfer(t, tl, [1, 2], steps=1)
    with pytest.raises(ValueError, match="data must be"):
        attention_transfer(t, tl, torch.randn(2, 5, 3), steps=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        attention_transfer(t, tl, train, steps=0)
    with pytest.raises(ValueError, match="lr must be a finite positive number"):
        attention_transfer(t, tl, train, steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        attention_transfer(t, tl, train, steps=1, loss="mse")
    with pytest.raises(ValueError, match="eval_data must be"):
        attention_transfer(t, tl, train, steps=1, eval_data=torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="eval_every must be an int"):
        attention_transfer(t, tl, train, steps=1, eval_every=1.5)
    with pytest.raises(TypeError, match="progress must be a bool"):
        attention_transfer(t, tl, train, steps=1, progress=1)
    with pytest.raises(ValueError, match=r"data\(\) must be"):
        attention_transfer(t, tl, lambda: torch.randn(2, 5, 3), steps=1)
    with pytest.raises(ValueError, match="nothing to train"):
        attention_transfer(t, LinearizedAttention.from_attention(t, "elu"), train, steps=1)
    with pytest.raises(TypeError, match="linearization_error|must be nn.Modules"):
        linearization_error(t, "lin", train)

    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="rank must be at most"):
        LoRALinear(torch.nn.Linear(4, 3), 4)
    with pytest.raises(ValueError, match="alpha must be a finite positive number"):
        LoRALinear(torch.nn.Linear(4, 3), 2, alpha=0.0)
    with pytest.raises(ValueError, match="targets must name nn.Linear attributes"):
        add_lora(lin, 2, targets=("phi_q",))
    with pytest.raises(TypeError, match="targets must be a non-empty sequence"):
        add_lora(lin, 2, targets="q_proj")
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        add_lora("lin", 2)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        low_rank_finetune(t, tl, train, rank=0, steps=1)
    with pytest.raises(TypeError, match="train_feature_maps must be a bool"):
        low_rank_finetune(t, tl, train, steps=1, train_feature_maps=None)

    with pytest.raises(TypeError, match="task must be a LinearizationTask"):
        linearization_sweep(t)
    with pytest.raises(ValueError, match=r"feature_dims\[i\] must be a positive int"):
        linearization_sweep(task, feature_dims=(0,))
    with pytest.raises(ValueError, match=r"baselines\[i\] must be one of"):
        linearization_sweep(task, baselines=("taylor",))
    with pytest.raises(ValueError, match="must not be empty"):
        linearization_sweep(task, windows=())
    with pytest.raises(ValueError, match="match must lie in"):
        linearization_task(match=1.5)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        linearization_task(dtype=torch.int64)
