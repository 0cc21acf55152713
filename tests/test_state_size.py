"""Every token-mixing layer's ``state_size(seq_len)`` against the memory it really keeps.

The recurrent layers return their state after a forward pass: its elements are counted here
(per sequence, complex numbers as two reals, a tensor held twice counted once), leaving out
what the docstrings say is not memory of the context -- convolution caches (the last few
inputs), the token shift (the last input) and integer position counters. Attention layers
keep a KV cache: its filled part is counted after ``T`` tokens. Sliding-window attention is
checked by corrupting the cache beyond the window: the next tokens must not notice. The
per-head analytic data of the unified registry (``UpdateRule.state_elements``) must agree with
the layers it describes.
"""

import pytest
import torch

from effarch.attention import KVCache, MultiHeadAttention, project_qkv
from effarch.attention.mla import MultiHeadLatentAttention
from effarch.linear import LinearizedAttention, linear_attention
from effarch.linear.layers import (
    GLA,
    HGRN,
    RWKV7,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    RetNet,
    TTTLinear,
)
from effarch.models import SlidingWindowAttention
from effarch.ssm.layers import S4D, Mamba, Mamba2
from effarch.unified import RULES

D_MODEL, BATCH = 32, 2
F64 = torch.float64

RECURRENT = {
    "linear_attention": lambda: LinearAttention(D_MODEL, 4, chunk_size=4),
    "linear_attention_unnormalised": lambda: LinearAttention(
        D_MODEL, 2, "relu", normalize=False, chunk_size=4
    ),
    "retnet": lambda: RetNet(D_MODEL, 4, chunk_size=4),
    "gla": lambda: GLA(D_MODEL, 2, expand_k=1.0, expand_v=2.0, chunk_size=4),
    "deltanet": lambda: DeltaNet(D_MODEL, 4, chunk_size=4),
    "gated_deltanet": lambda: GatedDeltaNet(D_MODEL, 2, expand_v=2, chunk_size=4),
    "hgrn": lambda: HGRN(D_MODEL, expand_ratio=2),
    "rwkv7": lambda: RWKV7(D_MODEL, 4, chunk_size=4),
    "ttt_linear": lambda: TTTLinear(D_MODEL, 4, mini_batch_size=4),
    "ttt_linear_m1": lambda: TTTLinear(D_MODEL, 2, mini_batch_size=1),
    "mamba": lambda: Mamba(D_MODEL, d_state=8, expand=2),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=8, headdim=16, ngroups=2, chunk_size=4),
    "s4d": lambda: S4D(D_MODEL, d_state=8),
}

NOT_MEMORY = ("conv", "shift")  # key prefixes: convolution caches and the token shift


def _memory_elements(state: dict, batch: int) -> int:
    """Elements of one sequence's memory in a layer's state dict."""
    seen, total = set(), 0
    for key, value in state.items():
        if key.startswith(NOT_MEMORY) or not isinstance(value, torch.Tensor):
            continue  # a cache of the last inputs, or a position counter (an int)
        if not (value.is_floating_point() or value.is_complex()):
            continue  # a position counter as a tensor
        if id(value) in seen:
            continue  # the same tensor under two names (TTT's anchor with m = 1)
        seen.add(id(value))
        total += value.numel() * (2 if value.is_complex() else 1)
    assert total % batch == 0
    return total // batch


@pytest.mark.parametrize("name", RECURRENT)
@pytest.mark.parametrize("seq_len", [1, 6, 13])
def test_recurrent_state_size_is_the_state_it_returns(name, seq_len):
    torch.manual_seed(0)
    layer = RECURRENT[name]()
    x = torch.randn(BATCH, seq_len, D_MODEL)
    with torch.no_grad():
        _, state = layer(x)
        assert layer.state_size(seq_len) == _memory_elements(state, BATCH)
        # the state does not grow: one more token, the same count
        _, state = layer(x[:, :1], state)
    assert layer.state_size(seq_len + 1) == _memory_elements(state, BATCH)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seq_len", [1, 9])
