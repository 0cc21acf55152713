"""Chapter 8.3: experts routed by modality, against MoELayers run per modality, and the
multimodal digits model's data against the images and names it encodes."""

from __future__ import annotations

import math

import pytest
import torch

from effarch.experiments import multimodal_moe as mm
from effarch.moe import ModalityMoE, MoELayer, modality_load
from effarch.tasks import DIGIT_NAMES, digits_split, load_digits


def _copy_into(layer: MoELayer, moe: ModalityMoE, experts: range) -> None:
    with torch.no_grad():
        layer.gate.weight.copy_(moe.gate.weight[experts.start : experts.stop])
        layer.experts.gate_up_proj.copy_(moe.experts.gate_up_proj[experts.start : experts.stop])
        layer.experts.down_proj.copy_(moe.experts.down_proj[experts.start : experts.stop])


def test_separate_pools_equal_one_moe_layer_per_modality():
    torch.manual_seed(0)
    moe = ModalityMoE(16, 8, 6, 2, n_modalities=3, pools="separate").double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    modality = torch.randint(0, 3, (2, 10))
    y = moe(x, modality)
    for m in range(3):
        ref = MoELayer(16, 8, 2, 2).double()
        _copy_into(ref, moe, moe.pool(m))
        rows = modality == m
        torch.testing.assert_close(y[rows], ref(x[rows]))
        chosen = moe.routing.experts[modality.flatten() == m]
        assert chosen.min() >= 2 * m and chosen.max() < 2 * m + 2


def test_shared_pool_is_moe_layer():
    torch.manual_seed(1)
    moe = ModalityMoE(16, 8, 4, 2, pools="shared").double()
    ref = MoELayer(16, 8, 4, 2).double()
    _copy_into(ref, moe, range(4))
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    modality = torch.randint(0, 2, (3, 7))
    torch.testing.assert_close(moe(x, modality), ref(x))
    torch.testing.assert_close(moe.balance_loss(), _switch_loss(ref))


def _switch_loss(ref: MoELayer) -> torch.Tensor:
    from effarch.moe import load_balancing_loss

    return load_balancing_loss(ref.routing.logits, ref.routing.experts)


def test_separate_balance_loss_is_the_mean_over_pools():
    torch.manual_seed(2)
    moe = ModalityMoE(8, 4, 4, 1, pools="separate").double()
    x = torch.randn(40, 8, dtype=torch.float64)
    modality = torch.arange(40) % 2
    moe(x, modality)
    losses = []
    for m in range(2):
        ref = MoELayer(8, 4, 2, 1).double()
        _copy_into(ref, moe, moe.pool(m))
        ref(x[modality == m])
        losses.append(_switch_loss(ref))
    torch.testing.assert_close(moe.balance_loss(), torch.stack(losses).mean())
    # gradients flow to both pools' router rows
    moe.balance_loss().backward()
    assert (moe.gate.weight.grad.abs().sum(-1) > 0).all()


def test_modality_load_against_a_loop():
    experts = torch.tensor([[0, 1], [2, 1], [3, 0], [1, 1]])
    modality = torch.tensor([0, 1, 0, 1])
    load = modality_load(experts, modality, 4, 2)
    want = torch.zeros(2, 4)
    for row, m in zip(experts.tolist(), modality.tolist(), strict=True):
        for e in row:
            want[m, e] += 1
    torch.testing.assert_close(load, want / want.sum(-1, keepdim=True))
    assert modality_load(experts, torch.zeros(4, dtype=torch.long), 4, 3)[2].sum() == 0


def test_modality_moe_bad_input():
    with pytest.raises(ValueError, match="divide"):
        ModalityMoE(8, 4, 5, 1, pools="separate")
    with pytest.raises(ValueError, match="k must be at most the 2"):
        ModalityMoE(8, 4, 4, 3, pools="separate")
    with pytest.raises(ValueError, match="pools"):
        ModalityMoE(8, 4, 4, 1, pools="mixed")
    moe = ModalityMoE(8, 4, 4, 1)
    with pytest.raises(ValueError, match="modality must have"):
        moe(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"modality must lie in 0..1"):
        moe(torch.randn(2, 3, 8), torch.full((2, 3), 2))
    with pytest.raises(TypeError, match="modality"):
        moe(torch.randn(2, 3, 8), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="forward"):
        ModalityMoE(8, 4, 4, 1).balance_loss()
    with pytest.raises(ValueError, match="one entry per row"):
        modality_load(torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2, 2)


