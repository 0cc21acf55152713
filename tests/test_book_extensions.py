"""The book's own Sphinx extensions (scripts/sphinx_ext), each on a two-page Sphinx project
built here: what each changes in the doctrees Sphinx stores and in the pages it writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from docutils import nodes

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = str(ROOT / "scripts" / "sphinx_ext")


@pytest.fixture(autouse=True)
def book_extensions(monkeypatch):
    """The book's local extensions importable, for this file's tests only."""
    monkeypatch.syspath_prepend(EXTENSIONS)


API_PAGE = """# An API page

```{eval-rst}
.. py:function:: mix(q, k, v)

   Mix the values.

   .. py:data:: scale
      :type: float

      A nested description, two levels below the block.
```
"""


def build(
    tmp_path: Path,
    extensions: list[str],
    pages: dict[str, str],
    *,
    out: str = "out",
    doctrees: Path | None = None,
    **config,
) -> tuple[Path, list[str]]:
    """Build ``pages`` (name: MyST or notebook JSON), written to ``tmp_path/src`` if not
    there yet, into ``tmp_path/out`` with Sphinx, reusing the doctrees in ``doctrees`` when
    given; return the output folder and the pages Sphinx read."""
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace

    src, out_dir = tmp_path / "src", tmp_path / out
    src.mkdir(parents=True, exist_ok=True)
    toc = "\n".join(Path(name).stem for name in pages)
    sources = {"index.md": f"# Index\n\n```{{toctree}}\n{toc}\n```\n", **pages}
    for name, text in sources.items():
        if not (src / name).is_file() or (src / name).read_text() != text:
            (src / name).write_text(text)
    read: list[str] = []
    with docutils_namespace():
        app = Sphinx(str(src), None, str(out_dir), str(doctrees or out_dir / ".doctrees"), "html",
                     confoverrides={"extensions": extensions, "nb_execution_mode": "off",
                                    **config},
                     status=None, warning=None, freshenv=doctrees is None)  # fmt: skip
        app.connect("env-before-read-docs", lambda app, env, docnames: read.extend(docnames))
        app.build()
    assert app.statuscode == 0
    return out_dir, read


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

    plain, _ = build(tmp_path / "plain", ["myst_parser"], {"api.md": API_PAGE})
    stored = plain / ".doctrees" / "api.doctree"
    if foreign_documents(stored) == 0:
        pytest.skip("myst-parser no longer leaves nested documents: the extension can go")
    assert b"BuildEnvironment" in stored.read_bytes()

    fixed, _ = build(tmp_path / "fixed", ["myst_parser", "nested_documents"], {"api.md": API_PAGE})
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


def test_students_edition_leaves_solutions_out_of_pages_index_and_downloads(tmp_path):
    """With effarch_students_edition the code cells tagged `solution` leave the page, the
    search index and the notebook offered for download; without it, all three keep them.
    The students' build from the full build's doctrees reads no page again."""
    import shutil

    page = "# Exercises\n\n" + "Exercise 1 asks for a number."
    nb = notebook([
        ("x = 1  # the exercise's set-up", []),
        ("# Solution, exercise 1: zorbulate\nanswer = 42", ["solution", "hide-cell"]),
        ("y = 2  # after the solution", ["hide-input"]),
    ])  # fmt: skip
    md_nb = json.loads(nb)
    md_nb["cells"].insert(0, {"cell_type": "markdown", "id": "m", "metadata": {}, "source": page})
    pages = {"ex.ipynb": json.dumps(md_nb)}
    exts = ["myst_nb", "students_edition"]
    # as jupyter-book sets them: notebooks downloadable under their own name
    suffixes = {"source_suffix": {".md": "myst-nb", ".ipynb": "myst-nb"},
                "html_sourcelink_suffix": ""}  # fmt: skip
    full, read_full = build(tmp_path, exts, pages, **suffixes)
    assert sorted(read_full) == ["ex", "index"]
    doctrees = tmp_path / "student" / ".doctrees"
    shutil.copytree(full / ".doctrees", doctrees)  # what build_book.py --student does
    student, read_student = build(
        tmp_path, exts, pages, out="student", doctrees=doctrees,
        effarch_students_edition=True, **suffixes,
    )  # fmt: skip
    assert read_student == []  # written from the full build's doctrees

    for out, kept in ((full, True), (student, False)):
        html = (out / "ex.html").read_text()
        assert ("Solution, exercise 1" in html) is kept
        assert "the exercise" in html and "after the solution" in html
        assert "Exercise 1 asks" in html
        assert ('"zorbul"' in (out / "searchindex.js").read_text()) is kept  # stemmed
        sources = json.loads((out / "_sources" / "ex.ipynb").read_text())
        texts = ["".join(c["source"]) for c in sources["cells"]]
        assert any("Solution, exercise 1" in t for t in texts) is kept
        assert len(texts) == (4 if kept else 3)
