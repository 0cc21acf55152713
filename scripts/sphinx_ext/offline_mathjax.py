"""Serve MathJax from the book itself, so that formulas typeset offline (a classroom network,
a local build on a train) and the browser test can check every one of them.

MathJax 3 comes from the ``django-static-mathjax`` wheel on PyPI (an unmodified copy of
MathJax's distribution, no Django needed; installed with the ``book`` extra). Its single-file
``es5/tex-svg.js`` component (TeX input, SVG output, fonts inside) is copied into the built
site's ``_static/mathjax/`` with MathJax's licence, and pages load it from there instead of a
CDN.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx

COMPONENT = "tex-svg.js"
TARGET = "mathjax"  # under _static


def _mathjax_dir() -> Path:
    try:
        import mathjax  # the django-static-mathjax distribution
    except ImportError as err:  # pragma: no cover - the book extra installs it
        raise RuntimeError(
            "the book serves MathJax itself: pip install 'effarch[book]' "
            "(it brings django-static-mathjax)"
        ) from err
    return Path(next(iter(mathjax.__path__))) / "static" / "mathjax"


def _configure(app: Sphinx) -> None:
    app.config.mathjax_path = f"{TARGET}/{COMPONENT}"  # relative to _static


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = _mathjax_dir()
    target = Path(app.outdir) / "_static" / TARGET
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "es5" / COMPONENT, target / COMPONENT)
    shutil.copy2(source / "LICENSE", target / "LICENSE")


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("builder-inited", _configure)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
