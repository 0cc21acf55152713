"""Chapter 5.3: upcycling is exact at initialisation, splitting an FFN is exact with every
expert, and clustering neurons by co-activation recovers planted groups."""

import pytest
import torch

from effarch.moe import MoELayer, moefied_ffn, neuron_groups, split_ffn, upcycle
from effarch.nn import SwiGLU

D, F_ = 16, 32


def dense(seed=0):
    torch.manual_seed(seed)
    return SwiGLU(D, F_).double()


def test_upcycled_moe_equals_the_dense_ffn_until_its_copies_differ():
    ffn = dense()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    moe = upcycle(ffn, n_experts=4, k=2)
    torch.testing.assert_close(moe(x), ffn(x), rtol=1e-12, atol=1e-12)
    assert moe.experts.gate_up_proj.shape == (4, 2 * F_, D)
    noisy = upcycle(ffn, n_experts=4, k=2, noise=0.1)
    assert (noisy(x) - ffn(x)).abs().max() > 1e-4
    with pytest.raises(TypeError, match="SwiGLU"):
        upcycle(torch.nn.Linear(D, D), 4, 2)


@pytest.mark.parametrize("method", ["random", "cluster"])
def test_the_split_ffn_sums_to_the_dense_one(method):
    ffn = dense(1)
    x = torch.randn(50, D, dtype=torch.float64)
    with torch.no_grad():
        acts = torch.nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x)
    groups = neuron_groups(4, F_, method=method, activations=acts)
    assert sorted(groups.flatten().tolist()) == list(range(F_)) and groups.shape == (4, 8)
    gate_up, down = split_ffn(ffn, groups)
    y, chosen = moefied_ffn(x, gate_up, down, k=4)
    torch.testing.assert_close(y, ffn(x), rtol=1e-10, atol=1e-10)
    y1, _ = moefied_ffn(x, gate_up, down, k=1)
    assert (y1 - ffn(x)).abs().max() > 1e-6


def test_clustering_recovers_neurons_that_fire_together():
    # 4 planted groups of 8 neurons; each token activates one group only
    gen = torch.Generator().manual_seed(2)
    token_group = torch.randint(0, 4, (400,), generator=gen)
    owner = torch.randperm(F_, generator=gen) % 4  # neuron -> its planted group
    acts = 0.01 * torch.randn(400, F_, generator=gen)
    acts += (owner[None] == token_group[:, None]).float() * (1 + torch.rand(400, F_, generator=gen))
    groups = neuron_groups(4, F_, method="cluster", activations=acts)
    for g in groups:
        assert len(set(owner[g].tolist())) == 1  # each group is one planted group
    random_groups = neuron_groups(4, F_, method="random")
    assert any(len(set(owner[g].tolist())) > 1 for g in random_groups)


def test_bad_conversion_input_is_named():
    with pytest.raises(ValueError, match="divide"):
        neuron_groups(5, F_)
    with pytest.raises(ValueError, match="activations"):
        neuron_groups(4, F_, method="cluster")
    with pytest.raises(ValueError, match="noise"):
        upcycle(dense(), 4, 2, noise=-1.0)


def test_an_upcycled_tinylm_computes_the_dense_model_and_then_trains_apart():
    from effarch.models import TinyLM, upcycle_tinylm

    torch.manual_seed(0)
    dense = TinyLM(40, 16, 2, mixer_kwargs={"n_heads": 2}, d_ff=24).double()
    moe = upcycle_tinylm(dense, 4, 2)
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    assert len(moe.moe_layers()) == 2 and not any(isinstance(b.mlp, MoELayer)
                                                  for b in dense.blocks)  # fmt: skip
    # every expert a copy, routing weights summing to one: the dense model's logits
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-12, atol=1e-12)
    ffn_params = 3 * 16 * 24
    assert moe.num_parameters() - dense.num_parameters() == 2 * (3 * ffn_params + 4 * 16)
    noisy = upcycle_tinylm(dense, 4, 2, noise=0.1)
    assert (noisy(x) - dense(x)).abs().max() > 1e-4
    with pytest.raises(TypeError, match="model must be a TinyLM"):
        upcycle_tinylm(dense.blocks[0], 4, 2)
    with pytest.raises(ValueError, match="SwiGLU MLPs"):
        upcycle_tinylm(TinyLM(40, 16, 1, mlp="gelu"), 4, 2)


def test_upcycle_leaves_the_callers_random_stream_untouched():
    """Regression: upcycle reseeded the global RNG with torch.manual_seed(seed). The router
    is still the one that seed gives, so upcycled layers stay as they were."""
    ffn = dense()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    moe = upcycle(ffn, 4, 2, noise=0.05, seed=3)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(3)
    router = MoELayer(D, F_, 4, 2).gate.weight.double()  # what reseeding gave before
    torch.testing.assert_close(moe.gate.weight, router, rtol=0, atol=0)
    again = upcycle(ffn, 4, 2, noise=0.05, seed=3)
    for a, b in zip(moe.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_clustering_needs_at_least_one_iteration():
    """Regression: iterations=0 raised a NameError instead of naming the argument."""
    acts = torch.randn(20, F_, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="iterations must be a positive int, got 0"):
        neuron_groups(4, F_, method="cluster", activations=acts, iterations=0)
    assert neuron_groups(4, F_, method="cluster", activations=acts, iterations=1).shape == (4, 8)
