"""Build the book with jupyter-book 1.x, strictly: any warning or failing cell is an error.

    python scripts/build_book.py              execute notebooks (cached in _build/.jupyter_cache)
    python scripts/build_book.py --no-execute render the outputs committed with the notebooks

EFFARCH_BOOK_EXECUTE=off has the same effect as --no-execute. Rendering the committed
outputs is what CI does, right after nbval has re-executed every notebook and checked
them, so each notebook runs once per CI run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def build(execute: bool) -> int:
    config = ROOT / "_config.yml"
    if not execute:
        cfg = yaml.safe_load(config.read_text())
        cfg["execute"]["execute_notebooks"] = "off"
        # local extensions are found relative to the config file, which moves into _build
        local = cfg.get("sphinx", {}).get("local_extensions", {})
        for name, path in local.items():
            local[name] = str((ROOT / path).resolve())
        config = ROOT / "_build" / "_config.no-execute.yml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT),
        "--config", str(config), "--builder", "html", "-W", "-n", "--keep-going",
    ]  # fmt: skip
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    mode = "executing notebooks (cached)" if execute else "rendering committed outputs"
    print(f"== book built in {time.perf_counter() - start:.0f} s, {mode}; exit code {rc}")
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="render committed outputs")
    args = parser.parse_args()
    execute = not args.no_execute and os.environ.get("EFFARCH_BOOK_EXECUTE", "cache") != "off"
    return build(execute)


if __name__ == "__main__":
    sys.exit(main())
