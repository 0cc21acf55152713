"""Build the book with jupyter-book 1.x, strictly: any warning or failing cell is an error.

    python scripts/build_book.py              execute notebooks (cached in _build/.jupyter_cache)
    python scripts/build_book.py --no-execute render the outputs committed with the notebooks
    python scripts/build_book.py --student    the students' edition: committed outputs, every
                                              exercise solution (cells tagged `solution`)
                                              left out; written to _build/student/html

EFFARCH_BOOK_EXECUTE=off has the same effect as --no-execute. Rendering the committed
outputs is what CI does, right after nbval has re-executed every notebook and checked
them, so each notebook runs once per CI run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOLUTION_TAG = "solution"
# what the book is made of: copied for the students' edition
BOOK_FILES = ("_config.yml", "_toc.yml", "intro.md", "references.bib")
BOOK_DIRS = ("chapters", "guide")


def drop_solutions(notebook: Path) -> int:
    """Remove the cells tagged ``solution`` from a notebook file; return how many."""
    nb = json.loads(notebook.read_text())
    keep = [c for c in nb["cells"] if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
    dropped = len(nb["cells"]) - len(keep)
    nb["cells"] = keep
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return dropped


def student_sources() -> Path:
    """A copy of the book's sources under _build/student/src without the solutions."""
    src = ROOT / "_build" / "student" / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for name in BOOK_FILES:
        shutil.copy2(ROOT / name, src / name)
    for name in BOOK_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("*checkpoint*"))
    dropped = sum(drop_solutions(nb) for nb in (src / "chapters").rglob("*.ipynb"))
    print(f"== students' edition: {dropped} solution cells left out")
    return src


def build(execute: bool, *, student: bool = False) -> int:
    source = student_sources() if student else ROOT
    config = source / "_config.yml"
    if not execute or student:
        cfg = yaml.safe_load(config.read_text())
        cfg["execute"]["execute_notebooks"] = "off"
        # local extensions are found relative to the config file, which moves into _build
        local = cfg.get("sphinx", {}).get("local_extensions", {})
        for name, path in local.items():
            local[name] = str((ROOT / path).resolve())
        config = ROOT / "_build" / ("_config.student.yml" if student else "_config.no-execute.yml")
        config.parent.mkdir(exist_ok=True)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "jupyter-book"), "build", str(source),
        "--config", str(config), "--builder", "html", "-W", "-n", "--keep-going",
    ]  # fmt: skip
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=source)
    if student:
        out = ROOT / "_build" / "student" / "html"
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(source / "_build" / "html", out)
        print(f"== students' edition: {out / 'index.html'}")
    mode = (
        "students' edition"
        if student
        else ("executing notebooks (cached)" if execute else "rendering committed outputs")
    )
    print(f"== book built in {time.perf_counter() - start:.0f} s, {mode}; exit code {rc}")
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="render committed outputs")
    parser.add_argument(
        "--student", action="store_true", help="leave out exercise solutions (tag: solution)"
    )
    args = parser.parse_args()
    execute = not args.no_execute and os.environ.get("EFFARCH_BOOK_EXECUTE", "cache") != "off"
    return build(execute, student=args.student)


if __name__ == "__main__":
    sys.exit(main())
