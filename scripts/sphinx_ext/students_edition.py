"""The students' edition: the book without its exercise solutions.

With the Sphinx setting ``effarch_students_edition = True`` (``scripts/build_book.py
--student`` sets it) every notebook code cell tagged ``solution`` is left out of the pages,
of the search index and of the notebooks the pages offer for download. The cells are removed
when a page is written, not when it is read: the setting changes no doctree, so a students'
build reuses the doctrees of a build of the full book (``build_book.py`` copies them) and
only writes the pages again. Solutions are code cells: myst-nb renders a markdown cell
without its tags, so this extension could not find one on the page (the browser test's
``solution_cells`` checks that no markdown cell carries the tag).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

SOLUTION_TAG = "solution"
SOLUTION_CLASS = f"tag_{SOLUTION_TAG}"  # myst-nb gives a cell's container a class per tag
logger = logging.getLogger(__name__)


def drop_solution_cells(doctree: nodes.document) -> int:
    """Remove every notebook code cell tagged ``solution`` from a page; return how many."""
    cells = list(doctree.findall(lambda n: isinstance(n, nodes.Element)
                                 and SOLUTION_CLASS in n.get("classes", [])))  # fmt: skip
    for cell in cells:
        cell.parent.remove(cell)
    return len(cells)


def drop_solution_cells_from_notebook(notebook: Path) -> int:
    """Remove the cells tagged ``solution`` from a notebook file; return how many."""
    nb = json.loads(notebook.read_text())
    keep = [c for c in nb["cells"] if SOLUTION_TAG not in c.get("metadata", {}).get("tags", [])]
    dropped = len(nb["cells"]) - len(keep)
    if dropped:
        nb["cells"] = keep
        notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return dropped


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("effarch_students_edition", False, "html", types=[bool])
    dropped: list[int] = []

    def on_doctree_resolved(app: Sphinx, doctree: nodes.document, docname: str) -> None:
        if app.config.effarch_students_edition:
            dropped.append(drop_solution_cells(doctree))

    def on_build_finished(app: Sphinx, exception: Exception | None) -> None:
        if not app.config.effarch_students_edition:
            return
        # the copies of the notebooks that each page's download button offers, stripped
        # even after a failed build: the pages written by then offer theirs
        suffix = app.config.html_sourcelink_suffix or ""
        for notebook in sorted(Path(app.outdir, "_sources").rglob(f"*.ipynb{suffix}")):
            drop_solution_cells_from_notebook(notebook)
        if exception is None:
            logger.info("students' edition: %d solution cells left out", sum(dropped))

    app.connect("doctree-resolved", on_doctree_resolved)
    app.connect("build-finished", on_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
