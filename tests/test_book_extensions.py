"""The book's own Sphinx extensions (scripts/sphinx_ext), each on a two-page Sphinx project
built here: what each changes in the doctrees Sphinx stores and in the pages it writes."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
from docutils import nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "sphinx_ext"))

API_PAGE = """# An API page

```{eval-rst}
.. py:function:: mix(q, k, v)

   Mix the values.

   .. py:data:: scale
      :type: float

      A nested description, two levels below the block.
```
"""


def build(tmp_path: Path, extensions: list[str], pages: dict[str, str], **config) -> Path:
    """Build ``pages`` (name: MyST or notebook JSON) with Sphinx; return the output dir."""
    from sphinx.application import Sphinx

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(parents=True)
    toc = "\n".join(Path(name).stem for name in pages)
    (src / "index.md").write_text(f"# Index\n\n```{{toctree}}\n{toc}\n```\n")
    for name, text in pages.items():
        (src / name).write_text(text)
    app = Sphinx(str(src), None, str(out), str(out / ".doctrees"), "html",
                 confoverrides={"extensions": extensions, "nb_execution_mode": "off",
                                **config},
                 status=None, warning=None, freshenv=True)  # fmt: skip
    app.build()
    assert app.statuscode == 0
    return out


def foreign_documents(doctree_file: Path) -> int:
    """How many nodes of a stored doctree name a document other than their page's."""
    doctree = pickle.loads(doctree_file.read_bytes())
    return sum(
        1 for node in doctree.findall() if node.__dict__.get("_document") not in (None, doctree)
    )


def test_api_doctrees_carry_no_build_environment(tmp_path):
    """Nodes parsed by an eval-rst block keep myst-parser's inner document, whose settings
    hold Sphinx's build environment; nested_documents points them at their page, so the
    pickled page no longer holds the environment."""
    from nested_documents import reattach_nested_nodes

    plain = build(tmp_path / "plain", ["myst_parser"], {"api.md": API_PAGE})
    stored = plain / ".doctrees" / "api.doctree"
    if foreign_documents(stored) == 0:
        pytest.skip("myst-parser no longer leaves nested documents: the extension can go")
    assert b"BuildEnvironment" in stored.read_bytes()

    fixed = build(tmp_path / "fixed", ["myst_parser", "nested_documents"], {"api.md": API_PAGE})
    stored_fixed = fixed / ".doctrees" / "api.doctree"
    assert foreign_documents(stored_fixed) == 0
    assert b"BuildEnvironment" not in stored_fixed.read_bytes()
    assert stored_fixed.stat().st_size < stored.stat().st_size / 2
    # the same page, written from either doctree
    assert (plain / "api.html").read_text() == (fixed / "api.html").read_text()

    # and the function itself, on a tree built by hand
    page, inner = nodes.document(None, None), nodes.document(None, None)
    para = nodes.paragraph()
    para.document = inner
    page += nodes.section("", para)
    assert reattach_nested_nodes(page) == 1
    assert para.document is page


def notebook(cells: list[tuple[str, list[str]]]) -> str:
    """A notebook of code cells (source, tags) without outputs."""
    return json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}",
                   "metadata": {"tags": tags}, "outputs": [], "source": source}
                  for i, (source, tags) in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    })  # fmt: skip


def test_students_edition_leaves_solutions_out_of_pages_and_downloads(tmp_path):
    """With effarch_students_edition the cells tagged `solution` leave the page and the
    notebook offered for download; without it, both keep them."""
    page = "# Exercises\n\n" + "Exercise 1 asks for a number."
    nb = notebook([
        ("x = 1  # the exercise's set-up", []),
        ("# Solution, exercise 1: the answer\nanswer = 42", ["solution", "hide-cell"]),
        ("y = 2  # after the solution", ["hide-input"]),
    ])  # fmt: skip
    md_nb = json.loads(nb)
    md_nb["cells"].insert(0, {"cell_type": "markdown", "id": "m", "metadata": {}, "source": page})
    pages = {"ex.ipynb": json.dumps(md_nb)}
    exts = ["myst_nb", "students_edition"]
    # as jupyter-book sets them: notebooks downloadable under their own name
    suffixes = {"source_suffix": {".md": "myst-nb", ".ipynb": "myst-nb"},
                "html_sourcelink_suffix": ""}  # fmt: skip
    full = build(tmp_path / "full", exts, pages, **suffixes)
    student = build(tmp_path / "student", exts, pages, effarch_students_edition=True, **suffixes)

    for out, kept in ((full, True), (student, False)):
        html = (out / "ex.html").read_text()
        assert ("Solution, exercise 1" in html) is kept
        assert "the exercise" in html and "after the solution" in html
        assert "Exercise 1 asks" in html
        sources = json.loads((out / "_sources" / "ex.ipynb").read_text())
        texts = ["".join(c["source"]) for c in sources["cells"]]
        assert any("Solution, exercise 1" in t for t in texts) is kept
        assert len(texts) == (4 if kept else 3)