def test_patch_tokens_against_pixels():
    images, _ = load_digits(levels=2)
    codes = mm.patch_tokens(images[:20])
    for n in range(20):
        for p in range(16):
            r, c = 2 * (p // 4), 2 * (p % 4)
            a, b = images[n, r, c], images[n, r, c + 1]
            cc, d = images[n, r + 1, c], images[n, r + 1, c + 1]
            assert codes[n, p] == a + 2 * b + 4 * cc + 8 * d
    with pytest.raises(ValueError, match="0/1"):
        mm.patch_tokens(torch.full((1, 8, 8), 3))


def test_digit_sequences_layout():
    data = mm.digit_sequences("heldout")
    _, held = digits_split()
    images, labels = load_digits(levels=2)
    n = held.numel()
    tokens = data["tokens"]
    assert tokens.shape == (2 * n, 23)
    i = 5
    patches = mm.patch_tokens(images[held[i : i + 1]])[0]
    name = DIGIT_NAMES[labels[held[i]]]
    letters = "".join(chr(ord("a") + t - mm.LETTER0) for t in tokens[i, 18:].tolist() if t < mm.PAD)
    assert letters == name
    assert tokens[i, 0] == mm.BOI and tokens[i, 17] == mm.BOT
    assert torch.equal(tokens[i, 1:17], patches)
    assert tokens[n + i, 0] == mm.BOT and tokens[n + i, 6] == mm.BOI
    assert torch.equal(tokens[n + i, 7:], patches)
    # targets: the next token, never a marker; modality of inputs and targets
    t = data["targets"]
    assert torch.equal(t[:, :-1][t[:, :-1] != -100], tokens[:, 1:][t[:, :-1] != -100])
    assert (t[:, -1] == -100).all() and (t[:, 16] == -100)[:n].all()
    assert torch.equal(data["modality"] == mm.IMAGE, tokens < 16)


@pytest.mark.parametrize("ffn", mm.FFNS)
def test_multimodal_lm_is_causal_and_counts_active_parameters(ffn):
    torch.manual_seed(0)
    model = mm.MultimodalLM(ffn, d_model=16, n_heads=2, n_experts=4, k=1, d_ff=8).double()
    data = mm.digit_sequences("heldout")
    tok, mod = data["tokens"][:3], data["modality"][:3]
    y = model(tok, mod)
    tok2 = tok.clone()
    tok2[:, 12] = (tok2[:, 12] + 1) % 16
    y2 = model(tok2, torch.where(tok2 < 16, 0, 1))
    torch.testing.assert_close(y2[:, :12], y[:, :12])
    dense = sum(p.numel() for p in mm.MultimodalLM("dense", d_model=16, n_heads=2, k=1,
                                                   d_ff=8).parameters())  # fmt: skip
    if ffn == "dense":
        assert model.active_parameters() == dense
    else:  # the same active width as dense, plus the router rows of one pool
        per_pool = 4 if ffn == "shared" else 2
        assert model.active_parameters() == dense + 2 * per_pool * 16


def test_train_multimodal_evaluates_and_shares_batches():
    held = mm.digit_sequences("heldout")
    small = {"steps": 3, "d_model": 16, "n_heads": 2, "n_experts": 4, "k": 1, "d_ff": 8}
    for ffn in ("dense", "separate"):
        model, history = mm.train_multimodal(
            ffn, seed=3, config=small, eval_data=held, eval_every=2, progress=False
        )
        assert [e[0] for e in history["eval"]] == [2, 3] and len(history["losses"]) == 3
        final = mm.modality_losses(model, held)
        assert history["eval"][-1][1:] == pytest.approx(tuple(final.values()))
        assert list(final) == ["image", "text", "text_given_image", "image_given_text"]


def test_modality_losses_against_a_loop():
    torch.manual_seed(0)
    model = mm.MultimodalLM("shared", d_model=16, n_heads=2, n_experts=4, k=1, d_ff=8)
    full = mm.digit_sequences("heldout")
    n = full["labels"].shape[0]
    rows = torch.tensor([0, 1, 2, n, n + 1, n + 2])  # 3 caption rows, then their draw rows
    data = {k: v[rows] if k != "labels" else v[:3] for k, v in full.items()}
    got = mm.modality_losses(model, data)
    with torch.no_grad():
        logp = model(data["tokens"], data["modality"]).log_softmax(-1)
    # the first 3 rows (as many as labels) are the caption half, the other 3 the draw half
    sums, counts = {}, {}
    for b in range(6):
        for t in range(23):
            y = int(data["targets"][b, t])
            if y == -100:
                continue
            m = "image" if y < 16 else "text"
            task = ("text_given_image" if m == "text" else None) if b < 3 else (
                "image_given_text" if m == "image" else None)  # fmt: skip
            for key in (m, task):
                if key is not None:
                    sums[key] = sums.get(key, 0.0) - float(logp[b, t, y]) / math.log(2)
                    counts[key] = counts.get(key, 0) + 1
    assert set(got) == set(sums) and all(counts[key] > 5 for key in counts), counts
    for key in got:
        assert got[key] == pytest.approx(sums[key] / counts[key], rel=1e-5), key


def test_routing_summary_against_its_definitions():
    torch.manual_seed(0)
    held = mm.digit_sequences("heldout")
    for ffn in ("shared", "separate"):
        model = mm.MultimodalLM(ffn, d_model=16, n_heads=2, n_experts=4, k=1, d_ff=8)
        for layer, s in zip(model.moe_layers(), mm.routing_summary(model, held), strict=True):
            load = s["load"]
            want_sep = (
                sum(abs(a - b) for a, b in zip(load[0].tolist(), load[1].tolist(), strict=True)) / 2
            )
            assert s["separation"] == pytest.approx(want_sep)
            for m, key in ((0, "cv_image"), (1, "cv_text")):
                row = [load[m, e].item() for e in layer.pool(m)]
                mean = sum(row) / len(row)
                std = (sum((v - mean) ** 2 for v in row) / len(row)) ** 0.5
                assert s[key] == pytest.approx(std / mean, rel=1e-5)
            if ffn == "separate":
                assert s["separation"] == pytest.approx(1.0)
