"""The API reference's two adjustments to autodoc and napoleon.

**Cross-references.**
The API reference (``guide/api``) documents every object once, in the module that defines
it (``effarch.attention.mixture.moba_attention``), while docstrings name it where readers
import it from (``effarch.attention.moba_attention``) or relative to another module. When
Sphinx finds no target for a Python reference, this extension imports the name the
reference means, in the module context it was written in, and links to the documented
name of that same object. A reference it cannot place stays unresolved, so the strict build
still reports it.

**Docstrings of constants.** Napoleon reads the first line of a constant's or attribute's
docstring as ``type: description``, so "Token mixers by name: ..." would become a type
named "Token mixers by name". The package gives types as annotations, never there: an empty
comment is put before such a docstring, which napoleon then reads as a description only.

**Values of constants.** A constant's value is shown beside its name when it is short
(``MIN_CHUNK_SIZE = 16``); a long one (a registry of classes, a template) is left to its
docstring, since its repr would fill the page and change from build to build.
"""

from __future__ import annotations

import importlib
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.autodoc import AttributeDocumenter, DataDocumenter
from sphinx.util.inspect import object_description
from sphinx.util.nodes import make_refnode

_MISSING = object()
MAX_VALUE_CHARS = 80  # longer reprs of constants are not shown


def _long_value(documenter: DataDocumenter | AttributeDocumenter) -> bool:
    try:
        return len(object_description(documenter.object)) > MAX_VALUE_CHARS
    except ValueError:  # no repr
        return True


class _DataDocumenter(DataDocumenter):
    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or _long_value(self)


class _AttributeDocumenter(AttributeDocumenter):
    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or _long_value(self)


def _import(path: str) -> Any:
    """The object at a dotted ``path``: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _documented(env: BuildEnvironment) -> dict[int, list[str]]:
    """id(object) -> the documented names it has (built once per build)."""
    cache = getattr(env, "_effarch_api_index", None)
    if cache is None:
        cache = {}
        for name in env.get_domain("py").objects:
            obj = _import(name)
            if obj is not _MISSING:
                cache.setdefault(id(obj), []).append(name)
        env._effarch_api_index = cache
    return cache


def _resolve(
    app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    scopes = [f"{module}.{cls}" if module and cls else None]
    if module:  # the module the reference was written in, then its parent packages
        parts = module.split(".")
        scopes += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    scopes.append(None)
    objects = env.get_domain("py").objects
    for scope in dict.fromkeys(scopes):
        obj = _import(f"{scope}.{target}" if scope else target)
        if obj is _MISSING:
            continue
        # the same object under a documented name ending like the reference (a guard against
        # equal constants that happen to be one object)
        names = [
            n
            for n in _documented(env).get(id(obj), [])
            if n.split(".")[-1] == target.split(".")[-1]
        ]
        if not names:
            return None
        name = min(names, key=len)
        entry = objects[name]
        return make_refnode(
            app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
        )
    return None


def _no_inline_type(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in ("data", "attribute", "property") and any(line.strip() for line in lines):
        lines[:0] = ["..", ""]  # an empty comment, then the docstring as written


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(_DataDocumenter, override=True)
    app.add_autodocumenter(_AttributeDocumenter, override=True)
    app.connect("missing-reference", _resolve)
    # before napoleon's handler (priority 500)
    app.connect("autodoc-process-docstring", _no_inline_type, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
