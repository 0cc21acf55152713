"""Chapter 6.1: hybrid models decode with the right cache per layer kind, equal to the full
forward, for the published layouts; the window buffer stays bounded; bad input is named."""

import pytest
import torch

from effarch.attention import KVCache, WindowKVCache
from effarch.models import HYBRIDS, HybridLM, RecurrentState, cache_bytes
from effarch.moe import MoELayer

V, D = 40, 32


def model(name, n_layers, **kw):
    torch.manual_seed(0)
    return HybridLM.preset(name, V, D, n_layers, **kw).double().eval()


def ids(t, seed=0):
    return torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(seed))


def assert_decodes_like_the_full_forward(m, x, prompt):
    """Prefill ``prompt`` tokens, then one token at a time: the logits of the full forward.
    Returns the filled cache."""
    T = x.shape[1]
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(x.shape[0], T)
        parts = [m(x[:, :prompt], cache)] + [m(x[:, t : t + 1], cache) for t in range(prompt, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)
    return cache


CASES = {
    "jamba": dict(n_layers=8, moe_kwargs={"n_experts": 4, "k": 2}),
    "samba": dict(
        n_layers=4, mixers={"M": ("mamba", {}), "S": ("sliding_window", {"window": 5})}
    ),  # fmt: skip
    "minimax": dict(n_layers=8),
    "zamba": dict(n_layers=6),
}


@pytest.mark.parametrize("name", CASES)
def test_decoding_with_per_layer_caches_equals_the_full_forward(name):
    m = model(name, **CASES[name])
    x = ids(13)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 13)
        parts = [m(x[:, :4], cache)]  # a prefill, then a chunk, then one token at a time
        parts.append(m(x[:, 4:7], cache))
        parts += [m(x[:, t : t + 1], cache) for t in range(7, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # and one token at a time from the first
        steps = m.new_cache(2, 13)
        one_by_one = torch.cat([m(x[:, t : t + 1], steps) for t in range(13)], dim=1)
    torch.testing.assert_close(one_by_one, full, rtol=1e-9, atol=1e-9)
    kinds = {type(c) for c in cache}
    letters = set(m.pattern)
    if "A" in letters or (name == "zamba"):
        assert KVCache in kinds
    assert RecurrentState in kinds


def test_layouts_follow_their_configurations():
    jamba = model("jamba", n_layers=16, moe_kwargs={"n_experts": 4, "k": 2})
    attn = [i for i, c in enumerate(jamba.pattern) if c == "A"]
    assert attn == [4, 12]  # attn_layer_offset 4, period 8
    moe = [i for i, b in enumerate(jamba.blocks) if isinstance(b.mlp, MoELayer)]
    assert moe == list(range(1, 16, 2))  # expert_layer_offset 1, period 2
    zamba = model("zamba", n_layers=12)
    shared = [b.mixer for b, c in zip(zamba.blocks, zamba.pattern, strict=True) if c == "S"]
    assert len(shared) == 2 and shared[0] is shared[1]  # one attention block, used twice
    untied = model("zamba", n_layers=12, tied="")
    assert zamba.num_parameters() < untied.num_parameters()


def test_the_window_buffer_holds_at_most_window_minus_one_tokens():
    m = model("samba", **CASES["samba"])
    cache = m.new_cache(2, 64)
    held = []
    with torch.no_grad():
        for t in range(12):
            m(ids(1, seed=t), cache)
            held.append(cache_bytes(cache))
    windows = [i for i, c in enumerate(cache) if isinstance(c, WindowKVCache)]
    per_token = 2 * 2 * m.blocks[windows[0]].mixer.n_kv_heads * m.blocks[windows[0]].mixer.head_dim
    for i in windows:  # keys and values of min(t, w - 1) tokens, float64
        assert [h[i] for h in held] == [min(t + 1, 4) * per_token * 8 for t in range(12)]
        assert cache[i].length == 12
    recurrent = [i for i, c in enumerate(cache) if isinstance(c, RecurrentState)]
    assert all(held[2][i] == held[-1][i] > 0 for i in recurrent)  # constant after the first


def test_bad_input_is_named():
    mixers = {"A": ("attention", {})}
    with pytest.raises(ValueError, match=r"mixers\['B'\]"):
        HybridLM(V, D, "AB", mixers)
    with pytest.raises(ValueError, match="ffn letters"):
        HybridLM(V, D, "A", mixers, ffn="X")
    with pytest.raises(ValueError, match="moe_kwargs"):
        HybridLM(V, D, "A", mixers, ffn="E")
    with pytest.raises(ValueError, match="name must be one of"):
        HybridLM.preset("nope", V, D, 2)
    m = HybridLM(V, D, "A", mixers)
    with pytest.raises(ValueError, match="cache must be this model"):
        m(ids(3), [])
    assert set(HYBRIDS) == {"jamba", "samba", "minimax", "zamba"}


def branches(layer, x):
    a = layer.attn(x)
    m = layer.ssm(x)[0]
    return a, m


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_parallel_hybrid_combines_its_branches_by_the_formula(combine):
    from effarch.models import ParallelHybrid

    torch.manual_seed(0)
    layer = ParallelHybrid(D, 2, window=4, ssm="mamba", combine=combine, attn_multiplier=0.5,
                           ssm_multiplier=2.0).double()  # fmt: skip
    with torch.no_grad():
        for p in layer.parameters():  # move the norms' and betas' weights off their init
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 9, D, dtype=torch.float64)
        y, state = layer(x)
        a, m = branches(layer, x)
    if combine == "sum":  # Falcon-H1: the branches times their output multipliers
        want = 0.5 * a + 2.0 * m
    else:  # Hymba: each branch RMS-normalised, scaled by its beta, averaged
        rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
        want = (layer.beta_attn * rms(a, layer.attn_norm.weight)
                + layer.beta_ssm * rms(m, layer.ssm_norm.weight)) / 2  # fmt: skip
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert state["kv"].k.shape[1] == 3  # the window buffer: window - 1 tokens
    assert layer.state_size(9) == layer.attn.state_size(9) + layer.ssm.state_size(9)
    with pytest.raises(ValueError, match="combine"):
        ParallelHybrid(D, 2, combine="max")
    with pytest.raises(ValueError, match="carries a state"):
        ParallelHybrid(D, 2, ssm="attention")


def test_hymba_style_model_with_meta_tokens_decodes_like_its_full_forward():
    torch.manual_seed(0)
    mixers = {"H": ("parallel_hybrid", {"window": 4, "ssm": "mamba"}),
              "G": ("parallel_hybrid", {"ssm": "mamba"})}  # fmt: skip
    m = HybridLM(V, D, "HGH", mixers, meta_tokens=3).double().eval()
    x = ids(10)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 10)
        steps = torch.cat([m(x[:, :2], cache)] + [m(x[:, t : t + 1], cache)
                                                   for t in range(2, 10)], dim=1)  # fmt: skip
        no_meta = HybridLM(V, D, "HGH", mixers).double().eval()
        no_meta.load_state_dict({k: v for k, v in m.state_dict().items() if k != "meta"})
        plain = no_meta(x)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    assert full.shape == (2, 10, V) and (plain - full).abs().max() > 1e-3  # the prefix matters
    held = cache_bytes(cache)
    assert held[0] < held[1]  # the windowed layer holds less than the global one


