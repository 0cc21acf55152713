"""Chapter 5.2: MoELayer against transformers' MoE blocks with the same weights; the loop
and grouped execution paths equal, forward and backward; capacity."""

import pytest
import torch

from effarch.moe import MoELayer, experts_grouped, experts_loop, grouped_matmul

transformers = pytest.importorskip("transformers")
D, F_, E = 16, 8, 8


def load(ours, theirs, names):
    state = theirs.state_dict()
    with torch.no_grad():
        target = dict(ours.named_parameters()) | dict(ours.named_buffers())
        for mine, their in names.items():
            target[mine].copy_(state[their])


def x_in(seed=0, dtype=torch.float32):
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


EXPERT_NAMES = {"gate.weight": "gate.weight", "experts.gate_up_proj": "experts.gate_up_proj",
                "experts.down_proj": "experts.down_proj"}  # fmt: skip


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_mixtral_block(impl):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                        num_experts_per_tok=2, router_jitter_noise=0.0)  # fmt: skip
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(cfg).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoELayer(D, F_, E, 2, impl=impl)
    load(ours, theirs, EXPERT_NAMES)
    x = x_in()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_qwen2_moe_block_with_a_gated_shared_expert():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeConfig,
        Qwen2MoeSparseMoeBlock,
    )

    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F_, num_experts=E,
                         num_experts_per_tok=3, norm_topk_prob=False,
                         shared_expert_intermediate_size=2 * F_)  # fmt: skip
    torch.manual_seed(1)
    theirs = Qwen2MoeSparseMoeBlock(cfg).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoELayer(D, F_, E, 3, n_shared=2, renormalize=False, shared_gate=True)
    names = dict(EXPERT_NAMES)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names[f"shared_experts.{proj}.weight"] = f"shared_expert.{proj}.weight"
    names["shared_expert_gate.weight"] = "shared_expert_gate.weight"
    load(ours, theirs, names)
    x = x_in(1)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_deepseek_v3_block_with_groups_bias_and_shared_experts():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Config,
        DeepseekV3MoE,
    )

    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E,
                           num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1,
                           routed_scaling_factor=2.0, norm_topk_prob=True)  # fmt: skip
    torch.manual_seed(2)
    theirs = DeepseekV3MoE(cfg).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    theirs.gate.e_score_correction_bias.normal_(std=0.2)
    ours = MoELayer(D, F_, E, 3, n_shared=1, score="sigmoid", n_group=4, topk_group=2,
                    scaling=2.0, impl="grouped")  # fmt: skip
    names = dict(EXPERT_NAMES, **{"gate.e_score_correction_bias": "gate.e_score_correction_bias"})
    for proj in ("gate_proj", "up_proj", "down_proj"):
        names[f"shared_experts.{proj}.weight"] = f"shared_experts.{proj}.weight"
    load(ours, theirs, names)
    x = x_in(2)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_loop_and_grouped_paths_agree_forward_and_backward(dtype, capacity_factor):
    torch.manual_seed(3)
    layer = MoELayer(D, F_, E, 2, n_shared=1, capacity_factor=capacity_factor).to(dtype)
    x = x_in(3, dtype).requires_grad_()
    outs, grads = [], []
    for impl in ("loop", "grouped"):
        layer.impl = impl
        y = layer(x)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, D, dtype=dtype)).sum(),
                                         [x, *layer.parameters()]))  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_the_layer_equals_a_per_token_loop_and_drops_beyond_capacity():
    torch.manual_seed(4)
    layer = MoELayer(D, F_, E, 2, n_shared=1, capacity_factor=0.5).double()
    x = x_in(4, torch.float64)
    y = layer(x)
    r = layer.routing
    assert r.keep.float().mean() < 1  # a factor of 0.5 must drop
    h = x.view(-1, D)
    gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
    for n in range(h.shape[0]):
        want = layer.shared_experts(h[n])
        for j in range(2):
            e = int(r.experts[n, j])
            if r.keep[n, j]:
                g, u = (gu[e] @ h[n]).chunk(2)
                want = want + r.weights[n, j] * (dn[e] @ (torch.nn.functional.silu(g) * u))
            else:
                assert e == E and r.weights[n, j] == 0
        torch.testing.assert_close(y.view(-1, D)[n], want)


