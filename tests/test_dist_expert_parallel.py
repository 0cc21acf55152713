"""Chapter 5: expert parallelism over 2 and 4 gloo processes equals one process, forward
and backward."""

import pytest
import torch

from effarch.dist import check_expert_parallel, spawn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.mark.parametrize(
    ("world", "config"),
    [
        (2, dict(n_experts=4, k=2)),
        (4, dict(n_experts=8, k=2, n_shared=1, capacity_factor=1.0)),
    ],
)
def test_expert_parallel_equals_one_process(world, config):
    config = dict(config, d_model=8, d_ff=8, tokens=12, seed=0)
    saved = spawn(check_expert_parallel, world, config)
    ref, ranks = saved["reference"], [saved[f"rank{r}"] for r in range(world)]
    per = config["n_experts"] // world
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["y"], ref["y"][r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dx"], ref["dx"][r], rtol=1e-12, atol=1e-12)
        sl = slice(r * per, (r + 1) * per)
        torch.testing.assert_close(got["dgate_up"], ref["dgate_up"][sl], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["ddown"], ref["ddown"][sl], rtol=1e-12, atol=1e-12)
    # the router is replicated: its gradient is the sum of the ranks' (what all-reduce does)
    dgate = sum(got["dgate"] for got in ranks)
    torch.testing.assert_close(dgate, ref["dgate"], rtol=1e-12, atol=1e-12)
    assert all(got["bytes"] > 0 for got in ranks)  # tokens did travel


def test_expert_parallel_needs_a_process_group():
    from effarch.dist import ExpertParallelMoE
    from effarch.moe import MoELayer

    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(MoELayer(8, 8, 4, 2))
    with pytest.raises(TypeError, match="MoELayer"):
        ExpertParallelMoE(torch.nn.Linear(2, 2))
