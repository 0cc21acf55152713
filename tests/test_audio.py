"""Chapter 8.2: the touch-tone task against the tones it claims to hold, Goertzel's recurrence
against the DFT, and the waveform model streamed chunk by chunk against one pass."""

from __future__ import annotations

import math

import pytest
import torch

from effarch.attention import WindowKVCache
from effarch.audio import (
    AUDIO_MIXERS,
    StreamCost,
    WaveformModel,
    dtmf_receiver,
    goertzel_power,
    stream,
    streaming_cost,
)
from effarch.bench import tensor_bytes
from effarch.scan import linear_recurrence
from effarch.tasks import (
    DTMF_KEYS,
    dtmf_frequencies,
    keys_from_labels,
    tone_accuracy,
    touch_tones,
)

MIXER_ARGS = {"s4d": {}, "attention": {}, "window": {"window": 24}}


# ------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------


def test_keypad_by_hand():
    assert dtmf_frequencies("1") == (697.0, 1209.0)
    assert dtmf_frequencies("5") == (770.0, 1336.0)
    assert dtmf_frequencies("#") == (941.0, 1477.0)
    assert dtmf_frequencies("D") == (941.0, 1633.0)
    with pytest.raises(ValueError, match="key"):
        dtmf_frequencies("E")


def test_touch_tones_labels_follow_the_presses():
    b = touch_tones(6, 0.5, seed=3, guard_ms=0.0)
    assert b.audio.shape == b.labels.shape == (6, 8000)
    for i, clip in enumerate(b.presses):
        want = torch.zeros(8000, dtype=torch.long)
        for start, end, label in clip:
            assert 640 <= end - start <= 1600  # 40 .. 100 ms
            want[start:end] = label
        assert torch.equal(b.labels[i], want)
        assert len(b.keys(i)) == len(clip) >= 2
    again = touch_tones(6, 0.5, seed=3, guard_ms=0.0)
    assert torch.equal(again.audio, b.audio)


def test_each_press_holds_its_two_frequencies():
    """The spectrum of a noise-free press peaks at the key's row and column frequencies."""
    b = touch_tones(4, 0.5, seed=1, noise=0.0, guard_ms=0.0)
    sr = b.sample_rate
    for i, clip in enumerate(b.presses):
        for start, end, label in clip:
            seg = b.audio[i, start:end].double()
            n = 16 * seg.numel()  # zero-padded: fine frequency grid
            mag = torch.fft.rfft(seg, n=n).abs()
            freqs = torch.fft.rfftfreq(n, 1 / sr)
            low, high = freqs < 1100, freqs >= 1100
            f_low = freqs[low][mag[low].argmax()].item()
            f_high = freqs[high][mag[high].argmax()].item()
            f_r, f_c = dtmf_frequencies(DTMF_KEYS[label - 1])
            resolution = sr / seg.numel()
            assert abs(f_low - f_r) < resolution and abs(f_high - f_c) < resolution
        silent = b.labels[i] == 0
        assert b.audio[i][silent].abs().max() == 0


def test_guard_hides_the_first_samples_after_every_change():
    plain = touch_tones(3, 0.4, seed=5, guard_ms=0.0)
    guarded = touch_tones(3, 0.4, seed=5, guard_ms=5.0)
    g = 80  # 5 ms at 16 kHz
    for i in range(3):
        lab = plain.labels[i]
        changes = [t for t in range(1, lab.numel()) if lab[t] != lab[t - 1]]
        hidden = torch.zeros(lab.numel(), dtype=torch.bool)
        for t in changes:
            hidden[t : t + g] = True
        assert torch.equal(guarded.labels[i] == -100, hidden)
        assert torch.equal(guarded.labels[i][~hidden], lab[~hidden])


def test_keys_from_labels_spells_the_presses():
    b = touch_tones(5, 1.0, seed=6)
    for i in range(5):
        assert keys_from_labels(b.labels[i]) == b.keys(i)
    lab = torch.tensor([3] * 200 + [0] * 20 + [3] * 200 + [0] * 300 + [3] * 200)
    assert keys_from_labels(lab) == "33"  # a 20-sample gap is flicker, a 300-sample one a pause
    with pytest.raises(ValueError, match="labels must have 1"):
        keys_from_labels(b.labels)


