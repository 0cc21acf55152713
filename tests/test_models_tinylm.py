"""TinyLM: every mixer's shapes, causality and state size; the trainer (effarch.train); a real
recall test; the recall experiment (effarch.experiments.recall) and its command line."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from effarch.attention import MultiHeadAttention, WindowKVCache
from effarch.experiments import RECALL_CPU, RECALL_GPU, RecallConfig, recall_experiment
from effarch.experiments.__main__ import main as experiments_main
from effarch.models import (
    MIXERS,
    SlidingWindowAttention,
    TinyLM,
    TokenMixer,
    mixer_state_size,
)
from effarch.tasks import mqar
from effarch.train import TrainResult, evaluate, train

VOCAB, D = 16, 32


def _model(name: str, **kwargs) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(VOCAB, D, 2, name, **kwargs)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_shapes_and_causality(name):
    model = _model(name).double()
    x = torch.randint(0, VOCAB, (2, 11))  # 11: not a multiple of any chunk size
    logits = model(x)
    assert logits.shape == (2, 11, VOCAB) and logits.dtype == torch.float64
    assert torch.isfinite(logits).all()
    # changing token 6 leaves the logits of tokens 0..5 unchanged, and changes later ones
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % VOCAB
    other = model(y)
    torch.testing.assert_close(other[:, :6], logits[:, :6], rtol=0, atol=1e-10)
    assert not torch.allclose(other[:, 6:], logits[:, 6:])


def _recurrent_state_numel(layer: nn.Module, seq_len: int) -> int:
    """Elements of the recurrent memory, read from a real forward pass (batch of one)."""
    x = torch.randn(1, seq_len, D)
    if isinstance(layer, MultiHeadAttention) or hasattr(layer, "new_cache"):  # a KV cache
        # the keys and values the last token attends to: what the cache hands the last step
        # (a full cache: every token; a window buffer: the last `window`)
        cache = layer.new_cache(1, seq_len)
        update, read = cache.update, []
        cache.update = lambda k, v: read.append(update(k, v)) or read[-1]
        layer(x[:, :-1], cache)
        layer(x[:, -1:], cache)
        # NSA's cache also keeps the block means its compressed branch attends
        pooled = sum(p.numel() for p in cache.pooled()) if hasattr(cache, "pooled") else 0
        return read[-1][0].numel() + read[-1][1].numel() + pooled
    return _state_numel(layer(x)[1])


def _state_numel(state: dict) -> int:
    # not conv caches, token shifts or offsets; "k", "v": the keys and values a window holds
    memory = {"S", "z", "h", "ssm", "s", "anchor", "k", "v"}
    total = 0
    for key, value in state.items():
        if isinstance(value, dict):  # a layer of two branches (ParallelHybrid)
            total += _state_numel(value)
        elif isinstance(value, WindowKVCache):  # keys and values of the tokens held
            total += value.k.numel() + value.v.numel()
        elif key in memory:
            total += value.numel() * (2 if value.is_complex() else 1)
    return total


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_state_size_matches_the_real_state(name):
    model = _model(name)
    layer = model.blocks[0].mixer.layer
    for seq_len in (5, 24):
        assert model.state_size(seq_len) == _recurrent_state_numel(layer, seq_len)
        assert mixer_state_size(layer, seq_len) == mixer_state_size(model, seq_len)


def test_state_size_knobs():
    size = lambda name, **kw: _model(name, mixer_kwargs=kw).state_size(64)  # noqa: E731
    assert size("attention", n_heads=2) == 2 * 64 * D
    assert size("sliding_window", n_heads=2, window=8) == 2 * 8 * D
    assert size("linear_attention", n_heads=1, normalize=False) == D * D
    assert size("linear_attention", n_heads=4, normalize=False) == D * D // 4
    assert size("deltanet", n_heads=2) == D * D // 2
    assert size("gated_deltanet", n_heads=1, expand_v=2) == 2 * D * D
    assert size("gla", n_heads=1, expand_k=1.0) == D * D
    assert size("mamba", d_state=4) == 2 * D * 4
    assert size("mamba2", d_state=8) == 2 * D * 8
    assert size("hgrn", expand_ratio=2) == 2 * D
    # MLA: the latent and the shared RoPE key of every token, whatever the heads
    assert size("mla", n_heads=2, kv_lora_rank=8, qk_rope_head_dim=4) == 64 * (8 + 4)
    # its defaults: DeepSeek-V2's proportions at this width (d_c = d/2, d_r = d_h/2)
    mla = _model("mla").blocks[0].mixer.layer
    assert (mla.d_c, mla.d_n, mla.d_r, mla.d_v) == (D // 2, D, D // 2, D)


def test_custom_mixer_and_options():
    class Shift(nn.Module):
        """A mixer of our own: each token sees its predecessor."""

        def __init__(self, d_model: int, scale: float = 1.0) -> None:
            super().__init__()
            self.proj = nn.Linear(d_model, d_model)
            self.scale = scale

        def forward(self, x):
            return self.scale * self.proj(torch.nn.functional.pad(x, (0, 0, 1, 0))[:, :-1])

        def state_size(self, seq_len: int) -> int:
            return self.proj.in_features

    model = TinyLM(VOCAB, D, 1, Shift, mixer_kwargs={"scale": 0.5}, mlp="gelu", d_ff=0,
                   tie_embeddings=False)  # fmt: skip
    assert model(torch.randint(0, VOCAB, (3, 7))).shape == (3, 7, VOCAB)
    assert model.state_size(7) == D and model.mixer_name == "Shift"
    assert isinstance(model.blocks[0].mixer, TokenMixer)
    # the short convolution goes before mixers without one of their own
    assert _model("attention").blocks[0].conv is not None
    assert _model("deltanet").blocks[0].conv is None
    assert _model("deltanet", short_conv=3).blocks[0].conv.kernel_size == 3
    assert _model("attention", short_conv=0).blocks[0].conv is None
    assert isinstance(_model("sliding_window").blocks[0].mixer.layer, SlidingWindowAttention)
    # Gated DeltaNet's decay initialisation arguments take effect
    gdn = _model("gated_deltanet", mixer_kwargs={"A_init_range": (2.0, 2.0), "dt_max": 0.01})
    layer = gdn.blocks[0].mixer.layer
    torch.testing.assert_close(layer.A_log.exp(), torch.full_like(layer.A_log, 2.0))
    assert torch.nn.functional.softplus(layer.dt_bias).max() <= 0.01 + 1e-6


def test_train_and_evaluate_bookkeeping():
    data = mqar(256, seq_len=16, n_pairs=3, vocab_size=VOCAB, seed=1)
    held = mqar(64, seq_len=16, n_pairs=3, vocab_size=VOCAB, seed=2)
    model = _model("linear_attention")
    res = train(model, data, steps=6, batch_size=32, eval_data=held, eval_every=3,
                progress=False)  # fmt: skip
    assert isinstance(res, TrainResult)
    assert len(res.losses) == 6 and res.steps == 6 and res.tokens == 6 * 32 * 16
    assert [s for s, _ in res.eval_history] == [3, 6]
    assert 0 <= res.accuracy <= 1 and res.accuracy == evaluate(model, held)
    assert res.tokens_per_s > 0 and res.train_seconds > 0
    # a callable data source, and (inputs, targets) pairs, work too
    res = train(model, lambda step: (data.inputs[:8], data.targets[:8]), steps=2,
                progress=False)  # fmt: skip
    assert res.accuracy is None and res.tokens == 2 * 8 * 16
    assert evaluate(model, (held.inputs, held.targets), batch_size=7) == evaluate(model, held)
    # the same seed gives the same losses
    again = [train(_model("linear_attention"), data, steps=3, batch_size=16, seed=4,
                   progress=False).losses for _ in range(2)]  # fmt: skip
    assert again[0] == again[1]


def test_softmax_attention_learns_recall():
    """A real learning test: two attention layers of width 32 learn MQAR (8 pairs in 32
    tokens, 64 tokens) to high accuracy on held-out sequences within a small budget that is
    counted, not timed: 300 steps of one forward and one backward pass each, about 0.15 GFLOP
    a step, well under 100 GFLOP in all (seconds on two CPU cores)."""
    from effarch.bench import measure_flops

    task = dict(seq_len=32, n_pairs=8, vocab_size=64)
    data, held = mqar(300 * 32, seed=0, **task), mqar(500, seed=1, **task)
    torch.manual_seed(0)
    model = TinyLM(64, 32, 2, "attention", mixer_kwargs={"n_heads": 1})
    assert evaluate(model, held) < 0.1  # chance is 1/32
    forwards = []
    hook = model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape))
    result = train(model, data, steps=300, batch_size=32, lr=1e-2, progress=False)
    hook.remove()
    accuracy = evaluate(model, held)
    assert accuracy >= 0.9, accuracy
    assert result.losses[-1] < 0.1 * result.losses[0]
    # the work: exactly one forward pass of one [32, 32] batch per step, nothing hidden
    assert result.steps == 300 and forwards == [(32, 32)] * 300
    # a step's matrix products follow the 6 N D rule exactly (N weights used in products,
    # D tokens): 2 N D forward, 4 N D backward
    step = measure_flops(lambda: model(data.inputs[:32]).sum().backward())
    n_weights = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    assert step.by_operator["mm"] == 6 * n_weights * 32 * 32
    assert result.steps * step.total < 1e11


def test_bigger_state_recalls_more():
    """DeltaNet with one 32-wide head (1024 numbers of state) beats eight 4-wide heads
    (128 numbers) on the same task, trained the same way."""
    task = dict(seq_len=32, n_pairs=8, vocab_size=64)
    data, held = mqar(200 * 32, seed=0, **task), mqar(500, seed=1, **task)
    acc = {}
    for heads in (8, 1):
        torch.manual_seed(0)
        model = TinyLM(64, 32, 2, "deltanet", mixer_kwargs={"n_heads": heads})
        train(model, data, steps=200, batch_size=32, lr=1e-2, progress=False)
        acc[heads] = evaluate(model, held)
    assert acc[1] > acc[8] + 0.25, acc


def test_recall_experiment_records_and_cli(tmp_path):
    tiny = dataclasses.replace(
        RECALL_CPU, steps=2, batch_size=4, n_eval=8,
        mixers={"attention": [{"n_heads": 1}], "mamba2": [{"d_state": 2}, {"d_state": 4}]},
    )  # fmt: skip
    records = recall_experiment(tiny, progress=False)
    assert [(r["mixer"], r["state_size"]) for r in records] == [
        ("attention", 2 * 32 * 32),
        ("mamba2", 2 * 32 * 2),
        ("mamba2", 2 * 32 * 4),
    ]
    for r in records:
        assert 0 <= r["accuracy"] <= 1 and r["params"] > 0 and r["wall_s"] > 0
        assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0
    json.dumps(records)  # plain data
    only = recall_experiment(tiny, mixers=["attention"], progress=False, seed=1)
    assert len(only) == 1
    out = tmp_path / "r.json"
    # the package's command line, python -m effarch.experiments recall ...
    experiments_main(["recall", "--size", "cpu", "--mixers", "attention", "--steps", "2",
                      "--no-progress", "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["config"]["steps"] == 2 and saved["records"][0]["mixer"] == "attention"
    assert list(saved["config"]["mixers"]) == ["attention"]
    with pytest.raises(SystemExit, match="usage: python -m effarch.experiments"):
        experiments_main(["no_such_experiment"])


def test_configs_are_consistent():
    for config in (RECALL_CPU, RECALL_GPU):
        assert isinstance(config, RecallConfig)
        assert set(config.mixers) == {"attention", "linear_attention", "gla", "deltanet",
                                      "gated_deltanet", "mamba", "mamba2"}  # fmt: skip
        assert all(len(v) >= 2 for k, v in config.mixers.items() if k != "attention")
        # every mixer builds at the config's width and its state sizes grow along the list
        for name, variants in config.mixers.items():
            sizes = [
                mixer_state_size(MIXERS[name](config.d_model, **kw), config.seq_len)
                for kw in variants
            ]
            assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), (name, sizes)


def test_bad_inputs():
    with pytest.raises(ValueError, match="mixer must be one of .* got 'transformer'"):
        TinyLM(VOCAB, D, 1, "transformer")
    with pytest.raises(TypeError, match="mixer must be callable"):
        TinyLM(VOCAB, D, 1, 3)
    with pytest.raises(TypeError, match="mixer_kwargs must be a mapping"):
        TinyLM(VOCAB, D, 1, "attention", mixer_kwargs=[("n_heads", 2)])
    with pytest.raises(ValueError, match="mlp must be one of"):
        TinyLM(VOCAB, D, 1, "attention", mlp="relu")
    with pytest.raises(ValueError, match="n_layers must be a positive int, got 0"):
        TinyLM(VOCAB, D, 0)
    with pytest.raises(ValueError, match="short_conv must be a non-negative int"):
        TinyLM(VOCAB, D, 1, short_conv=-1)
    with pytest.raises(TypeError, match="the mixer factory must return an nn.Module"):
        TinyLM(VOCAB, D, 1, lambda d: "not a module")
    with pytest.raises(ValueError, match=r"A_init_range must be a pair \(low, high\)"):
        TinyLM(VOCAB, D, 1, "gated_deltanet", mixer_kwargs={"A_init_range": (2.0, 1.0)})
    model = _model("attention")
    with pytest.raises(TypeError, match="input_ids must have dtype"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=16\)"):
        model(torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="mixer_state_size does not know Linear"):
        mixer_state_size(nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        mixer_state_size(model, 0)
    data = mqar(16, seq_len=16, n_pairs=3, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train(model, data, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr must be a finite positive number"):
        train(model, data, steps=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="data must hold at least batch_size=64 examples"):
        train(model, data, steps=1, batch_size=64, progress=False)
    with pytest.raises(TypeError, match="data must be an MQARBatch or a callable"):
        train(model, [1, 2, 3], steps=1, progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        train("model", data, steps=1, progress=False)
    with pytest.raises(TypeError, match="eval_data must be an MQARBatch or a pair"):
        train(model, data, steps=1, batch_size=8, eval_data="held", progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        evaluate(None, data)
    with pytest.raises(ValueError, match="data inputs and targets must have the same shape"):
        evaluate(model, (data.inputs, data.targets[:, :-1]))
    with pytest.raises(ValueError, match="config must be one of"):
        recall_experiment("tpu", progress=False)
    with pytest.raises(TypeError, match="overrides must be fields of RecallConfig"):
        recall_experiment("cpu", progress=False, learning_rate=1.0)
    with pytest.raises(ValueError, match="mixers must be names of the config's mixers"):
        recall_experiment("cpu", mixers=["hyena"], progress=False)
    with pytest.raises(TypeError, match="mixers must be a list of names or a mapping"):
        recall_experiment("cpu", mixers="attention", progress=False)
    with pytest.raises(ValueError, match="mixer names must be in"):
        recall_experiment("cpu", mixers={"hyena": [{}]}, progress=False)