def test_yoco_caches_one_layer_and_decodes_like_its_full_forward():
    from effarch.attention import KVCache
    from effarch.models import YOCOLM

    torch.manual_seed(0)
    m = YOCOLM(V, D, 4, n_heads=4, n_kv_heads=2,
               self_mixer=("sliding_window", {"window": 4})).double().eval()  # fmt: skip
    x = ids(11)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 11)
        steps = torch.cat([m(x[:, :3], cache)] + [m(x[:, t : t + 1], cache)
                                                   for t in range(3, 11)], dim=1)  # fmt: skip
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    shared = [c for c in cache if type(c) is KVCache]
    assert len(shared) == 1 and shared[0].length == 11
    with torch.no_grad():  # a chunk into a filled cache, past the window, then single tokens
        chunked = m.new_cache(2, 11)
        parts = [m(x[:, :3], chunked), m(x[:, 3:9], chunked)]
        parts += [m(x[:, t : t + 1], chunked) for t in range(9, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-9)

    # the shared cache: one layer's keys and values; the self-decoder's: 3-token windows
    def per_token(g, dh):  # batch 2, keys and values, float64
        return 2 * 2 * g * dh * 8

    swa = m.self_decoder.blocks[0].mixer
    window = 3 * per_token(swa.n_kv_heads, swa.head_dim)
    assert cache_bytes(cache) == [window, window, 11 * per_token(2, D // 4)]
    # a causal model: a later token does not change earlier logits
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    with torch.no_grad():
        other = m(y)
    torch.testing.assert_close(other[:, :7], full[:, :7], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="n_layers must be even"):
        YOCOLM(V, D, 3, n_heads=4)


def test_decode_memory_grows_only_in_attention_layers():
    from effarch.models import decode_memory

    torch.manual_seed(0)
    m = HybridLM.preset("jamba", V, D, 8, moe_kwargs={"n_experts": 4, "k": 2}).eval()
    got = decode_memory(m, [4, 16, 40])
    attn = m.blocks[m.pattern.index("A")].mixer
    for t, layers in zip(got["context"], got["per_layer"], strict=True):
        for letter, held in zip(m.pattern, layers, strict=True):
            if letter == "A":  # keys and values of every token, float32
                assert held == t * 2 * attn.n_kv_heads * attn.head_dim * 4
            else:  # Mamba: the SSM state and the convolution's last d_conv - 1 inputs
                mixer = m.blocks[m.pattern.index("M")].mixer
                assert held == (mixer.d_inner * mixer.d_state
                                + (mixer.d_conv - 1) * mixer.d_inner) * 4  # fmt: skip
    assert got["total"] == [sum(layers) for layers in got["per_layer"]]
    with pytest.raises(ValueError, match="increasing"):
        decode_memory(m, [8, 4])


def test_hybrid_recall_experiment_command_line(tmp_path):
    import json

    from effarch.experiments.__main__ import main as experiments_main
    from effarch.experiments.hybrid_recall import CONFIG

    out = tmp_path / "recall.json"
    experiments_main(["hybrid-recall", "--steps", "2", "--runs", "1/8 attention",
                      "Mamba + window 8", "--seeds", "3", "--out", str(out)])  # fmt: skip
    recs = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    one, swa = recs["1/8 attention"], recs["Mamba + window 8"]
    assert one["attention_fraction"] == 1 / 8 and swa["window"] == 8
    assert one["seed"] == swa["seed"] == 3
    for r in (one, swa):  # every learning rate tried; the lower final training loss kept
        assert set(r["final_loss_by_lr"]) == {str(lr) for lr in CONFIG["lrs"]}
        assert r["final_loss"] == min(r["final_loss_by_lr"].values())
        assert r["final_loss_by_lr"][str(r["lr"])] == r["final_loss"]
    assert 0 <= one["accuracy"] <= 1
    d, t = CONFIG["d_model"], CONFIG["seq_len"]
    dh = CONFIG["n_heads"] * CONFIG["head_dim"]
    # memory at the task's length: one attention layer's keys and values (2 T H dh) and seven
    # Mamba states (2 d x d_state each); the windowed model: four windows of 8 instead
    mamba = 2 * d * CONFIG["d_state"]
    assert one["state_numbers"] == 2 * t * dh + 7 * mamba
    assert swa["state_numbers"] == 4 * 2 * 8 * dh + 4 * mamba


def test_hybrid_recall_runs_have_matched_parameters():
    from effarch.experiments.hybrid_recall import RUNS, run_model

    counts = {name: run_model(name).num_parameters() for name in RUNS}
    lo, hi = min(counts.values()), max(counts.values())
    assert hi - lo <= 0.003 * hi, counts  # every layout within 0.3%
    pure = run_model("8/8 attention")
    assert all(b.conv is not None and b.conv.kernel_size == 2 for b in pure.blocks)
    with pytest.raises(ValueError, match="name must be one of"):
        run_model("9/8 attention")


def test_window_linear_mixer_decodes_like_its_full_forward_in_bounded_memory():
    """The sequence-wise hybrid as a mixer: decoding continues its state; the bytes held are
    its ``state_size``: a window and a linear memory, constant once ``T >= w``."""
    from effarch.models import decode_memory

    torch.manual_seed(0)
    mixers = {"W": ("linearized", {"window": 4, "n_heads": 4, "n_kv_heads": 2}),
              "M": ("mamba", {})}  # fmt: skip
    m = HybridLM(V, D, "WM", mixers).double().eval()
    x = ids(12)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 12)
        steps = torch.cat([m(x[:, :5], cache)] + [m(x[:, t : t + 1], cache)
                                                   for t in range(5, 12)], dim=1)  # fmt: skip
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    layer = m.blocks[0].mixer
    got = decode_memory(m.float(), [2, 4, 9, 30])
    assert [held[0] for held in got["per_layer"]] == [
        layer.state_size(t) * 4 for t in got["context"]
    ]
    assert got["per_layer"][-1] == got["per_layer"][-2]  # past the window: constant


def test_decode_step_time_keeps_the_best_of_interleaved_rounds(monkeypatch):
    """A fake clock: every timed run lasts a known time; the result is, per model and
    context, the smallest over the rounds of (run time / steps), and the runs visit the
    contexts and models in turn within each round, each from a cache holding T tokens, on
    the threads asked for (the untimed prefill and warm-up step on PyTorch's own setting)."""
    import time

    from effarch.models import decode_step_time

    torch.manual_seed(0)
    models = {name: HybridLM(V, D, "A", {"A": ("attention", {})}).eval() for name in "ab"}
    seen, prefill_threads = [], set()  # (model, cache length) at each single-token step
    for name, model in models.items():
        forward = model.forward

        def spy(input_ids, cache=None, _name=name, _forward=forward):
            if cache is not None and input_ids.shape[1] == 1:
                seen.append((_name, cache[0].length, torch.get_num_threads()))
            else:
                prefill_threads.add(torch.get_num_threads())
            return _forward(input_ids, cache)

        monkeypatch.setattr(model, "forward", spy)
    # run k (0-based, in visiting order) lasts 10 + (k * 7) % 5 seconds
    runs = iter(range(100))
    ticks = []

    def clock():
        if not ticks:  # the start of a run: queue its end
            k = next(runs)
            ticks.extend([0.0, 10.0 + (k * 7) % 5])
        return ticks.pop(0)

    monkeypatch.setattr(time, "perf_counter", clock)
    threads = torch.get_num_threads()
    got = decode_step_time(models, [3, 6], steps=2, repeats=3, chunk=4, threads=1)
    order = [(t, name) for _ in range(3) for t in (3, 6) for name in "ab"]  # rounds, T, model
    want = {name: [min(10.0 + (k * 7) % 5 for k, (tk, nk) in enumerate(order)
                       if (tk, nk) == (t, name)) / 2 for t in (3, 6)]
            for name in "ab"}  # fmt: skip
    assert got == {"context": [3, 6], **want}
    # each run: from a copy of the cache filled to T, one untimed token on PyTorch's threads,
    # then two timed ones on one thread
    assert seen == [(n, t + s, 1 if s else threads) for t, n in order for s in (0, 1, 2)]
    assert prefill_threads == {threads} == {torch.get_num_threads()}  # restored
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_step_time(models, [6, 3])
    with pytest.raises(ValueError, match="non-empty mapping"):
        decode_step_time({}, [3])
    with pytest.raises(ValueError, match="'context'"):
        decode_step_time({"context": models["a"]}, [3])


@pytest.mark.parametrize("name", [*CASES, "yoco", "samba+conv", "ttt"])
def test_a_cache_of_one_sequence_with_its_rows_repeated_decodes_like_a_batch_prefill(name):
    """decode_step_time fills one row and repeats it: every tensor of every kind of cache
    (KV, window, recurrent states, short convolutions, YOCO's shared cache) must follow."""
    import copy

    from effarch.models import YOCOLM
    from effarch.models.hybrid import _repeat_rows

    if name == "yoco":
        torch.manual_seed(0)
        m = YOCOLM(V, D, 4, n_heads=2, n_kv_heads=2,
                   self_mixer=("sliding_window", {"window": 4})).double().eval()  # fmt: skip
    elif name == "samba+conv":
        m = model("samba", **CASES["samba"], short_conv=3)
    elif name == "ttt":  # its state holds a 0-dim position counter every row shares
        torch.manual_seed(0)
        m = HybridLM(V, D, "A", {"A": ("ttt_linear", {})}, n_layers=2).double().eval()
    else:
        m = model(name, **CASES[name])
    prompt, new = (
        ids(9)[:1],
        torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(1)),
    )
    with torch.no_grad():
        one = m.new_cache(1, 13)
        m(prompt, one)
        repeated = _repeat_rows(copy.deepcopy(one), 3)
        batch = m.new_cache(3, 13)
        m(prompt.repeat(3, 1), batch)
        for s in range(4):
            a, b = m(new[:, s : s + 1], repeated), m(new[:, s : s + 1], batch)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert cache_bytes(repeated) == cache_bytes(batch)
    with pytest.raises(ValueError, match="1 row"):
        _repeat_rows(batch, 2)


@pytest.mark.parametrize("name", ["minimax", "samba", "zamba"])
def test_short_convolution_before_mixers_without_one_decodes_like_the_full_forward(name):
    m = model(name, **CASES[name], short_conv=4)
    with_conv = [b.conv is not None for b in m.blocks]
    # only the mixers that do not mix neighbours already get one (Mamba has its own)
    assert with_conv == [c in "ALS" for c in m.pattern], (m.pattern, with_conv)
    x = ids(11)
    cache = assert_decodes_like_the_full_forward(m, x, prompt=5)
    # each convolution keeps its last W - 1 = 3 inputs of width D, counted with its layer
    plain = model(name, **CASES[name])
    with torch.no_grad():
        plain_cache = plain.new_cache(2, 11)
        plain(x, plain_cache)
    extra = [a - b for a, b in zip(cache_bytes(cache), cache_bytes(plain_cache), strict=True)]
    assert extra == [3 * D * 2 * 8 if c else 0 for c in with_conv]


def test_short_convolution_is_a_causal_depthwise_filter_of_the_normalised_input():
    torch.manual_seed(0)
    m = HybridLM(V, D, "A", {"A": ("attention", {})}, short_conv=3).double().eval()
    block = m.blocks[0]
    u = torch.randn(2, 7, D, dtype=torch.float64)
    w = block.conv.conv.weight[:, 0]  # [D, 3]
    want = torch.zeros_like(u)
    for t in range(7):  # y_t = sum_i w[i] u_{t-2+i}, zero before the start
        for i in range(3):
            if t - 2 + i >= 0:
                want[:, t] += w[:, i] * u[:, t - 2 + i]
    got, kept = block.conv(u)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kept, u[:, -2:])
    with pytest.raises(ValueError, match="short_conv must be a non-negative int, got -1"):
        HybridLM(V, D, "A", {"A": ("attention", {})}, short_conv=-1)