def test_tone_accuracy_votes_per_press():
    b = touch_tones(4, 0.5, seed=2)
    truth = b.labels.clamp_min(0)
    assert tone_accuracy(truth, b) == 1.0
    assert tone_accuracy(torch.zeros_like(truth), b) == 0.0
    # wrong on a minority of each press's scored samples: still right
    noisy = truth.clone()
    for i, clip in enumerate(b.presses):
        for start, end, _ in clip:
            noisy[i, start : start + (end - start) // 3] = 0
    assert tone_accuracy(noisy, b) == 1.0
    n_press = sum(len(c) for c in b.presses)
    start, end, label = b.presses[0][0]
    noisy[0, start:end] = label % 16 + 1  # one press wholly wrong
    assert tone_accuracy(noisy, b) == pytest.approx(1 - 1 / n_press)
    with pytest.raises(ValueError, match="shape"):
        tone_accuracy(truth[:, :-1], b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0, "seconds": 1.0}, "n must be"),
        ({"n": 2, "seconds": -1.0}, "seconds"),
        ({"n": 2, "seconds": 0.01}, "shortest tone"),
        ({"n": 2, "seconds": 1.0, "tone_ms": (50.0, 40.0)}, "tone_ms"),
        ({"n": 2, "seconds": 1.0, "noise": -0.1}, "noise"),
    ],
)
def test_touch_tones_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        touch_tones(**kwargs)


# ------------------------------------------------------------------------------------------
# Goertzel
# ------------------------------------------------------------------------------------------


def test_goertzel_equals_the_dft_at_any_frequency():
    torch.manual_seed(0)
    x = torch.randn(2, 3 * 205, dtype=torch.float64)
    freqs = [697.0, 1000.0, 1633.0, 3210.5]
    sr, n = 8000, 205
    p = goertzel_power(x, freqs, sample_rate=sr, block=n)
    assert p.shape == (2, 3, 4)
    blocks = x.reshape(2, 3, n)
    for j, f in enumerate(freqs):
        phase = torch.exp(-2j * math.pi * f / sr * torch.arange(n, dtype=torch.float64))
        want = (blocks * phase).sum(-1).abs() ** 2
        torch.testing.assert_close(p[..., j], want, rtol=1e-9, atol=1e-9)


def test_goertzel_is_a_one_pole_complex_recurrence():
    """``z_n = e^{i w} z_{n-1} + x_n`` (a diagonal SSM with A_bar = e^{iw}, B_bar = 1) ends at
    ``|z_{N-1}|^2 = P``: the docstring's claim, through the book's scan."""
    torch.manual_seed(1)
    x = torch.randn(1, 320, dtype=torch.float64)
    w = 2 * math.pi * 852.0 / 16000
    a = torch.full((1, 320), complex(math.cos(w), math.sin(w)), dtype=torch.complex128)
    z = linear_recurrence(a, x.to(torch.complex128))
    p = goertzel_power(x, [852.0], sample_rate=16000, block=320)
    torch.testing.assert_close(z[0, -1].abs() ** 2, p[0, 0, 0], rtol=1e-9, atol=1e-9)


def test_goertzel_receiver_decodes_clean_presses():
    b = touch_tones(8, 0.6, seed=4, noise=0.05)
    assert tone_accuracy(dtmf_receiver(b.audio), b) == 1.0
    silence = torch.zeros(1, 1600) + 0.05 * torch.randn(1, 1600)
    assert dtmf_receiver(silence).eq(0).all()


def test_goertzel_bad_input():
    x = torch.randn(1, 100)
    with pytest.raises(ValueError, match="block"):
        goertzel_power(x, [697.0], sample_rate=8000, block=200)
    with pytest.raises(ValueError, match="freqs"):
        goertzel_power(x, [], sample_rate=8000, block=10)
    with pytest.raises(ValueError, match=r"freqs\[0\]"):
        goertzel_power(x, [-5.0], sample_rate=8000, block=10)
    with pytest.raises(ValueError, match="audio must have 2"):
        goertzel_power(x[0], [697.0], sample_rate=8000, block=10)


# ------------------------------------------------------------------------------------------
# the model, streamed
# ------------------------------------------------------------------------------------------


def _model(mixer, **kw):
    torch.manual_seed(0)
    return WaveformModel(17, d_model=8, mixer=mixer, **MIXER_ARGS[mixer], **kw).double()


