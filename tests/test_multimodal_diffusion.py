"""Chapter 7.3: the 8x8 digits, the sampler that fills masks anywhere, the multimodal loss
with a noise level per modality, and the stored image-and-text model."""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion import FixedLogits, M, V, tiny

from effarch.diffusion import (
    PerPositionVocab,
    forward_process,
    generate,
    infill,
    joint_diffusion_loss,
    masked_diffusion_loss,
)
from effarch.tasks import DIGIT_NAMES, digits_split, load_digits, quantize

# -- the digits ---------------------------------------------------------------------------------


def test_digits_load_quantize_and_split():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))
    grey, _ = load_digits(4)
    # four equal bins of the 17 grey values: 0-4, 5-8, 9-12, 13-16
    want = torch.tensor([0] * 5 + [1] * 4 + [2] * 4 + [3] * 4)
    assert torch.equal(quantize(torch.arange(17), 4), want)
    assert torch.equal(grey, quantize((images * 16).round().long(), 4))
    train, held = digits_split()
    assert len(train) == 1500 and len(held) == 297
    assert len(set(train.tolist()) | set(held.tolist())) == 1797
    assert torch.equal(digits_split()[1], held)  # fixed
    assert DIGIT_NAMES[7] == "seven"


def test_digits_reject_bad_input():
    with pytest.raises(ValueError, match="levels must lie"):
        quantize(torch.arange(3), 1)
    with pytest.raises(ValueError, match=r"grey values in \[0, 16\]"):
        quantize(torch.tensor([17]), 4)
    with pytest.raises(ValueError, match="n_heldout"):
        digits_split(1797)


# -- infill: masks anywhere --------------------------------------------------------------------


def test_infill_of_a_prompt_then_masks_equals_generate():
    net = tiny(seed=2)

    def model(x):
        out = net(x)
        out[..., M] = -torch.inf
        return out

    prompt = torch.randint(0, M, (3, 4), generator=torch.Generator().manual_seed(0))
    x = torch.cat([prompt, torch.full((3, 6), M)], 1)
    for kw in (dict(steps=6), dict(steps=3), dict(steps=None, threshold=0.2)):
        want = generate(model, prompt, mask_id=M, gen_length=6, **kw)
        got = infill(model, x, mask_id=M, **kw)
        assert torch.equal(got.tokens, want.tokens) and got.nfe == want.nfe, kw
    sampled = dict(temperature=1.0, remasking="random")
    want = generate(model, prompt, mask_id=M, gen_length=6, steps=6, **sampled,
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    got = infill(model, x, mask_id=M, steps=6, **sampled,
                 generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(got.tokens, want.tokens)


def test_infill_fills_only_the_masks_in_confidence_order_by_hand():
    probs = [0.5, 0.9, 0.3, 0.8, 0.6, 0.7]
    x = torch.tensor([[M, 7, M, M, 8, M]])  # positions 1 and 4 are given
    out = infill(FixedLogits(probs), x, mask_id=M, steps=2)
    # masked: 0 (0.5), 2 (0.3), 3 (0.8), 5 (0.7); two per step, most confident first
    assert out.step_of.tolist() == [[1, -1, 1, 0, -1, 0]]
    assert out.tokens.tolist() == [[0, 7, 2, 3, 8, 0]]
    # default: one per step, as many steps as the most-masked row has masks
    out = infill(FixedLogits(probs), torch.tensor([[M, M, 1, 1, 1, 1], [M] * 6]), mask_id=M)
    assert out.nfe == 6 and out.per_step == [2, 2, 1, 1, 1, 1]
    assert out.step_of[0].tolist() == [1, 0, -1, -1, -1, -1]
    with pytest.raises(TypeError, match="x must be"):
        infill(FixedLogits(probs), [[M, 1]], mask_id=M)
    with pytest.raises(ValueError, match="threshold"):
        infill(FixedLogits(probs), x, mask_id=M, threshold=1.5)


# -- the loss with a noise level per modality ----------------------------------------------------


def test_one_segment_with_a_shared_level_is_the_masked_diffusion_loss():
    net = tiny(seed=3)
    x0 = torch.randint(0, M, (6, 9), generator=torch.Generator().manual_seed(0))
    got = joint_diffusion_loss(net, x0, [(0, 9)], M, independent=False,
                               generator=torch.Generator().manual_seed(4))  # fmt: skip
    xt, masked, t = forward_process(x0, M, generator=torch.Generator().manual_seed(4))
    want = masked_diffusion_loss(net(xt), x0, masked, t)
    assert torch.allclose(got, want)


class Recorder(torch.nn.Module):
    """Uniform logits over V tokens; keeps what it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return torch.zeros(*x.shape, V, dtype=torch.float64)


@pytest.mark.parametrize("independent", [True, False])
def test_the_weighted_loss_is_unbiased_and_the_levels_are_per_modality(independent):
    # uniform logits: every masked token costs log V, and E[1{masked} / t] = 1 at every
    # position, so the expected loss is log V whatever the segments and the levels
    x0 = torch.randint(0, M, (8000, 6), generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    loss = joint_diffusion_loss(rec, x0, [(0, 2), (2, 6)], M, independent=independent,
                                generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert loss.item() == pytest.approx(math.log(V), rel=0.08)
    masked = (rec.seen[0] == M).double()
    text, image = masked[:, :2].mean(1), masked[:, 2:].mean(1)
    corr = torch.corrcoef(torch.stack([text, image]))[0, 1].item()
    # a shared level makes the two modalities' masked fractions correlated, own levels not
    assert (abs(corr) < 0.05) if independent else (corr > 0.4), corr


def test_joint_loss_and_vocab_restriction_reject_bad_input():
    x0 = torch.zeros(2, 6, dtype=torch.long)
    for segs in ([(0, 2), (3, 6)], [(0, 2), (2, 5)], [], [(0, 6, 1)]):
        with pytest.raises((ValueError, TypeError), match="segments"):
            joint_diffusion_loss(Recorder(), x0, segs, M)
    allowed = torch.ones(6, V, dtype=torch.bool)
    allowed[0] = False
    with pytest.raises(ValueError, match="at least one token"):
        PerPositionVocab(Recorder(), allowed)
    allowed[0, 3] = True
    logits = PerPositionVocab(Recorder(), allowed)(x0)
    assert logits[0, 0].isinf().sum() == V - 1 and logits[0, 0, 3] == 0
    with pytest.raises(ValueError, match=r"allowed must be \[L, V\]"):
        PerPositionVocab(Recorder(), allowed)(torch.zeros(2, 5, dtype=torch.long))


# -- the stored model ------------------------------------------------------------------------------


def test_digits_vocab_round_trips_and_restricts_each_modality():
    from effarch.experiments import multimodal_diffusion as mm

    v = mm.vocab()
    labels = torch.arange(10)
    assert v.decode_text(v.encode_text(labels)) == list(DIGIT_NAMES)
    a = v.allowed()
    assert a.shape == (v.length, v.vocab_size) and not a[:, v.mask_id].any()
    assert a[: v.text_len, v.pad_id].all() and not a[v.text_len :, v.letter0 :].any()
    tokens, y = mm.pairs("heldout")
    assert tokens.shape == (297, 69) and v.decode_text(tokens)[:3] == [
        DIGIT_NAMES[i] for i in y[:3].tolist()
    ]