def test_mla_layers_decode_from_their_latent_cache_like_the_full_forward():
    torch.manual_seed(0)
    mixers = {"L": ("mla", {"n_heads": 2}), "M": ("mamba", {})}
    m = HybridLM(V, D, "MLML", mixers, short_conv=2).double().eval()
    cache = assert_decodes_like_the_full_forward(m, ids(9), prompt=3)
    # an MLA layer holds T (d_c + d_r) numbers per sequence: d/2 + d_h/2 per token
    mla = m.blocks[1].mixer
    assert isinstance(cache[1], KVCache) and cache[1].length == 9
    assert m.state_sizes(9)[1] == 9 * (mla.d_c + mla.d_r) == 9 * (D // 2 + D // 4)


def test_parallel_hybrid_from_a_falcon_h1_config():
    transformers = pytest.importorskip("transformers")
    from effarch.models import ParallelHybrid

    cfg = transformers.FalconH1Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=8, attention_out_multiplier=0.5, ssm_out_multiplier=0.25,
    )  # fmt: skip
    layer = ParallelHybrid.from_falcon_h1(cfg)
    # the shapes transformers' Falcon-H1 layer builds from the same config
    assert (layer.attn.n_heads, layer.attn.n_kv_heads, layer.attn.head_dim) == (4, 2, 8)
    assert (layer.ssm.nheads, layer.ssm.headdim, layer.ssm.d_inner, layer.ssm.d_state) == (
        cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_ssm, cfg.mamba_d_state)  # fmt: skip
    assert (layer.combine, layer.attn_multiplier, layer.ssm_multiplier) == ("sum", 0.5, 0.25)
    # rms_norm_eps reaches the one RMSNorm of the layer: the Mamba-2 branch's gated norm,
    # which transformers builds with eps=config.rms_norm_eps
    cfg.rms_norm_eps = 0.125
    assert ParallelHybrid.from_falcon_h1(cfg).ssm.norm.eps == 0.125
    cfg.head_dim = 16  # set apart from hidden_size / heads, as released checkpoints do
    with pytest.raises(ValueError, match="head_dim 16 x 4 heads must be hidden_size 32"):
        ParallelHybrid.from_falcon_h1(cfg)
    cfg.head_dim, cfg.mamba_d_ssm = None, 48
    with pytest.raises(ValueError, match="mamba_d_ssm 48 must be None or mamba_expand"):
        ParallelHybrid.from_falcon_h1(cfg)
    cfg.mamba_d_ssm = 64
    for field in ("attention_bias", "projectors_bias", "mamba_proj_bias"):  # no biases here
        setattr(cfg, field, True)
        with pytest.raises(ValueError, match=f"no biases; the configuration sets {field}=True"):
            ParallelHybrid.from_falcon_h1(cfg)
        setattr(cfg, field, False)
    ParallelHybrid.from_falcon_h1(cfg)