def test_grouped_matmul_on_every_dtype_and_empty_groups():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 8, 12, generator=gen)
    offs = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # expert 1 gets no rows
    x = torch.randn(10, 8, generator=gen)
    want = torch.cat([x[:3] @ w[0], x[3:9] @ w[2], x[9:] @ w[3]])
    for dt in (torch.float32, torch.float64):
        torch.testing.assert_close(grouped_matmul(x.to(dt), w.to(dt), offs), want.to(dt),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    x5, w5 = torch.randn(10, 5, generator=gen), torch.randn(4, 5, 3, generator=gen)  # odd widths
    torch.testing.assert_close(grouped_matmul(x5, w5, offs)[3:9], x5[3:9] @ w5[2])


def test_paths_are_public_and_agree_on_raw_tensors():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, D, generator=gen)
    experts = torch.randint(0, E + 1, (9, 2), generator=gen)  # some slots are the sentinel
    weights = torch.rand(9, 2, generator=gen)
    gu, dn = torch.randn(E, 2 * F_, D, generator=gen), torch.randn(E, D, F_, generator=gen)
    a, b = experts_loop(x, experts, weights, gu, dn), experts_grouped(x, experts, weights, gu, dn)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_parameter_counts_and_bad_input():
    layer = MoELayer(D, F_, E, 2, n_shared=1)
    assert layer.active_parameters() == E * D + 2 * 3 * D * F_ + 3 * D * F_
    total = sum(p.numel() for p in layer.parameters())
    assert total == E * D + E * 3 * D * F_ + 3 * D * F_
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="impl"):
        MoELayer(D, F_, E, 2, impl="cuda")
    with pytest.raises(ValueError, match="k must be at most"):
        MoELayer(D, F_, E, E + 1)


def test_tinylm_with_moe_layers_trains_with_an_aux_loss_and_a_bias_update():
    from effarch.models import TinyLM
    from effarch.moe import expert_load, load_balancing_loss, update_bias
    from effarch.train import train

    torch.manual_seed(0)
    model = TinyLM(16, 32, 2, "attention", mixer_kwargs={"n_heads": 2}, d_ff=16, mlp="moe",
                   moe_kwargs={"n_experts": 4, "k": 2})  # fmt: skip
    layers = model.moe_layers()
    assert len(layers) == 2 and all(isinstance(m, MoELayer) for m in layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (4, 12), generator=gen)
    seen = []

    def aux(m):
        return 0.1 * sum(
            load_balancing_loss(la.routing.logits, la.routing.experts) for la in layers
        )

    def after(m, step):
        seen.append(step)
        for la in layers:
            update_bias(la.gate.e_score_correction_bias, expert_load(la.routing.experts, 4), 0.01)

    result = train(model, lambda s: (x, x), steps=3, aux_loss=aux, after_step=after, progress=False)
    assert seen == [0, 1, 2] and len(result.losses) == 3
    assert all(la.gate.e_score_correction_bias.abs().sum() > 0 for la in layers)
    with pytest.raises(ValueError, match="n_experts and k"):
        TinyLM(16, 32, 1, "attention", mlp="moe")


@pytest.mark.kernel
@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped_mm's path is taken on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_on_the_gpu_equals_the_loop_forward_and_backward(dtype):
    torch.manual_seed(7)
    layer = MoELayer(64, 32, 16, 4).cuda().to(dtype)
    x = torch.randn(4, 50, 64, device="cuda", dtype=dtype, requires_grad=True)
    outs, grads = [], []
    for impl in ("loop", "grouped"):
        layer.impl = impl
        y = layer(x)
        outs.append(y.float())
        grads.append(
            [g.float() for g in torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])]
        )
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("path", [experts_loop, experts_grouped])
def test_paths_reject_indices_outside_0_to_E_and_mismatched_weights(path):
    """Regression: experts_loop ran expert E - 1 for the index -1, experts_grouped failed in
    bincount without naming the argument."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, D, generator=gen)
    gu, dn = torch.randn(E, 2 * F_, D, generator=gen), torch.randn(E, D, F_, generator=gen)
    experts = torch.randint(0, E, (5, 2), generator=gen)
    weights = torch.rand(5, 2, generator=gen)
    for bad in (-1, E + 1):
        wrong = experts.clone()
        wrong[2, 1] = bad
        with pytest.raises(ValueError, match=rf"experts must hold indices in 0 \.\. {E}.*{bad}"):
            path(x, wrong, weights, gu, dn)
    with pytest.raises(ValueError, match=r"weights must have the shape of experts \(5, 2\)"):
        path(x, experts, weights[:, :1], gu, dn)
    with pytest.raises(ValueError, match=r"experts must be \[N, k\] with N = 5"):
        path(x, experts[:4], weights[:4], gu, dn)
    with pytest.raises(TypeError, match="experts must have dtype"):
        path(x, experts.float(), weights, gu, dn)
    # the sentinel E is a dropped slot; int32 indices give the same result as int64
    sentinel = experts.clone()
    sentinel[0] = E
    torch.testing.assert_close(path(x, sentinel.int(), weights, gu, dn),
                               path(x, sentinel, weights, gu, dn))  # fmt: skip
    torch.testing.assert_close(path(x[:0], experts[:0], weights[:0], gu, dn), x[:0])
