"""The transformer cost model against FlopCounterMode, and the survey's data (its state
table checked against the layers' own ``state_size``)."""

import pytest
import torch

from effarch.attention import MultiHeadAttention, MultiHeadLatentAttention
from effarch.bench import measure_flops, peak_memory
from effarch.linear import LinearAttention
from effarch.models import (
    LLAMA2_7B,
    MISTRAL_7B,
    SlidingWindowAttention,
    TransformerBlock,
    TransformerConfig,
    attention_crossover,
    attention_share,
    block_flops,
    block_memory,
)
from effarch.ssm import Mamba
from effarch.survey import FAMILIES, STATE_TABLE_MIXERS, mixer_state_elements


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("gated", [True, False])
def test_block_flops_equal_flop_counter(kv_heads, gated):
    cfg = TransformerConfig(
        d_model=64, n_heads=4, n_layers=1, d_ff=96, n_kv_heads=kv_heads, gated_ffn=gated
    )
    block = TransformerBlock(cfg)
    x = torch.randn(3, 40, 64)
    measured = measure_flops(lambda: block(x)).total
    assert measured == sum(block_flops(cfg, 40, batch=3, causal=False).values())


def test_block_params_match_the_module():
    cfg = TransformerConfig(d_model=64, n_heads=4, n_layers=1, d_ff=96, n_kv_heads=2)
    block = TransformerBlock(cfg)
    linear = sum(p.numel() for n, p in block.named_parameters() if "norm" not in n)
    assert linear == cfg.block_params()


def test_llama2_7b_parameter_count():
    params = LLAMA2_7B.n_layers * LLAMA2_7B.block_params() + 2 * 32000 * 4096
    assert 6.7e9 < params < 6.8e9  # the published 6.74B


def test_decode_flops_grow_with_context_only_in_attention():
    short = block_flops(MISTRAL_7B, 1, context=1000)
    long = block_flops(MISTRAL_7B, 1, context=2000)
    assert {k for k in short if short[k] != long[k]} == {"attention"}
    # one token attends to L+1 keys: 2 * H * (L+1) * 2 * dh
    assert long["attention"] == 2 * 32 * 2001 * 2 * 128


def test_block_memory_components():
    mem = block_memory(LLAMA2_7B, 1, context=4095, bytes_per_element=2)
    assert mem["kv_cache"] == 2 * 4096 * 32 * 128 * 2
    assert mem["weights"] == LLAMA2_7B.block_params() * 2
    assert mem["scores"] == 32 * 4096 * 2


def test_naive_block_memory_is_dominated_by_scores():
    cfg = TransformerConfig(d_model=32, n_heads=8, n_layers=1, d_ff=64)
    block = TransformerBlock(cfg)
    x = torch.randn(1, 512, 32)
    with torch.no_grad():
        peak = peak_memory(lambda: block(x)).peak
    scores = block_memory(cfg, 512, bytes_per_element=4)["scores"]
    assert scores <= peak <= 6 * scores


def test_transformer_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TransformerConfig(d_model=30, n_heads=4, n_layers=1, d_ff=8)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        TransformerConfig(d_model=32, n_heads=4, n_layers=1, d_ff=8, n_kv_heads=3)
    with pytest.raises(TypeError, match="cfg must be a TransformerConfig"):
        TransformerBlock({"d_model": 4})
    block = TransformerBlock(TransformerConfig(d_model=16, n_heads=2, n_layers=1, d_ff=8))
    with pytest.raises(ValueError, match="d_model=16"):
        block(torch.randn(1, 4, 8))


def test_families_cover_survey_sections_2_to_8():
    assert [f.section for f in FAMILIES] == list(range(2, 9))
    assert len({f.chapter for f in FAMILIES}) == 7


def test_mixer_states():
    d = 4096
    assert mixer_state_elements("mha", 10, d_model=d) == 2 * 10 * d
    for bounded in ("sliding_window", "linear_attention", "mamba"):
        assert mixer_state_elements(bounded, 10**6) == mixer_state_elements(bounded, 10**7)
    for growing in ("mha", "gqa", "mla", "hybrid"):
        assert mixer_state_elements(growing, 2000) > mixer_state_elements(growing, 1000)
    # the MHA state is exactly the per-layer KV cache
    assert 2 * mixer_state_elements("mha", 4096) == 2 * 4096 * 32 * 128 * 2
    assert set(STATE_TABLE_MIXERS) == {
        "mha",
        "gqa",
        "mla",
        "sliding_window",
        "linear_attention",
        "mamba",
        "hybrid",
    }
    with pytest.raises(ValueError, match="mixer must be one of"):
        mixer_state_elements("rnn", 1)
    with pytest.raises(ValueError, match="context"):
        mixer_state_elements("mha", -1)


def test_survey_table_agrees_with_the_layers():
    """The survey's analytic formulas give what the layers themselves report, at a small
    size (the table's default is an LLM's width)."""
    d, h, g = 64, 4, 2
    sizes = dict(d_model=d, n_heads=h, n_kv_heads=g, kv_lora_rank=16, rope_head_dim=8,
                 window=8, d_state=4, expand=2)  # fmt: skip
    layers = {
        "mha": MultiHeadAttention(d, h),
        "gqa": MultiHeadAttention(d, h, g),
        "mla": MultiHeadLatentAttention(d, h, kv_lora_rank=16, qk_rope_head_dim=8),
        "sliding_window": SlidingWindowAttention(d, h, window=8),
        "linear_attention": LinearAttention(d, h, normalize=False),
        "mamba": Mamba(d, d_state=4, expand=2),
    }
    for context in (1, 8, 100):
        for name, layer in layers.items():
            assert mixer_state_elements(name, context, **sizes) == layer.state_size(context), name


def test_attention_crossover():
    t = attention_crossover(LLAMA2_7B)
    assert attention_share(LLAMA2_7B, t) > 0.5 >= attention_share(LLAMA2_7B, t - 1)
    # causal attention costs about 2 d T per token against 2 x (block weights) for the rest
    assert t == pytest.approx(LLAMA2_7B.block_params() / LLAMA2_7B.d_model, rel=0.01)
    assert attention_crossover(MISTRAL_7B) > t  # a wider FFN pushes the crossover out