def test_from_falcon_h1_reads_the_rope_base_and_a_mamba_d_ssm_of_none():
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from effarch.models import ParallelHybrid

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4,
              mamba_d_state=8)  # fmt: skip
    # mamba_d_ssm=None means mamba_expand * hidden_size in FalconH1Config
    cfg = transformers.FalconH1Config(mamba_d_ssm=None, **kw)
    layer = ParallelHybrid.from_falcon_h1(cfg)
    assert layer.ssm.d_inner == cfg.mamba_expand * cfg.hidden_size == 64
    assert layer.attn.rope_base == cfg.rope_parameters["rope_theta"] == 10000.0
    # the RoPE base of the configuration reaches the attention branch
    cfg = transformers.FalconH1Config(mamba_d_ssm=64, rope_theta=1e6, **kw)
    assert cfg.rope_parameters["rope_theta"] == 1e6
    assert ParallelHybrid.from_falcon_h1(cfg).attn.rope_base == 1e6
    # an older configuration with a top-level rope_theta
    old = SimpleNamespace(**{k: getattr(cfg, k) for k in vars(cfg) if k != "rope_parameters"})
    old.rope_parameters, old.rope_theta = None, 5e5
    assert ParallelHybrid.from_falcon_h1(old).attn.rope_base == 5e5
    # and the window branch takes it too
    swa = ParallelHybrid(32, 4, 2, window=4, rope_base=123.0)
    assert swa.attn.rope_base == 123.0
    with pytest.raises(ValueError, match="rope_base"):
        ParallelHybrid(32, 4, rope_base=0.0)


