"""Chapter 8.1: scan orders over a grid, cross-scan and cross-merge, Q-Shift, patch embedding,
the grid mixers against direct formulas, and the line task's labels against a loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effarch.tasks import longest_run, planted_lines
from effarch.vision import (
    SCAN_ORDERS,
    SCANS,
    GridMixer,
    PatchEmbed,
    VisionClassifier,
    cross_merge,
    cross_scan,
    from_sequence,
    q_shift,
    scan_order,
    to_sequence,
    vision_classifier,
)


def test_scan_orders_by_hand():
    assert scan_order(3, 3, "raster").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert scan_order(3, 3, "snake").tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert scan_order(3, 3, "column").tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert scan_order(3, 3, "column_snake").tolist() == [0, 3, 6, 7, 4, 1, 2, 5, 8]
    assert scan_order(2, 3, "column").tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("order", SCAN_ORDERS)
def test_every_order_is_a_permutation_and_round_trips(order):
    x = torch.randn(2, 3, 5, 4)
    idx = scan_order(3, 5, order)
    assert sorted(idx.tolist()) == list(range(15))
    assert torch.equal(from_sequence(to_sequence(x, order), 3, 5, order), x)


def test_cross_scan_reads_rows_columns_and_both_reversed_and_merge_inverts_it():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    s = cross_scan(x)
    rows = x.reshape(2, 12, 5)
    cols = x.transpose(1, 2).reshape(2, 12, 5)  # column-major, an independent formula
    assert torch.equal(s[:, 0], rows) and torch.equal(s[:, 1], cols)
    assert torch.equal(s[:, 2], rows.flip(1)) and torch.equal(s[:, 3], cols.flip(1))
    assert torch.allclose(cross_merge(s, 3, 4), 4 * x)
    # merge of four different outputs: each mapped back to its own grid position
    y = torch.randn(2, 4, 12, 5, dtype=torch.float64)
    want = (
        y[:, 0].reshape(2, 3, 4, 5)
        + y[:, 1].reshape(2, 4, 3, 5).transpose(1, 2)
        + y[:, 2].flip(1).reshape(2, 3, 4, 5)
        + y[:, 3].flip(1).reshape(2, 4, 3, 5).transpose(1, 2)
    )
    assert torch.allclose(cross_merge(y, 3, 4), want)


def test_q_shift_equals_a_loop_over_pixels():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    mu = torch.rand(8, dtype=torch.float64)
    want = torch.zeros_like(x)
    for r in range(3):
        for c in range(4):
            for ch in range(8):
                dr, dc = [(0, -1), (0, 1), (-1, 0), (1, 0)][ch // 2]  # left, right, up, down
                rr, cc = r + dr, c + dc
                if 0 <= rr < 3 and 0 <= cc < 4:
                    want[:, r, c, ch] = x[:, rr, cc, ch]
    assert torch.allclose(q_shift(x), want)
    assert torch.allclose(q_shift(x, mu), x + mu * (want - x))
    with pytest.raises(ValueError, match="divisible by 4"):
        q_shift(torch.randn(1, 2, 2, 6))


def test_patch_embed_is_a_strided_convolution():
    torch.manual_seed(0)
    pe = PatchEmbed(8, 2, 3, 16).double()
    img = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = pe.proj.weight.reshape(16, 3, 2, 2)  # (c i j) flattening
    conv = F.conv2d(img, w, pe.proj.bias, stride=2).permute(0, 2, 3, 1)
    assert torch.allclose(pe(img), conv + pe.pos)
    with pytest.raises(ValueError, match="must divide"):
        PatchEmbed(8, 3, 1, 4)


def _run(m, seq):
    out = m(seq)
    return out[0] if isinstance(out, tuple) else out


def test_grid_mixers_equal_their_mixers_run_on_the_orders_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    rows, cols = x.reshape(2, 12, 8), x.transpose(1, 2).reshape(2, 12, 8)
    m = GridMixer(8, "raster").double()
    assert torch.allclose(m(x), _run(m.mixers[0], rows).reshape(2, 3, 4, 8))
    m = GridMixer(8, "column").double()
    got = m(x)
    want = _run(m.mixers[0], cols).reshape(2, 4, 3, 8).transpose(1, 2)
    assert torch.allclose(got, want)
    m = GridMixer(8, "bidirectional").double()
    f, b = m.mixers
    want = _run(f, rows) + _run(b, rows.flip(1)).flip(1)
    assert torch.allclose(m(x), want.reshape(2, 3, 4, 8))
    m = GridMixer(8, "cross").double()
    ys = [_run(mix, s) for mix, s in zip(m.mixers, (rows, cols, rows.flip(1), cols.flip(1)),
                                          strict=True)]  # fmt: skip
    want = (ys[0].reshape(2, 3, 4, 8) + ys[1].reshape(2, 4, 3, 8).transpose(1, 2)
            + ys[2].flip(1).reshape(2, 3, 4, 8)
            + ys[3].flip(1).reshape(2, 4, 3, 8).transpose(1, 2))  # fmt: skip
    assert torch.allclose(m(x), want)


def test_a_single_scan_is_causal_in_its_order_and_attention_sees_everything():
    torch.manual_seed(0)
    for scan, sees_later in (("raster", False), ("column", False), ("bidirectional", True),
                             ("attention", True)):  # fmt: skip
        m = GridMixer(8, scan).double()
        x = torch.randn(1, 3, 3, 8, dtype=torch.float64)
        x2 = x.clone()
        x2[0, 2, 2] += 1.0  # the last token of both raster and column orders
        d = (m(x2) - m(x)).abs().sum(-1)[0]
        assert (d[0, 0] > 1e-9) == sees_later, scan


def test_attention_mixer_is_permutation_equivariant_without_positions():
    torch.manual_seed(0)
    m = GridMixer(8, "attention").double()
    x = torch.randn(2, 3, 3, 8, dtype=torch.float64)
    perm = torch.randperm(9)
    seq = x.reshape(2, 9, 8)
    out = m(x).reshape(2, 9, 8)
    out_p = m(seq[:, perm].reshape(2, 3, 3, 8)).reshape(2, 9, 8)
    assert torch.allclose(out_p, out[:, perm])


@pytest.mark.parametrize("scan", SCANS)
def test_classifiers_match_a_parameter_budget_and_classify(scan):
    model = vision_classifier(scan, 20000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 20000) < 0.25 * 20000, (scan, n)  # widths step by 4
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_vision_rejects_bad_input():
    with pytest.raises(ValueError, match="scan must be one of"):
        GridMixer(8, "spiral")
    with pytest.raises(ValueError, match="order must be one of"):
        scan_order(2, 2, "diagonal")
    with pytest.raises(ValueError, match="images"):
        VisionClassifier("raster")(torch.rand(8, 8))
    with pytest.raises(ValueError, match="h \\* w"):
        from_sequence(torch.randn(1, 5, 2), 2, 2)
    with pytest.raises(ValueError, match="4 directions"):
        cross_merge(torch.randn(1, 2, 4, 3), 2, 2)


def test_line_labels_equal_a_loop_and_the_planted_line_is_there():
    g = torch.Generator().manual_seed(0)
    for axis in ("vertical", "horizontal"):
        x, y = planted_lines(200, axis=axis, generator=g)
        img = x[:, 0].bool()
        for i in range(200):
            grid = img[i] if axis == "horizontal" else img[i].T
            best = 0
            for row in grid.tolist():
                run = 0
                for p in row:
                    run = run + 1 if p else 0
                    best = max(best, run)
            assert int(longest_run(img[i : i + 1], axis)) == best
            assert int(y[i]) == (best >= 4)
        either = torch.maximum(longest_run(img, "vertical"), longest_run(img, "horizontal"))
        assert bool((either >= 4).all())  # every image holds its planted segment
        assert 0.35 < y.float().mean() < 0.7


def test_longest_run_needs_three_dimensional_images():
    x, _ = planted_lines(4, generator=torch.Generator().manual_seed(0))  # [4, 1, 8, 8]
    with pytest.raises(ValueError, match=r"images must have 3 dimensions, got 4"):
        longest_run(x)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        longest_run(x[:, 0].tolist())
    assert longest_run(x[:, 0]).shape == (4,)


def test_train_takes_images_with_a_loss_fn():
    from effarch.train import train

    torch.manual_seed(0)
    model = VisionClassifier("raster", d_model=8, n_layers=1)
    x, y = planted_lines(16, generator=torch.Generator().manual_seed(0))
    res = train(model, lambda step: (x, y), steps=3, progress=False,
                loss_fn=lambda m, i, t: F.cross_entropy(m(i), t))  # fmt: skip
    assert len(res.losses) == 3


def test_resolution_sweep_card():
    from effarch.experiments import vision_scans

    card = vision_scans.resolution_sweep([4, 6], kinds=("attention", "raster"))
    assert card["tokens"] == [16, 36]
    for key in ("time", "memory"):
        assert set(card[key]) == {"attention", "raster"}
        assert all(len(v) == 2 and min(v) > 0 for v in card[key].values())
    stored = vision_scans.stored_resolution()
    assert stored["tokens"] == [g * g for g in stored["grids"]]


def test_longest_run_works_on_the_images_device():
    """Its working tensors follow the images (a meta tensor stands in for a GPU one)."""
    out = longest_run(torch.zeros(2, 5, 5, dtype=torch.bool, device="meta"))
    assert out.device.type == "meta" and out.shape == (2,)