def test_attention_state_size_is_the_filled_kv_cache(n_kv_heads, seq_len):
    layer = MultiHeadAttention(D_MODEL, 4, n_kv_heads)
    cache = layer.new_cache(BATCH, 16)
    with torch.no_grad():
        layer(torch.randn(BATCH, seq_len, D_MODEL), cache)
    filled = cache.k[:, : cache.length].numel() + cache.v[:, : cache.length].numel()
    assert cache.length == seq_len
    assert layer.state_size(seq_len) == filled // BATCH


@pytest.mark.parametrize("seq_len", [1, 9])
def test_mla_state_size_is_the_filled_latent_cache(seq_len):
    layer = MultiHeadLatentAttention(
        D_MODEL, 4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    )
    cache = layer.new_cache(BATCH, 16)
    with torch.no_grad():
        layer(torch.randn(BATCH, seq_len, D_MODEL), cache)
    filled = cache.k[:, : cache.length].numel() + cache.v[:, : cache.length].numel()
    assert layer.state_size(seq_len) == filled // BATCH


@pytest.mark.parametrize("seq_len", [3, 13])
def test_sliding_window_reads_only_the_last_window_of_its_cache(seq_len):
    """Entries older than the last ``w`` tokens are never read again (corrupting them changes
    no later output); the last ``min(T, w)`` entries are the state."""
    w = 4
    torch.manual_seed(0)
    layer = SlidingWindowAttention(D_MODEL, 4, 2, window=w).double()
    x = torch.randn(BATCH, seq_len + 3, D_MODEL, dtype=F64)

    def full_cache(max_len: int) -> KVCache:  # every token kept, to show which are read
        return KVCache(BATCH, max_len, layer.n_kv_heads, layer.head_dim, dtype=F64)

    def decode(corrupt: slice | None) -> torch.Tensor:
        cache = full_cache(seq_len + 3)
        layer(x[:, :seq_len], cache)
        if corrupt is not None:
            cache.k[:, corrupt] = 1e3 * torch.randn_like(cache.k[:, corrupt])
            cache.v[:, corrupt] = 1e3 * torch.randn_like(cache.v[:, corrupt])
        return torch.cat([layer(x[:, t : t + 1], cache) for t in range(seq_len, seq_len + 3)], 1)

    with torch.no_grad():
        clean = decode(None)
        old = slice(0, max(0, seq_len - w))
        torch.testing.assert_close(decode(old), clean, rtol=0, atol=0)
        assert not torch.allclose(decode(slice(seq_len - 1, seq_len)), clean)  # inside: read
        cache = full_cache(seq_len)
        layer(x[:, :seq_len], cache)
        # the layer's own cache, a rolling buffer, keeps only the last w - 1 of them and
        # decodes the same
        buffer = layer.new_cache(BATCH, seq_len + 3)
        layer(x[:, :seq_len], buffer)
        torch.testing.assert_close(buffer.k, cache.k[:, max(0, seq_len - (w - 1)) : seq_len])
        steps = [layer(x[:, t : t + 1], buffer) for t in range(seq_len, seq_len + 3)]
        torch.testing.assert_close(torch.cat(steps, 1), clean, rtol=1e-12, atol=1e-12)
    kept = slice(max(0, seq_len - w), seq_len)
    elements = cache.k[:, kept].numel() + cache.v[:, kept].numel()
    assert layer.state_size(seq_len) == elements // BATCH


