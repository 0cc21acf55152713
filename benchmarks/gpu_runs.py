"""The book's GPU-size stored runs in one call, each in its own process under a time limit.

    python benchmarks/gpu_runs.py --out gpu_runs            # on a CUDA machine
    python benchmarks/gpu_runs.py --smoke --out /tmp/runs   # tiny sizes on any machine

``benchmarks/gpu_suite.py`` checks the kernels and times them; this script produces the
stored cards that the pages show beside their CPU ones: chapter 9.1's decode slopes and
every-family table, chapter 6.1's hybrid decode slopes, at the contexts where a GPU's
memory bandwidth, not call overhead, sets a decoding step. Each run is a
``python -m effarch.experiments ...`` command with a time limit, so one that overruns is
stopped and reported instead of taking the others' time. Its card lands in ``--out`` as
``<name>.json`` (commit it beside the CPU card, ``effarch/experiments/<name>.json``), and
``runs.md`` lists what ran, for how long, with which exit status, on which card.
``--smoke`` runs the same commands at tiny sizes on the CPU, to check the script itself;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# name -> (arguments of `python -m effarch.experiments`, seconds allowed) on a GPU
RUNS: dict[str, tuple[list[str], int]] = {
    "every_family_decode_gpu": (
        "every-family-decode --device cuda --contexts 4096 16384 32768 --batch 32".split(),
        240,
    ),
    "hybrid_decode_gpu": (
        "hybrid-decode --device cuda --contexts 4096 16384 65536 --batch 64".split(),
        150,
    ),
    "every_family_gpu": (
        "every-family --device cuda --lengths 1024 2048 4096 8192 "
        "--contexts 1024 4096 16384 32768".split(),
        300,
    ),
}
# the same commands at sizes a CPU runs in seconds
SMOKE: dict[str, tuple[list[str], int]] = {
    "every_family_decode_gpu": (
        "every-family-decode --names MHA NSA --contexts 16 48 --batch 2".split(),
        120,
    ),
    "hybrid_decode_gpu": ("hybrid-decode --contexts 16 48 --batch 2".split(), 120),
    "every_family_gpu": (
        "every-family --names MHA GLA --steps 3 --lengths 32 64 --contexts 16 32".split(),
        120,
    ),
}


def card_name() -> str:
    """The GPU's name, or ``cpu``."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_all(out: Path, runs: dict[str, tuple[list[str], int]]) -> list[dict[str, object]]:
    """Run each command with its time limit; return one record per run."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (args, limit) in runs.items():
        target = out / f"{name}.json"
        cmd = [sys.executable, "-m", "effarch.experiments", *args, "--out", str(target)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            status, tail = str(done.returncode), (done.stdout + done.stderr)[-400:]
        except subprocess.TimeoutExpired:
            status, tail = f"stopped after {limit} s", ""
        seconds = time.perf_counter() - start
        record = {"name": name, "status": status, "seconds": seconds, "wrote": target.exists()}
        records.append({**record, "command": " ".join(args), "tail": tail})
        print(f"{name}: exit {status} in {seconds:.0f} s", flush=True)
    return records


def report(records: list[dict[str, object]], card: str) -> str:
    """The ``runs.md`` table."""
    lines = [f"GPU-size runs on {card}", "", "| run | exit | seconds | card written | command |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['wrote']} "
                     f"| `{r['command']}` |")  # fmt: skip
    for r in records:  # what a failed run said last
        if r["status"] != "0" and r["tail"]:
            lines += ["", f"{r['name']}:", "```", str(r["tail"]).strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from _checkout import use_source_checkout  # beside this script

    use_source_checkout()  # the experiments' subprocesses import effarch without an install
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_runs"), help="folder for the cards")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), default=None, help="these runs")
    args = p.parse_args(argv)
    runs = SMOKE if args.smoke else RUNS
    runs = {n: r for n, r in runs.items() if args.only is None or n in args.only}
    records = run_all(args.out, runs)
    text = report(records, card_name())
    (args.out / "runs.md").write_text(text)
    print(text)
    return 0 if all(r["status"] == "0" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
