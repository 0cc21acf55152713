"""Keep every notebook's first cell equal to the shared setup block.

    python -m effarch.notebook sync            # rewrite chapters/**/*.ipynb
    python -m effarch.notebook sync --check    # exit 1 if any notebook is out of date

The repository URL is read from ``repository.url`` in ``_config.yml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import SIZES_MARKER, setup_cell


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder above ``start`` that holds ``_config.yml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_config.yml").is_file():
            return folder
    raise FileNotFoundError(f"no _config.yml in {here} or any folder above it")


def repository_url(root: Path) -> str:
    """``repository.url`` from the book's ``_config.yml``: its one home."""
    import yaml

    cfg = yaml.safe_load((root / "_config.yml").read_text())
    try:
        return str(cfg["repository"]["url"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{root / '_config.yml'} has no repository.url") from err


def expected_first_cell(current: str, repo_url: str) -> str:
    """The shared block followed by the notebook's own sizes (kept as they are)."""
    block = setup_cell(repo_url)
    if SIZES_MARKER in current:
        own = current[current.index(SIZES_MARKER) :]
    else:
        own = f"{SIZES_MARKER}\nSIZES = ctx.pick(small=dict(), large=dict())"
    return f"{block}\n{own}"


def sync(paths: list[Path], repo_url: str, *, check: bool) -> list[Path]:
    """Rewrite (or, with ``check``, only list) notebooks whose setup cell is out of date."""
    import nbformat

    stale = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code:
            stale.append(path)
            if not check:
                nb.cells.insert(0, nbformat.v4.new_code_cell(expected_first_cell("", repo_url)))
                nbformat.write(nb, path)
            continue
        want = expected_first_cell(code[0].source, repo_url)
        if code[0].source != want:
            stale.append(path)
            if not check:
                code[0].source = want
                nbformat.write(nb, path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effarch.notebook")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sync", help="make every notebook's first cell the shared setup block")
    p.add_argument("paths", nargs="*", type=Path, help="notebooks (default: chapters/**/*.ipynb)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    root = repo_root()
    paths = args.paths or sorted((root / "chapters").rglob("*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in p.parts and "_build" not in p.parts]
    stale = sync(paths, repository_url(root), check=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'updated'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
