"""The MoE training experiments (chapters 5.2 and 5.3) at a few steps: their command lines,
the parameter counts they record, and the upcycled arm starting where the dense model ended."""

import json

from effarch.experiments.__main__ import main as experiments_main
from effarch.experiments.moe_training import CONFIG, DENSE_MODELS


def test_moe_vs_dense_records_active_parameters_by_the_formula(tmp_path):
    out = tmp_path / "vs_dense.json"
    names = ["dense, d_ff 64 (= active)", "fine 31 x 8, top-7 + 1 shared"]
    experiments_main(["moe-vs-dense", "--steps", "2", "--models", *names, "--out", str(out)])
    recs = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    d, layers = CONFIG["d_model"], CONFIG["n_layers"]
    dense, fine = recs[names[0]], recs[names[1]]
    assert dense["parameters"] == dense["active_parameters"]
    ffn = DENSE_MODELS[names[1]]
    # per layer: a router of d E, and E + 1 experts of 3 d f of which k + 1 are used
    unused = layers * (ffn["n_experts"] - ffn["k"]) * 3 * d * ffn["d_ff"]
    assert fine["parameters"] - fine["active_parameters"] == unused
    router = layers * d * ffn["n_experts"]
    assert fine["active_parameters"] - dense["active_parameters"] == router  # 8 x 8 = 64 wide
    assert [s for s, _ in fine["eval"]] == [0, 2] and len(fine["train_loss"]) == 2


def test_the_upcycled_model_starts_at_the_dense_models_loss(tmp_path):
    out = tmp_path / "upcycle.json"
    experiments_main(["moe-upcycle", "--pretrain", "30", "--extra", "2", "--out", str(out)])
    recs = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    dense_end = recs["dense pretraining"]["eval"][-1][1]
    assert recs["dense, continued"]["eval"][0][1] == dense_end
    # 1% noise on the copies: the upcycled model starts (almost) where the dense one ended
    assert abs(recs["upcycled MoE"]["eval"][0][1] - dense_end) < 0.02
    # an MoE from scratch starts near the uniform guess over 257 symbols (8 bits)
    assert recs["MoE from scratch, all steps"]["eval"][0][1] > dense_end + 1
    assert len(recs["MoE from scratch, all steps"]["train_loss"]) == 32
