"""Chapter 5.1: balance losses against transformers' and loops, the loss-free bias update,
balance metrics."""

import pytest
import torch

from effarch.moe import (
    coefficient_of_variation,
    dropped_fraction,
    expert_load,
    load_balancing_loss,
    max_violation,
    route,
    router_z_loss,
    sequence_balance_loss,
    update_bias,
)

transformers = pytest.importorskip("transformers")
E = 8


def logits(shape, seed=0):
    return torch.randn(*shape, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_transformers_for_one_layer_divided_by_k(k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    x = logits((3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False  # padding
    mask[2, 3:] = False
    flat = x.view(-1, E)
    _, experts = route(flat, k)
    for m in (None, mask):
        theirs = load_balancing_loss_func((flat,), E, k, m)
        ours = load_balancing_loss(flat, experts, None if m is None else m.flatten())
        torch.testing.assert_close(ours * k, theirs)
    # several layers: transformers pools counts and probabilities before the product
    x2 = logits((30,), seed=1)
    pooled = load_balancing_loss_func((flat, x2), E, k)
    per_layer = [load_balancing_loss(a, route(a, k)[1]) for a in (flat, x2)]
    assert not torch.isclose(pooled / k, sum(per_layer) / 2)


def test_switch_loss_and_z_loss_match_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
        router_z_loss_func,
    )

    x = logits((1, 25), seed=2)
    _, experts = route(x[0], 1)
    theirs = load_balancing_loss_func(x.softmax(-1), experts.view(1, 25))
    torch.testing.assert_close(load_balancing_loss(x[0], experts), theirs)
    torch.testing.assert_close(router_z_loss(x), router_z_loss_func(x))


def test_uniform_routing_scores_one_and_the_loss_has_a_gradient():
    experts = torch.arange(16).view(16, 1) % E  # every expert twice
    torch.testing.assert_close(load_balancing_loss(torch.zeros(16, E), experts), torch.tensor(1.0))
    skew = torch.zeros(16, E)
    skew[:, 0] = 5.0
    skew.requires_grad_()
    loss = load_balancing_loss(skew, torch.zeros(16, 1, dtype=torch.long))
    assert loss > 5
    (g,) = torch.autograd.grad(loss, skew)
    assert (g[:, 0] > 0).all()  # descending the loss lowers the overloaded expert's logit


def test_sequence_balance_loss_follows_its_formula():
    x = logits((2, 12), seed=3)
    _, e = route(x.view(-1, E), 3, score="sigmoid")
    e = e.view(2, 12, 3)
    want = []
    for b in range(2):
        s = x[b].sigmoid()
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.tensor([E / (3 * 12) * int((e[b] == i).sum()) for i in range(E)])
        want.append(float((f * p).sum()))
    torch.testing.assert_close(sequence_balance_loss(x, e).item(), sum(want) / 2)
    uniform = torch.arange(2 * 8 * 1).view(2, 8, 1) % E
    torch.testing.assert_close(sequence_balance_loss(torch.zeros(2, 8, E), uniform).item(), 1.0)


def test_the_loss_free_bias_update_balances_a_skewed_router():
    x = logits((512,), seed=4) + torch.linspace(0, 2, E)  # later experts preferred
    bias = torch.zeros(E)
    start = max_violation(expert_load(route(x, 2, score="sigmoid")[1], E))
    for _ in range(300):
        _, e = route(x, 2, score="sigmoid", bias=bias)
        update_bias(bias, expert_load(e, E), gamma=0.01)
    w, e = route(x, 2, score="sigmoid", bias=bias)
    end = max_violation(expert_load(e, E))
    assert end < start / 4, (start, end)
    assert bias[0] > bias[-1]  # the underloaded first expert was pushed up
    s = x.sigmoid().gather(1, e)  # the weights still come from the unbiased scores
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True))


def test_metrics_by_hand():
    load = torch.tensor([4.0, 0.0, 2.0, 2.0])
    assert max_violation(load).item() == pytest.approx(1.0)
    assert coefficient_of_variation(load).item() == pytest.approx(2**0.5 / 2)
    assert max_violation(torch.full((4,), 3.0)).item() == 0
    keep = torch.tensor([[True, False], [True, True], [False, False]])
    assert dropped_fraction(keep).item() == pytest.approx(0.5)
    assert dropped_fraction(keep, torch.tensor([True, True, False])).item() == pytest.approx(0.25)
    assert expert_load(torch.tensor([[0, 4], [1, 1]]), 4).tolist() == [1, 2, 0, 0]  # 4: sentinel


def test_bad_balance_input_is_named():
    with pytest.raises(ValueError, match="experts must be"):
        load_balancing_loss(torch.zeros(4, E), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="gamma"):
        update_bias(torch.zeros(E), torch.zeros(E), -1.0)
    with pytest.raises(ValueError, match="load must have"):
        update_bias(torch.zeros(E), torch.zeros(3), 0.1)


def test_a_mask_of_another_shape_or_device_is_rejected():
    """Regression: a [N, 1] mask broadcast against [N] and made the losses N times too large."""
    x = logits((6,))
    experts = route(x, 2)[1]
    good = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    for bad in (good[:, None], good[:5], good.float()[None]):
        with pytest.raises(ValueError, match=r"mask must have shape \[N\] = \(6,\)"):
            load_balancing_loss(x, experts, bad)
        with pytest.raises(ValueError, match=r"mask must have shape \[\.\.\.\] = \(6,\)"):
            router_z_loss(x, bad)
        with pytest.raises(ValueError, match=r"mask must have shape \[\.\.\.\] = \(6,\)"):
            expert_load(experts, E, bad)
    with pytest.raises(ValueError, match="mask must be on the device of logits"):
        load_balancing_loss(x, experts, good.to("meta"))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        router_z_loss(x, [1, 1, 0, 1, 1, 1])
    # the right shape: padding excluded, as if the token were absent
    keep = good.nonzero()[:, 0]
    torch.testing.assert_close(load_balancing_loss(x, experts, good),
                               load_balancing_loss(x[keep], experts[keep]))  # fmt: skip
    torch.testing.assert_close(router_z_loss(x, good), router_z_loss(x[keep]))
    torch.testing.assert_close(expert_load(experts, E, good), expert_load(experts[keep], E))