def test_mamba2_headdim_default_is_the_largest_power_of_two_divisor_up_to_32():
    from effarch.models import MIXERS

    # expand d = 48: 16 (gcd with 32), not the largest divisor up to 32 (24)
    assert MIXERS["mamba2"](24).headdim == 16
    assert MIXERS["mamba2"](64).headdim == 32


def test_presets_need_a_multiple_of_their_period():
    for name, bad in [("jamba", 4), ("jamba", 12), ("samba", 3), ("minimax", 4), ("zamba", 8)]:
        kw = {"moe_kwargs": {"n_experts": 4, "k": 2}} if name == "jamba" else {}
        with pytest.raises(ValueError, match=rf"n_layers must be a positive multiple .*{name}"):
            HybridLM.preset(name, V, D, bad, **kw)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        HybridLM.preset("samba", V, D, 0)
    m = HybridLM.preset("jamba", V, D, 16, moe_kwargs={"n_experts": 4, "k": 2})
    assert m.pattern == "MMMMAMMM" * 2
    assert HybridLM.preset("samba", V, D, 6).pattern == "MSMSMS"


def test_n_layers_below_the_pattern_length_raises_and_a_partial_period_is_kept():
    mixers = {"A": ("attention", {}), "M": ("mamba", {})}
    with pytest.raises(ValueError, match=r"n_layers must be at least the length of pattern \(8"):
        HybridLM(V, D, "MMMMAMMM", mixers, n_layers=4)
    with pytest.raises(ValueError, match=r"n_layers must be at least the length of ffn \(2"):
        HybridLM(V, D, "A", mixers, ffn="DE", moe_kwargs={"n_experts": 2, "k": 1})
    # the documented repetition, cut to n_layers, stays
    m = HybridLM(V, D, "MA", mixers, n_layers=3, ffn="D-")
    assert (m.pattern, m.ffn_pattern) == ("MAM", "D-D")


