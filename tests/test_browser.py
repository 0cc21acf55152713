"""Build the book and read every page in a real (headless) Chromium.

The book is rendered from the outputs committed with the notebooks (nbval re-executes
and checks those in the same test run), served on 127.0.0.1, and loaded page by page.
For each page we assert its title, that every image decoded, that every formula was typeset
by MathJax (served by the book itself: the browser reaches nothing else) without a TeX
error, that no markdown table is left as raw ``| --- |`` text, that no cell shows a
traceback or an error, that each notebook page offers a Colab launch link and the static
state of its widgets, and that every internal link points at a page (and an anchor) that
exists.

Chromium is the system's (Debian's ``chromium``), driven through Playwright's
``executable_path``; no browser is ever downloaded. ``EFFARCH_CHROMIUM`` overrides the path.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
pytestmark = pytest.mark.browser


def chromium_path() -> str:
    for candidate in (
        os.environ.get("EFFARCH_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "the browser test needs Chromium: install Debian's `chromium` package "
        "(scripts/test.sh does this) or set EFFARCH_CHROMIUM to its path"
    )


def repository_url() -> str:
    import yaml

    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


@pytest.fixture(scope="module")
def book() -> Path:
    rc = subprocess.call([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute"])
    assert rc == 0, "the strict book build failed (warnings are errors): see the log above"
    return HTML


@pytest.fixture(scope="module")
def server(book):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test log readable
            pass

    handler = functools.partial(Quiet, directory=str(book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # nothing leaves the machine: no proxy, and no host name resolves but the
                # book's server (test_every_page_in_chromium checks that none was reached)
                "--no-proxy-server",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            ],
        )
        yield b
        b.close()


def content_pages(book: Path) -> list[str]:
    """Every HTML page of the book, relative to its root (assets and sources excluded)."""
    pages = []
    for path in sorted(book.rglob("*.html")):
        rel = path.relative_to(book).as_posix()
        if rel.split("/")[0] in {"_static", "_sources", "_images"}:
            continue
        pages.append(rel)
    return pages


def notebook_pages() -> dict[str, str]:
    """``{html page: notebook path in the repository}`` for every notebook in the book."""
    return {
        nb.relative_to(ROOT).with_suffix(".html").as_posix(): nb.relative_to(ROOT).as_posix()
        for nb in sorted((ROOT / "chapters").rglob("*.ipynb"))
        if ".ipynb_checkpoints" not in nb.parts
    }


def notebook_uses_widgets(notebook: str) -> bool:
    """Whether a notebook builds ipywidgets controls (directly or through ``explore``)."""
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "ipywidgets" in code or "explore(" in code


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id", "name") and v:
                self.ids.add(v)


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(page.read_text(errors="ignore"))
    return frozenset(parser.ids)


PAGE_REPORT = r"""async () => {
  // MathJax (served by the book itself) typesets after load: wait for it
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const maths = [...document.querySelectorAll('.math')];
  const article = (document.querySelector('main article, article, main') || document.body)
      .cloneNode(true);
  article.querySelectorAll('pre, code, .highlight').forEach(e => e.remove());
  const state = document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]');
  let stateIds = [];
  try { stateIds = Object.keys(JSON.parse(state.textContent).state || {}); } catch (e) {}
  const views = [...document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"]')].map(v => {
    try { return JSON.parse(v.textContent).model_id; } catch (e) { return null; } });
  const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src,
      ok: i.complete && i.naturalWidth > 0}));
  const outputs = [...document.querySelectorAll('.cell_output, .output')];
  const bad = [...document.querySelectorAll(
      '.output.error, .output.traceback, .output.stderr, .cell_output .stderr')];
  return {
    title: document.title,
    h1: (document.querySelector('main h1, article h1, h1') || {}).textContent || '',
    images: imgs,
    tracebacks: outputs.filter(o => /Traceback|Error:/.test(o.textContent)).length,
    errorOutputs: bad.map(o => o.textContent.slice(0, 200)),
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
    mathjax: !!(window.MathJax && MathJax.version),
    formulas: maths.length,
    untypeset: maths.filter(m => !m.querySelector('mjx-container'))
        .map(m => m.textContent.slice(0, 80)),
    texErrors: [...document.querySelectorAll('mjx-merror, [data-mjx-error]')]
        .map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 80)),
    rawTables: (article.innerText.match(/^.*\|\s*:?-{3,}:?\s*\|.*$/gm) || []),
    widgetViews: views,
    widgetState: stateIds,
  };
}"""


def test_every_page_in_chromium(book, server, browser):
    pages = content_pages(book)
    notebooks = notebook_pages()
    assert len(pages) >= 12, pages
    assert set(notebooks) <= set(pages), "every notebook must be a page of the book"
    book_title = __import__("yaml").safe_load((ROOT / "_config.yml").read_text())["title"]
    colab = f"https://colab.research.google.com/github/{urlsplit(repository_url()).path.strip('/')}"

    context = browser.new_context()
    # Nothing leaves the machine: Chromium resolves no host but the book's server (the
    # browser fixture's flags), so a page that depends on the network (fonts, a CDN) shows
    # it below as a missing image or an untypeset formula, and a request that reached
    # another host all the same is a problem. (Refusing requests through Playwright's
    # routing instead turns Chromium's HTTP cache off: every page fetched and compiled
    # MathJax and the theme's scripts again, a third of this test's time.)
    reached: list[str] = []
    context.on(
        "requestfinished",
        lambda request: (
            reached.append(request.url)
            if urlsplit(request.url).scheme in ("http", "https")
            and not request.url.startswith(server)
            else None
        ),
    )
    page = context.new_page()
    problems: list[str] = []
    internal_links: dict[str, set[str]] = {}
    report_rows = []
    for rel in pages:
        if 'http-equiv="Refresh"' in (book / rel).read_text()[:2000]:
            # jupyter-book's index.html redirects to the root page: follow it once
            page.goto(server + rel, wait_until="load")
            page.wait_for_url(f"{server}intro.html")
            continue
        response = page.goto(server + rel, wait_until="load")
        assert response is not None and response.ok, f"{rel}: HTTP {response and response.status}"
        r = page.evaluate(PAGE_REPORT)
        if not r["title"].strip():
            problems.append(f"{rel}: empty <title>")
        elif rel not in ("genindex.html", "search.html", "py-modindex.html"):
            heading = r["h1"].replace("#", "").strip()
            if not heading or heading not in r["title"] or book_title not in r["title"]:
                problems.append(f"{rel}: title {r['title']!r} lacks {heading!r} or the book title")
        for img in r["images"]:
            if not img["ok"]:
                problems.append(f"{rel}: image did not decode: {img['src']}")
        if r["tracebacks"] or r["errorOutputs"]:
            problems.append(f"{rel}: error output in a cell: {r['errorOutputs'] or 'Traceback'}")
        if r["formulas"] and not r["mathjax"]:
            problems.append(f"{rel}: {r['formulas']} formulas but MathJax did not load")
        for tex in r["untypeset"]:
            problems.append(f"{rel}: formula not typeset: {tex!r}")
        for err in r["texErrors"]:
            problems.append(f"{rel}: TeX error: {err!r}")
        for line in r["rawTables"]:
            problems.append(f"{rel}: a markdown table shown as raw text: {line[:80]!r}")
        if rel in notebooks:
            want = f"{colab}/blob/main/{notebooks[rel]}"
            if want not in r["links"]:
                problems.append(f"{rel}: no Colab launch link {want}")
            if notebook_uses_widgets(notebooks[rel]):
                if not r["widgetViews"]:
                    problems.append(f"{rel}: the notebook shows widgets, the page has none")
                for model in r["widgetViews"]:
                    if model not in r["widgetState"]:
                        problems.append(f"{rel}: widget {model} has no static state")
        for href in r["links"]:
            url = urljoin(server + rel, href)
            if url.startswith(server):
                internal_links.setdefault(url, set()).add(rel)
        report_rows.append((rel, len(r["images"]), len(r["links"]), r["formulas"]))

    for url, sources in sorted(internal_links.items()):
        parts = urlsplit(url)
        target = book / unquote(parts.path[len(urlsplit(server).path) :])
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"broken link {url} (from {sorted(sources)[0]})")
        elif parts.fragment and target.suffix == ".html":
            if unquote(parts.fragment) not in anchors(target):
                problems.append(f"missing anchor {url} (from {sorted(sources)[0]})")
    context.close()
    problems += [f"a request left the machine: {url}" for url in sorted(set(reached))]

    print(
        json.dumps(
            {
                "pages": len(report_rows),
                "notebook pages": len(notebooks),
                "images": sum(r[1] for r in report_rows),
                "formulas typeset": sum(r[3] for r in report_rows),
                "internal links checked": len(internal_links),
            }
        )
    )
    assert not problems, "\n".join(problems)


def test_launch_buttons_and_repository_links(book):
    page = (book / next(iter(notebook_pages()))).read_text()
    url = repository_url()
    assert "colab.research.google.com" in page
    assert f'href="{url}"' in page, "repository button"
    assert f"{url}/edit/main/" in page, "edit this page"


def test_stored_doctrees_hold_no_build_environment(book):
    """No page's stored doctree carries a pickled copy of Sphinx's build environment (the
    API pages did, through myst-parser's eval-rst documents: scripts/sphinx_ext/
    nested_documents.py), which a build that only writes pages would unpickle again."""
    doctrees = sorted((ROOT / "_build" / ".doctrees").rglob("*.doctree"))
    assert len(doctrees) > len(notebook_pages()), "the doctrees of the book build"
    carrying = [d.name for d in doctrees if b"BuildEnvironment" in d.read_bytes()]
    assert not carrying, carrying


def solution_cells() -> dict[str, list[str]]:
    """``{html page: [the heading comment of each solution cell]}``: every cell tagged
    ``solution`` opens with ``# Solution, exercise N: ...``, a line found nowhere else."""
    out = {}
    for page, notebook in notebook_pages().items():
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        heads = []
        for c in cells:
            if "solution" in c.get("metadata", {}).get("tags", []):
                # myst-nb renders a markdown cell without its tags: the students' edition
                # (scripts/sphinx_ext/students_edition.py) could not leave one out
                assert c["cell_type"] == "code", f"{notebook}: a {c['cell_type']} solution cell"
                first = "".join(c["source"]).strip().splitlines()[0]
                assert first.startswith("# Solution"), f"{notebook}: solution cell opens {first!r}"
                heads.append(first)
        if heads:
            out[page] = heads
    return out


def cell_sources(notebook: Path) -> str:
    """The source of every cell of a notebook file, one after another."""
    return "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"])


def test_students_edition_leaves_out_every_solution(book):
    """The students' build drops the cells tagged `solution`; the full book keeps them."""
    rc = subprocess.call([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--student"])
    assert rc == 0, "the students' edition failed to build"
    student = ROOT / "_build" / "student" / "html"
    solutions = solution_cells()
    assert solutions, "no notebook has an executed solution cell (tag: solution)"
    for page, heads in solutions.items():
        full, without = (book / page).read_text(), (student / page).read_text()
        # the notebook the page's download button offers
        source = Path("_sources", page).with_suffix(".ipynb")
        full_nb, student_nb = (cell_sources(out / source) for out in (book, student))
        for head in heads:
            assert head in full, f"{page}: {head!r} missing from the book"
            assert head not in without, f"{page}: {head!r} is in the students' edition"
            assert head in full_nb, f"{source}: {head!r} missing from the book's download"
            assert head not in student_nb, f"{source}: {head!r} is in the students' download"
