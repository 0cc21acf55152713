"""Chapter 5: expert parallelism over 2 and 4 gloo processes equals one process, forward
and backward (routed experts, router and shared experts); the bytes counted per rank follow
the ranks' own tokens."""

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
    # so are the shared experts: each rank's gradient covers its own tokens
    if config.get("n_shared"):
        dshared = sum(got["dshared"] for got in ranks)
        assert ref["dshared"].abs().max() > 0
        torch.testing.assert_close(dshared, ref["dshared"], rtol=1e-12, atol=1e-12)
    else:
        assert ref["dshared"] is None and all(got["dshared"] is None for got in ranks)
    assert all(got["bytes"] > 0 for got in ranks)  # tokens did travel


def test_time_worker_counts_each_ranks_own_tokens():
    from effarch.dist import dispatch_bytes, time_expert_parallel

    config = dict(n_experts=8, k=2, d_model=16, d_ff=16, tokens=256, repeats=1, seed=0)
    saved = spawn(time_expert_parallel, 2, config)
    sent = [saved[f"time{r}"]["bytes"] for r in range(2)]
    # the ranks hold different tokens, so they route differently and send different counts
    assert sent[0] != sent[1]
    expected = dispatch_bytes(2, 16, 2, bytes_per=4) * config["tokens"]
    assert all(abs(b / expected - 1) < 0.25 for b in sent)
    assert set(saved["time0"]["seconds"]) == {"route", "dispatch", "experts", "combine"}


def test_expert_parallel_needs_a_process_group():
    from effarch.dist import ExpertParallelMoE
    from effarch.moe import MoELayer

    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(MoELayer(8, 8, 4, 2))
    with pytest.raises(TypeError, match="MoELayer"):
        ExpertParallelMoE(torch.nn.Linear(2, 2))