def test_published_layouts_match_their_transformers_configurations():
    transformers = pytest.importorskip("transformers")

    # Jamba: attention where i % attn_layer_period == attn_layer_offset, experts where
    # i % expert_layer_period == expert_layer_offset (the defaults, 8/4 and 2/1)
    cfg = transformers.JambaConfig(num_hidden_layers=16, num_experts=4)
    jamba = HYBRIDS["jamba"]
    kinds = {"A": "attention", "M": "mamba"}
    assert [kinds[c] for c in jamba["pattern"] * 2] == cfg.layers_block_type
    assert [4 if c == "E" else 1 for c in jamba["ffn"] * 8] == cfg.layers_num_experts
    # Zamba2: the shared block every sixth layer, the period of "MMMMMS"; its default
    # 54 layers start one Mamba layer later (6, 12, ..., 42) and close up near the top
    ids = transformers.Zamba2Config().hybrid_layer_ids
    assert ids[:7] == [6, 12, 18, 24, 30, 36, 42] and len(HYBRIDS["zamba"]["pattern"]) == 6
    # Zamba: after three fixed layers, hybrid where i % 6 == 4 (i counted after them)
    z = transformers.ZambaConfig(num_hidden_layers=21)
    assert [i for i, t in enumerate(z.layers_block_type) if t == "hybrid"] == [2, 7, 13, 19]
