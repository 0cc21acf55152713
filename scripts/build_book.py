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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"  # jupyter-book's: html/ and the doctrees (.doctrees/) it read
STUDENT = BUILD / "student"  # the students' edition: html/, and _build/ while it builds
# in the full book's doctrees after a build that rendered the committed outputs
COMMITTED_OUTPUTS = BUILD / ".doctrees" / "effarch-committed-outputs"


def reuse_doctrees(target: Path) -> bool:
    """Start the students' edition from the doctrees of the last build of the full book,
    when that build rendered the committed outputs (``--no-execute``), as the students'
    edition does.

    Leaving the solutions out changes no doctree (``scripts/sphinx_ext/students_edition.py``
    removes them while writing), so Sphinx reads again only what changed since that build,
    and writes every page. After a build that executed the notebooks Sphinx would read
    everything again, so the students' own doctrees are kept instead.
    """
    if not COMMITTED_OUTPUTS.is_file():
        return False
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(COMMITTED_OUTPUTS.parent, target)
    return True


def build(execute: bool, *, student: bool = False) -> int:
    config = ROOT / "_config.yml"
    if not execute or student:
        cfg = yaml.safe_load(config.read_text())
        cfg["execute"]["execute_notebooks"] = "off"
        if student:
            cfg["sphinx"]["config"]["effarch_students_edition"] = True
        # local extensions are found relative to the config file, which moves into _build
        local = cfg.get("sphinx", {}).get("local_extensions", {})
        for name, path in local.items():
            local[name] = str((ROOT / path).resolve())
        config = BUILD / ("_config.student.yml" if student else "_config.no-execute.yml")
        config.parent.mkdir(exist_ok=True)
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT),
        "--config", str(config), "--builder", "html", "-W", "-n", "--keep-going",
    ]  # fmt: skip
    start = time.perf_counter()
    if student:
        cmd += ["--path-output", str(STUDENT)]
        reused = reuse_doctrees(STUDENT / "_build" / ".doctrees")
        print(f"== students' edition: {'from the full book' if reused else 'on its own'}")
    else:
        COMMITTED_OUTPUTS.unlink(missing_ok=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not student and not execute and rc == 0:
        COMMITTED_OUTPUTS.write_text("doctrees of a build that rendered the committed outputs\n")
    if student:
        out = STUDENT / "html"
        shutil.rmtree(out, ignore_errors=True)
        shutil.move(STUDENT / "_build" / "html", out)
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
