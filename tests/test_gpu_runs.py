"""The GPU-size runs script, at its smoke sizes on the CPU: every command runs and writes
its card, and the smoke commands are the GPU ones at other sizes."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_runs  # noqa: E402


def test_smoke_runs_write_every_card(tmp_path):
    assert gpu_runs.main(["--smoke", "--out", str(tmp_path)]) == 0
    for name in gpu_runs.RUNS:
        card = json.loads((tmp_path / f"{name}.json").read_text())
        assert card["config"] and card["seconds"] > 0
    table = (tmp_path / "runs.md").read_text()
    assert table.count("| 0 |") == len(gpu_runs.RUNS)


def test_smoke_commands_mirror_the_gpu_ones():
    assert gpu_runs.SMOKE.keys() == gpu_runs.RUNS.keys()
    for name, (args, _) in gpu_runs.RUNS.items():
        smoke = gpu_runs.SMOKE[name][0]
        assert args[0] == smoke[0] and "--device" in args and "cuda" in args
        flags = {a for a in args if a.startswith("--")} - {"--device"}
        assert flags <= {a for a in smoke if a.startswith("--")}, name  # every flag exercised


def test_a_failed_run_is_reported_with_its_last_words(tmp_path):
    records = gpu_runs.run_all(tmp_path, {"broken": (["no-such-experiment"], 60)})
    assert records[0]["status"] != "0" and not records[0]["wrote"]
    assert "no-such-experiment" in gpu_runs.report(records, "cpu")


def test_a_checkout_without_an_install_imports_the_kernels(monkeypatch):
    import importlib.util

    import _checkout

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # nothing installed
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    root, shim = _checkout.use_source_checkout()
    assert root == str(ROOT) and sys.path[:2] == [root, shim]
    assert (Path(shim) / "effarch_kernels" / "limits.py").is_file()  # kernels/ under its name
    assert _checkout.os.environ["PYTHONPATH"].split(_checkout.os.pathsep) == [
        root,
        shim,
        "elsewhere",
    ]
