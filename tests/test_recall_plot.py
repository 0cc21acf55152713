"""The recall trade-off plot and table draw what the records say."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from effarch.experiments.recall import plot_recall_tradeoff, recall_table  # noqa: E402

RECORDS = [
    {"mixer": "attention", "state_size": 8192, "accuracy": 1.0, "infer_tokens_per_s": 1e5,
     "params": 100},
    {"mixer": "deltanet", "state_size": 2048, "accuracy": 0.9, "infer_tokens_per_s": 2e5,
     "params": 90},
    {"mixer": "deltanet", "state_size": 512, "accuracy": 0.4, "infer_tokens_per_s": 3e5,
     "params": 80},
]  # fmt: skip


def test_one_series_per_mixer_sorted_by_state_size():
    fig = plot_recall_tradeoff(RECORDS, title="t")
    ax_s, ax_t = fig.axes
    lines = {line.get_label(): line for line in ax_s.get_lines()}
    assert set(lines) == {"softmax attention", "DeltaNet"}
    assert list(lines["DeltaNet"].get_xdata()) == [512, 2048]
    assert list(lines["DeltaNet"].get_ydata()) == [0.4, 0.9]
    assert list(ax_t.get_lines()[1].get_xdata()) == [3e5, 2e5]
    assert ax_s.get_xscale() == "log" and "accuracy" in ax_s.get_ylabel()


def test_table_lists_every_record():
    table = recall_table(RECORDS)
    assert table.count("DeltaNet") == 2 and "8,192" in table and "0.400" in table


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="non-empty list"):
        plot_recall_tradeoff([])
    with pytest.raises(ValueError, match=r"records\[0\] must be a mapping with the keys"):
        recall_table([{"mixer": "gla"}])
