"""Chapter 9.1: one measuring function for every family (profile_models) and the
every-family experiment at a few steps."""

import pytest
import torch

from effarch.experiments.every_family import FAMILIES, every_family_experiment, family_model
from effarch.models import HybridLM, profile_models
from effarch.models.profile import body_parameters

D, V = 32, 16


def _models():
    torch.manual_seed(0)
    attn = HybridLM(V, D, "A", {"A": ("attention", {"n_heads": 2})}, ffn="-").eval()
    gla = HybridLM(V, D, "A", {"A": ("gla", {"n_heads": 2})}, ffn="-").eval()
    return {"attention": attn, "gla": gla}


def test_profile_against_formulas():
    models = _models()
    out = profile_models(models, lengths=[64, 128], contexts=[8, 16, 32], repeats=1, steps=1)
    a, g = out["models"]["attention"], out["models"]["gla"]
    # memory: keys and values of every token, float32, against GLA's constant state
    assert a["memory_bytes"] == [2 * t * D * 4 for t in (8, 16, 32)]
    assert len(set(g["memory_bytes"])) == 1
    assert a["exponents"]["memory"] == pytest.approx(1.0)
    assert g["exponents"]["memory"] == pytest.approx(0.0, abs=1e-9)
    # FLOPs per token: attention adds 2 (D + Dv) = 4 d FLOPs per token per key (QK^T and PV),
    # counted on the whole score matrix; GLA's do not depend on T once T spans whole chunks
    fa, fg = a["flops_per_token"], g["flops_per_token"]
    assert fa[1] - fa[0] == 4 * D * (128 - 64)
    assert fg[0] == fg[1]
    # parameters: everything but the embedding (the head is tied to it)
    m = models["attention"]
    assert body_parameters(m) == sum(p.numel() for p in m.parameters()) - V * D
    for r in (a, g):
        assert all(s > 0 for s in r["prefill_seconds"] + r["decode_seconds"])
        assert set(r["exponents"]) == {"prefill", "flops", "decode", "memory"}


def test_profile_rejects_bad_input():
    models = _models()
    with pytest.raises(TypeError, match="HybridLM"):
        profile_models({"x": torch.nn.Linear(2, 2)}, lengths=[8, 16], contexts=[8, 16])
    with pytest.raises(ValueError, match="lengths"):
        profile_models(models, lengths=[16, 8], contexts=[8, 16])
    with pytest.raises(ValueError, match="contexts"):
        profile_models(models, lengths=[8, 16], contexts=[8])
    with pytest.raises(ValueError, match="non-empty"):
        profile_models({}, lengths=[8, 16], contexts=[8, 16])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_decodes_like_its_forward(name):
    """Each representative decodes token by token with its caches to its full forward."""
    model = family_model(name, V, D, 2, seed=0).double().eval()
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 12)
        steps = torch.cat([model(ids[:, i : i + 1], cache) for i in range(12)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-8, atol=1e-8)


def test_every_family_experiment_runs():
    out = every_family_experiment(
        steps=2, lengths=[16, 32], contexts=[16, 32], names=["MHA", "GLA"], progress=False
    )
    assert set(out["records"]) == {"MHA", "GLA"}
    for r in out["records"].values():
        assert 0 <= r["accuracy"] <= 1
        assert len(r["memory_bytes"]) == 2 and r["parameters"] > 0
    with pytest.raises(ValueError, match="name must be one of"):
        family_model("nope", V, D, 2, 0)


def test_memory_is_per_sequence_whatever_the_batch():
    """memory_bytes is what one sequence holds (module docstring), also at batch > 1;
    decode_seconds stays one step of the batch."""
    models = {"attention": _models()["attention"]}
    kw = dict(lengths=[16, 32], contexts=[8, 16], repeats=1, steps=1)
    one = profile_models(models, batch=1, **kw)["models"]["attention"]
    three = profile_models(models, batch=3, **kw)["models"]["attention"]
    assert one["memory_bytes"] == three["memory_bytes"] == [2 * t * D * 4 for t in (8, 16)]
    assert one["flops_per_token"] == three["flops_per_token"]
    assert len(three["decode_seconds"]) == 2
