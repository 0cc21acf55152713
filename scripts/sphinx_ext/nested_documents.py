"""Point the nodes parsed from an ``{eval-rst}`` block at the page they belong to.

myst-parser parses an ``{eval-rst}`` block (the ``automodule`` of every API page) into a
docutils document of its own that shares the page's settings, then moves the top-level
nodes into the page. The nodes below them keep a reference to that other document, and
through its settings to Sphinx's whole build environment: every notebook's metadata and
widget state, the bibliography, the toctrees. Sphinx clears ``settings.env`` on the page's
own document only before it pickles the page, so each API page's doctree held a copy of the
environment (1.4 to 2.4 MB instead of tens of kB), unpickled again every time the page was
read back: twice per page when the pages are written from stored doctrees.

This extension points those nodes at the page's document when the page has been read,
before Sphinx pickles it. What is built does not change.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx


def reattach_nested_nodes(doctree: nodes.document) -> int:
    """Make ``doctree`` the document of every node in it that names another document;
    return how many nodes were re-pointed."""
    moved = 0
    for node in doctree.findall():
        other = node.__dict__.get("_document")
        if other is not None and other is not doctree:
            node.document = doctree
            moved += 1
    return moved


def _on_doctree_read(app: Sphinx, doctree: nodes.document) -> None:
    reattach_nested_nodes(doctree)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", _on_doctree_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