@pytest.mark.parametrize(
    ("feature_map", "feature_dim", "window"),
    [("hedgehog", 6, None), ("hedgehog", 6, 4), ("elu", None, None), ("performer", 12, 4)],
)
@pytest.mark.parametrize("seq_len", [3, 11])
def test_linearized_state_size_is_its_linear_state_and_window(
    feature_map, feature_dim, window, seq_len
):
    """The linear state ``(S, z)`` per key/value head, from the op run on the layer's own
    features, plus the keys and values of the window."""
    attention = MultiHeadAttention(D_MODEL, 4, 2)
    layer = LinearizedAttention.from_attention(attention, feature_map, feature_dim, window)
    x = torch.randn(BATCH, seq_len, D_MODEL)
    with torch.no_grad():
        _, k, v = project_qkv(layer, x)  # [B, T, G, D]: one state per key/value head
        fk = layer.phi_k(k)
        _, (s, z) = linear_attention(fk, fk, v, normalize=True, output_final_state=True)
    elements = s.numel() + z.numel()
    if window is not None:
        recent = slice(max(0, seq_len - window), seq_len)
        elements += k[:, recent].numel() + v[:, recent].numel()
    assert layer.state_size(seq_len) == elements // BATCH


# --------------------------------------------------------------------------------------------
# One formula per layer: the registry's per-head data agrees with the layers
# --------------------------------------------------------------------------------------------


def _heads(layer) -> tuple[int, int, int]:
    """``(heads, d_k, d_v)`` of a layer, read from the shape of its state after one token:
    ``S [B, H, K, V]``, or Mamba-2's ``ssm [B, H, P, N]`` (keys ``B_t`` of size ``N``)."""
    _, state = layer(torch.randn(1, 1, D_MODEL))
    if "S" in state:
        _, h, dk, dv = state["S"].shape
    else:
        _, h, dv, dk = state["ssm"].shape
    return h, dk, dv


@pytest.mark.parametrize(
    ("rule", "make"),
    [
        ("linear_attention", lambda: LinearAttention(D_MODEL, 4, normalize=False)),
        ("retnet", lambda: RetNet(D_MODEL, 4)),
        ("gla", lambda: GLA(D_MODEL, 2)),
        ("deltanet", lambda: DeltaNet(D_MODEL, 4)),
        ("gated_deltanet", lambda: GatedDeltaNet(D_MODEL, 2)),
        ("rwkv7", lambda: RWKV7(D_MODEL, 4)),
        ("ttt_linear", lambda: TTTLinear(D_MODEL, 4)),  # the registry's mini-batch of 16
        ("mamba2", lambda: Mamba2(D_MODEL, d_state=8, headdim=16)),
    ],
)
def test_registry_state_per_head_times_heads_is_the_layer_state(rule, make):
    layer = make()
    with torch.no_grad():
        h, dk, dv = _heads(layer)
    for t in (1, 100):
        assert h * RULES[rule].state_elements(dk, dv, t) == layer.state_size(t)


def test_ttt_memory_is_s_and_the_anchor_of_its_mini_batch():
    """With mini-batches the memory is ``S`` and the anchor the mini-batch's gradients are
    taken at (the registry counts both); with one token per step the anchor is ``S``."""
    per_head = RULES["ttt_linear"].state_elements(8, 8, 10)
    assert per_head == 2 * 8 * 8
    for m, matrices in ((4, 2), (16, 2), (1, 1)):
        layer = TTTLinear(D_MODEL, 4, mini_batch_size=m)
        assert layer.state_size(10) == matrices * layer.n_heads * layer.head_dim**2


def test_registry_softmax_rows_are_the_attention_caches():
    window = RULES["sliding_window"]
    assert window.name == "Sliding window (w=64)"
    mha = MultiHeadAttention(D_MODEL, 4, 2)
    swa = SlidingWindowAttention(D_MODEL, 4, 2, window=64)
    dh, g = mha.head_dim, mha.n_kv_heads
    for t in (1, 64, 320):
        assert g * RULES["softmax_attention"].state_elements(dh, dh, t) == mha.state_size(t)
        assert g * window.state_elements(dh, dh, t) == swa.state_size(t)


def test_state_size_rejects_a_bad_seq_len():
    for layer in (
        *(make() for make in RECURRENT.values()),
        MultiHeadAttention(D_MODEL, 4),
        SlidingWindowAttention(D_MODEL, 4, window=4),
        LinearizedAttention(D_MODEL, 4),
    ):
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            layer.state_size(0)
