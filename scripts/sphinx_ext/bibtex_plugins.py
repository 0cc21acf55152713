"""Look pybtex's plugins up once per build, not once per citation.

sphinxcontrib-bibtex asks pybtex for its formatting style, labels, names and backend on
every ``{footcite}``, and pybtex finds a plugin by scanning the entry points of every
installed distribution (``importlib.metadata.entry_points``): about a fifth of the book's
build time, for the same few classes each time. pybtex looks in its runtime registry
(``pybtex.plugin.register_plugin``) before the entry points, so this extension loads
pybtex's entry points once, at setup, and registers the same classes there. What is built
does not change.
"""

from __future__ import annotations

from importlib.metadata import distributions
from typing import Any

import pybtex.plugin
from sphinx.application import Sphinx


def register_pybtex_entry_points() -> int:
    """Register every installed ``pybtex.*`` entry point (styles, backends, their aliases
    and file suffixes) as a pybtex runtime plugin; return how many."""
    seen = set()
    every = (ep for dist in distributions() for ep in dist.entry_points)
    for entry_point in every:
        key = entry_point.group, entry_point.name
        if not entry_point.group.startswith("pybtex."):
            continue
        if key in seen:  # a name two packages give: pybtex takes the first it finds
            continue
        seen.add(key)
        try:
            pybtex.plugin.register_plugin(
                entry_point.group, entry_point.name, entry_point.load(), force=True
            )
        except pybtex.plugin.PluginGroupNotFound:  # a group pybtex itself does not read
            seen.discard(key)
    return len(seen)


def setup(app: Sphinx) -> dict[str, Any]:
    register_pybtex_entry_points()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
