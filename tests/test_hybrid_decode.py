"""The stored decode run's pieces: the layouts it builds, their growing readers, the fit."""

from __future__ import annotations

import pytest

from effarch.experiments import hybrid_decode as hd
from effarch.models import YOCOLM, HybridLM


def test_readers_match_the_layouts():
    layouts = hd.decode_layouts(d_model=16)
    assert set(layouts) == set(hd.READERS)
    for name, model in layouts.items():
        if isinstance(model, YOCOLM):
            assert hd.READERS[name] == len(model.cross)  # every cross layer reads the cache
            continue
        assert isinstance(model, HybridLM) and model.n_layers == 8
        growing = sum(model.mixers_spec[letter][0] == "attention" for letter in model.pattern)
        assert hd.READERS[name] == growing, name


def test_step_time_slopes_recover_a_line():
    times = {"context": [10, 20, 40], "x": [1.0 + 0.5 * t for t in (10, 20, 40)], "flat": [3.0] * 3}
    fits = hd.step_time_slopes(times)
    assert fits["x"] == pytest.approx((1.0, 0.5))
    assert fits["flat"][1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two contexts"):
        hd.step_time_slopes({"context": [10], "x": [1.0]})


def test_every_family_decode_card():
    from effarch.experiments import every_family

    card = every_family.decode_experiment(
        ["MHA", "Mamba-2", "NSA"], {"contexts": [16, 48], "batch": 2, "repeats": 1, "steps": 1}
    )
    mha, mamba = card["records"]["MHA"], card["records"]["Mamba-2"]
    # bytes held per token of context: keys and values of every layer for MHA, none for a state
    cfg = card["config"]
    assert mha["bytes_per_token"] == cfg["n_layers"] * 2 * cfg["profile_d_model"] * 4
    assert mamba["bytes_per_token"] == 0
    # NSA: every key and value plus one mean per block of 8 (contexts of whole blocks)
    assert card["records"]["NSA"]["bytes_per_token"] == mha["bytes_per_token"] * (1 + 1 / 8)
    assert cfg["device"] == "cpu"
    assert len(mha["decode_seconds"]) == 2 and min(mha["decode_seconds"]) > 0