@pytest.mark.parametrize("mixer", AUDIO_MIXERS)
@pytest.mark.parametrize("chunk", [1, 7, 50, 200])
def test_streaming_equals_one_pass(mixer, chunk):
    model = _model(mixer)
    x = torch.randn(2, 200, dtype=torch.float64)
    full, _ = model(x)
    y, _ = stream(model, x, chunk=chunk)
    torch.testing.assert_close(y, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", AUDIO_MIXERS)
def test_model_is_causal(mixer):
    model = _model(mixer)
    x = torch.randn(1, 120, dtype=torch.float64)
    y, _ = model(x)
    x2 = x.clone()
    x2[:, 80:] += torch.randn(1, 40, dtype=torch.float64)
    y2, _ = model(x2)
    torch.testing.assert_close(y2[:, :80], y[:, :80], rtol=0, atol=1e-12)
    assert (y2[:, 80:] - y[:, 80:]).abs().max() > 1e-3


def test_window_wider_than_the_clip_is_full_attention():
    torch.manual_seed(0)
    full = WaveformModel(5, d_model=8, mixer="attention").double()
    torch.manual_seed(0)
    win = WaveformModel(5, d_model=8, mixer="window", window=64).double()
    x = torch.randn(2, 64, dtype=torch.float64)
    torch.testing.assert_close(win(x)[0], full(x)[0])
    assert (win(torch.randn(2, 100, dtype=torch.float64))[0].shape) == (2, 100, 5)


@pytest.mark.parametrize("mixer", AUDIO_MIXERS)
@pytest.mark.parametrize("length", [5, 60])
def test_state_at_is_shaped_like_a_streamed_state(mixer, length):
    model = _model(mixer).float()
    _, real = stream(model, torch.randn(2, length), chunk=9)
    fake = model.state_at(2, length)
    assert tensor_bytes(fake) == tensor_bytes(real) == 4 * 2 * model.state_size(length)
    for a, b in zip(fake, real, strict=True):
        if isinstance(b, WindowKVCache):
            assert a.k.shape == b.k.shape and a.length == b.length == length
        else:
            assert a["s"].shape == b["s"].shape and a["s"].dtype == b["s"].dtype


def test_state_sizes_by_formula():
    s4d = WaveformModel(3, d_model=16, n_layers=2, mixer="s4d", d_state=8)
    att = WaveformModel(3, d_model=16, n_layers=2, mixer="attention", n_heads=2)
    win = WaveformModel(3, d_model=16, n_layers=2, mixer="window", window=100)
    for t in (1, 1000, 16000):
        assert s4d.state_size(t) == 2 * 16 * 8
        assert att.state_size(t) == 2 * 2 * t * 16
        assert win.state_size(t) == 2 * 2 * min(t, 99) * 16


def test_streaming_cost_reports_bytes_and_times():
    torch.manual_seed(0)
    pos = [0.0, 0.01, 0.04]
    costs = {}
    for mixer in AUDIO_MIXERS:
        model = WaveformModel(17, d_model=8, mixer=mixer, **MIXER_ARGS[mixer])
        costs[mixer] = c = streaming_cost(model, pos, chunk=16, sample_rate=16000, repeats=1)
        assert isinstance(c, StreamCost) and c.seconds == pos
        assert all(t > 0 for t in c.chunk_seconds)
        assert c.real_time_factor == pytest.approx([t / 0.001 for t in c.chunk_seconds])
        assert c.held_bytes == [4 * model.state_size(round(s * 16000)) for s in pos]
    assert len(set(costs["s4d"].held_bytes)) == 1
    assert costs["attention"].held_bytes == [0, 2 * 2 * 160 * 8 * 4, 2 * 2 * 640 * 8 * 4]
    assert costs["window"].held_bytes[1:] == [2 * 2 * 23 * 8 * 4] * 2


def test_tensor_bytes():
    cache = WindowKVCache(1, None, 2, 4)
    cache.update(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4))
    value = {"a": torch.zeros(3, dtype=torch.float16), "b": [cache, None, 7], "c": (torch.ones(2),)}
    assert tensor_bytes(value) == 6 + 2 * 3 * 2 * 4 * 4 + 8
    assert tensor_bytes(None) == 0


def test_audio_bad_input():
    with pytest.raises(ValueError, match="mixer"):
        WaveformModel(3, mixer="lstm")
    with pytest.raises(ValueError, match="window"):
        WaveformModel(3, mixer="window")
    with pytest.raises(ValueError, match="window is for"):
        WaveformModel(3, mixer="s4d", window=10)
    model = WaveformModel(3, d_model=8)
    with pytest.raises(ValueError, match="audio must have 2"):
        model(torch.randn(10))
    with pytest.raises(ValueError, match="one entry per layer"):
        model(torch.randn(1, 10), [None])
    with pytest.raises(ValueError, match="chunk"):
        stream(model, torch.randn(1, 10), chunk=0)
    with pytest.raises(TypeError, match="state_at"):
        streaming_cost(torch.nn.Linear(2, 2), [1.0], chunk=4)
    with pytest.raises(ValueError, match="seconds"):
        streaming_cost(model, [], chunk=4)
