"""Packaging promises, the shared notebook setup, and the chapters' structure."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ipywidgets as widgets
import pytest
import torch

from effarch.notebook import (
    SIZES_MARKER,
    Context,
    default_profile,
    explore,
    setup,
    setup_cell,
)
from effarch.notebook.__main__ import expected_first_cell, repository_url, sync

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").rglob("*.ipynb"))


def test_effarch_imports_without_triton():
    """A meta-path hook makes `import triton` fail, as on a machine without it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import effarch, effarch.bench, effarch.attention, effarch.models, effarch_kernels\n"
        "import torch\n"
        "q = torch.randn(1, 8, 2, 4)\n"
        "print(effarch.attention.naive_attention(q, q, q).shape)\n"
        "assert 'triton' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([1, 8, 2, 4])" in out.stdout


def test_kernels_install_under_a_private_name():
    import effarch_kernels

    assert Path(effarch_kernels.__file__).resolve().parent == ROOT / "kernels"


def test_setup_seeds_everything():
    a = (setup(seed=3, quiet=True), torch.randn(4))
    b = (setup(seed=3, quiet=True), torch.randn(4))
    assert torch.equal(a[1], b[1])
    assert a[0].device.type in ("cpu", "cuda")


def test_profile_follows_device_and_override(monkeypatch):
    monkeypatch.delenv("EFFARCH_SIZE", raising=False)
    ctx = setup(quiet=True)
    assert ctx.profile == default_profile(ctx.device)
    if not torch.cuda.is_available():
        assert ctx.profile == "small" and ctx.dtype == torch.float32
    monkeypatch.setenv("EFFARCH_SIZE", "large")
    assert setup(quiet=True).profile == "large"
    monkeypatch.setenv("EFFARCH_SIZE", "huge")
    with pytest.raises(ValueError, match="profile must be one of"):
        setup(quiet=True)


def test_pick_returns_the_active_profile_and_checks_it():
    ctx = Context(torch.device("cpu"), "small", 0)
    sizes = ctx.pick(small=dict(T=256, reps=2), large=dict(T=8192, reps=9))
    assert (sizes.T, sizes.reps) == (256, 2)
    with pytest.raises(ValueError, match="missing"):
        ctx.pick(small=dict(T=1))
    with pytest.raises(ValueError, match="unknown profiles"):
        ctx.pick(small={}, large={}, huge={})
    # medium (a 16 GB GPU, float16) takes its own sizes, or large's when it has none
    medium = Context(torch.device("cpu"), "medium", 0)
    assert medium.dtype == torch.float16
    assert medium.pick(small=dict(T=1), large=dict(T=8192)).T == 8192
    assert medium.pick(small=dict(T=1), medium=dict(T=4096), large=dict(T=8192)).T == 4096


def test_default_profile_by_gpu_memory_and_bf16(monkeypatch):
    """A 16 GB T4 (no bf16) gets medium, an 80 GB H100 large, a CPU small."""
    from types import SimpleNamespace

    assert default_profile(torch.device("cpu")) == "small"
    for memory, bf16, want in [(16, False, "medium"), (80, True, "large"), (16, True, "medium")]:
        props = SimpleNamespace(total_memory=memory * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, p=props: p)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda b=bf16: b)
        assert default_profile(torch.device("cuda")) == want


def test_kernels_reason_says_why_a_kernel_cannot_run(monkeypatch):
    ctx = Context(torch.device("cpu"), "small", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in ctx.kernels


def test_explore_renders_defaults_and_redraws(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def fake_display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle() if display_id else None

    monkeypatch.setattr("IPython.display.display", fake_display)
    calls = []
    slider = widgets.IntSlider(value=3, min=1, max=9)
    explore(lambda n: calls.append(n) or f"n={n}", n=slider)
    assert calls == [3] and shown[-1] == ("display", "n=3")  # static rendering of the default
    slider.value = 7
    assert calls == [3, 7] and shown[-1] == ("update", "n=7")
    with pytest.raises(ValueError, match="at least one control"):
        explore(lambda: None)
    with pytest.raises(TypeError, match="ipywidgets value widget"):
        explore(lambda n: n, n=5)


def test_explore_turns_figures_into_static_images(monkeypatch):
    import matplotlib.pyplot as plt
    from IPython.display import Image

    shown = []
    monkeypatch.setattr(
        "IPython.display.display", lambda obj, display_id=False: shown.append(obj) or None
    )
    explore(lambda a: plt.subplots()[0], a=widgets.FloatSlider(value=1.0))
    assert isinstance(shown[-1], Image) and shown[-1].data[:4] == b"\x89PNG"
    assert plt.get_fignums() == []  # the figure was closed, not left to render twice


def test_setup_cell_template():
    with pytest.raises(ValueError, match="https"):
        setup_cell("git@example.org:x.git")
    cell = setup_cell("https://example.org/someone/effarch/")
    # Colab installs the release the book was run with, never the moving main branch
    import effarch

    assert f"git+https://example.org/someone/effarch@v{effarch.__version__}'" in cell
    assert "@v2.3.4'" in setup_cell("https://example.org/x", version="2.3.4")
    compile(cell.replace("get_ipython()", "None"), "<setup>", "exec")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_first_cell_is_the_shared_block(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = "".join(code[0]["source"])
    assert first == expected_first_cell(first, repository_url(ROOT))
    assert "SIZES = ctx.pick(" in first.split(SIZES_MARKER)[1]
    sources = ["".join(c["source"]) for c in code]
    assert not any("SIZES = " in s for s in sources[1:]), "sizes live in the first cell only"
    checked = [c for c in code if "NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c["outputs"] for c in checked)
    for c in code:
        for out in c["outputs"]:
            assert out["output_type"] != "error", f"{path.name} holds an error output"
            # a page shows what it means to (print, display, plt.show): a cell's trailing
            # expression leaves a stray repr on the website (a glued number, Text(...))
            assert out["output_type"] != "execute_result", (
                f"{path.name}, cell {c.get('id')}: its last line's value is shown; end it "
                "with a statement, or print or display what it should show"
            )


def test_sync_check_reports_and_fixes_a_stale_notebook(tmp_path):
    import nbformat

    stale = tmp_path / "stale.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"import os\n{SIZES_MARKER}\nSIZES = ctx.pick(a=1)")]
    nbformat.write(nb, stale)
    url = "https://example.org/someone/effarch"
    assert sync([stale], url, check=True) == [stale]
    assert sync([stale], url, check=False) == [stale]
    assert sync([stale], url, check=True) == []
    text = nbformat.read(stale, as_version=4).cells[0].source
    assert text.startswith(setup_cell(url)) and text.endswith("SIZES = ctx.pick(a=1)")


def test_repository_url_has_one_home():
    url = repository_url(ROOT)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    homes = []
    for name in tracked.stdout.split():
        path = ROOT / name
        if path.suffix in {".py", ".toml", ".yml", ".md", ".cfg", ".txt"} and path.is_file():
            if url in path.read_text(errors="ignore"):
                homes.append(name)
    assert homes == ["_config.yml"], homes


def test_importing_effarch_leaves_triton_unimported():
    """Triton fixes interpreter-or-GPU on its first import, so effarch must not import it:
    the notebook setup sets TRITON_INTERPRET on a CPU before any kernel is touched."""
    code = "import sys, effarch, effarch.notebook; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_setup_turns_on_the_triton_interpreter_on_a_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ctx = setup(quiet=True)
    import os

    if ctx.device.type == "cpu":
        assert os.environ["TRITON_INTERPRET"] == "1"
    else:
        assert "TRITON_INTERPRET" not in os.environ


def test_every_subpackage_is_listed_in_pyproject():
    """A subpackage missing from pyproject's list would be absent from a non-editable install."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "effarch").rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"


def test_kernel_source_reads_the_file_without_triton():
    """The source a page shows comes from the file's text, so a reader without Triton sees
    it too; where Triton is present it equals what inspect finds."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from effarch.notebook import kernel_source\n"
        "text = kernel_source('flash_attention', '_fwd_kernel', start='pid_m = ')\n"
        "assert 'triton' not in sys.modules\n"
        "assert 'effarch_kernels.flash_attention' not in sys.modules\n"
        "print(text.splitlines()[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pid_m = tl.program_id(0)"


def test_kernel_source_matches_inspect_and_checks_its_arguments():
    import inspect

    pytest.importorskip("triton")
    from effarch_kernels import flash_attention

    from effarch.notebook import kernel_source

    fn = flash_attention._fwd_kernel
    assert kernel_source("flash_attention", "_fwd_kernel") == inspect.getsource(fn.fn)
    with pytest.raises(ValueError, match="kernel must be a function of flash_attention"):
        kernel_source("flash_attention", "no_such_kernel")
    with pytest.raises(ValueError, match="module must name a file"):
        kernel_source("no_such_module", "_fwd_kernel")
    with pytest.raises(ValueError, match="does not occur"):
        kernel_source("flash_attention", "_fwd_kernel", start="not in the kernel")


def test_glue_hands_values_to_myst_nb_or_passes_them_through(monkeypatch):
    from effarch.notebook import glue

    shown = []
    fake = type(sys)("myst_nb")
    fake.glue = lambda name, value, display=True: shown.append((name, value, display))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    assert glue("speedup", 3.5) is None  # a cell ending in glue(...) prints nothing
    assert shown == [("speedup", 3.5, False)]
    # NumPy and torch scalars arrive as Python numbers, so `{glue:text}`x:.2f`` formats them
    import numpy as np

    glue("p", np.float64(0.25))
    glue("n", torch.tensor(7))
    assert shown[1:] == [("p", 0.25, False), ("n", 7, False)]
    assert type(shown[1][1]) is float and type(shown[2][1]) is int
    shown[1:] = []
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # not installed: a plain pass-through
    assert glue("speedup", 4.0) is None and len(shown) == 1
    with pytest.raises(ValueError, match="name must be"):
        glue("not a name", 1)


def test_drop_solutions_keeps_every_other_cell(tmp_path):
    import nbformat

    sys.path.insert(0, str(ROOT / "scripts" / "sphinx_ext"))
    from students_edition import drop_solution_cells_from_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("Exercise 1: predict, then measure."),
        nbformat.v4.new_code_cell("# Solution, exercise 1\nx = 1", metadata={"tags": ["solution"]}),
        nbformat.v4.new_code_cell("y = 2", metadata={"tags": ["hide-input"]}),
    ]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert drop_solution_cells_from_notebook(path) == 1
    kept = nbformat.read(path, as_version=4).cells
    assert [c.source for c in kept] == ["Exercise 1: predict, then measure.", "y = 2"]


def test_learning_path_page_is_what_the_pages_say():
    """guide/learning_path.{md,svg} are generated from each page's prerequisites line; they
    must be up to date, and the prerequisites must form a path without cycles."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "learning_path.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_learning_path_finds_a_cycle(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import learning_path

    chapters = tmp_path / "chapters" / "x"
    chapters.mkdir(parents=True)

    def page(name: str, needs: str) -> None:
        nb = {
            "cells": [
                {
                    "cell_type": "markdown",
                    "metadata": {},
                    "source": [f"# {name}\n", f"**Prerequisites:** [{needs}]({needs}.ipynb)\n"],
                }
            ]
        }
        (chapters / f"{name}.ipynb").write_text(json.dumps(nb))

    page("a", "b")
    page("b", "a")
    monkeypatch.setattr(learning_path, "ROOT", tmp_path)
    with pytest.raises(ValueError, match="cycle"):
        learning_path.graph()


def test_checked_cells_start_with_the_marker():
    """nbval compares a cell's whole output when NBVAL_CHECK_OUTPUT appears anywhere in it,
    so a marker below printed measurements would compare those to the last digit (and fail
    on another CPU). A checked cell starts with the marker (after its "# Solution" line, in a
    solution); what is not checked is its own cell."""
    import json

    root = Path(__file__).resolve().parents[1]
    late = []
    for path in sorted((root / "chapters").glob("*/*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            lines = "".join(cell["source"]).split("\n")
            # a solution cell opens with its "# Solution" line (the student edition needs it)
            first = 2 if lines[0].startswith("# Solution") else 1
            if cell["cell_type"] == "code" and any(
                line.strip() == "# NBVAL_CHECK_OUTPUT" for line in lines[first:]
            ):
                late.append(f"{path.relative_to(root)}: cell {i}")
    assert not late, "move the marker to the first line (split the cell): " + ", ".join(late)


def test_api_reference_pages_cover_the_package():
    """guide/api is generated from the package's modules (scripts/api_pages.py); it must be
    up to date, with a page for every public part of effarch."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "api_pages.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_api_pages_document_a_name_once_at_its_home(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import api_pages

    models = api_pages.page("models")
    # HybridLM's module re-exports RecurrentState from models.block: documented there only
    hybrid = models.split(".. automodule:: effarch.models.hybrid")[1].split("```")[0]
    assert ":exclude-members: RecurrentState" in hybrid
    assert ".. automodule:: effarch.models.block" in models
    # a module without submodules documents its own members
    assert ".. automodule:: effarch.train\n   :members:" in api_pages.page("train")
    monkeypatch.setattr(api_pages, "PARTS", [p for p in api_pages.PARTS if p[0] != "scan"])
    monkeypatch.setattr(sys, "argv", ["api_pages.py", "--check"])
    assert api_pages.main() == 1  # a part without a page fails the check


def test_the_kernels_page_documents_launchers_not_device_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    import api_pages

    page = api_pages.kernels_page()
    documented = {line.split()[-1] for line in page.splitlines() if line.startswith(".. auto")}
    for launcher in (
        "flash_attention.flash_attention_forward",
        "fused_recurrent.fused_recurrent",
        "chunk_delta_rule.chunk_delta_rule_fwd",
        "selective_scan.selective_scan_fwd",
    ):
        assert f"effarch_kernels.{launcher}" in documented
    assert "effarch_kernels.common.FP_FUSION" in documented  # a constant with a docstring
    # @triton.jit functions are device code, private names are private
    for hidden in (
        "chunk_scalar_decay.token_row",
        "chunk_scalar_decay.chunk_output_kernel",
        "flash_attention._fwd_kernel",
        "flash_attention._config",
    ):
        assert f"effarch_kernels.{hidden}" not in documented
    every_module = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__"}
    assert {f"effarch_kernels.{m}" for m in every_module} <= documented


def test_api_reference_links_resolve_re_exported_names():
    """The book's Sphinx extension finds the object a docstring names by its import path."""
    sys.path.insert(0, str(ROOT / "scripts" / "sphinx_ext"))
    import api_refs

    from effarch.attention import moba_attention

    assert api_refs._import("effarch.attention.moba_attention") is moba_attention
    assert api_refs._import("effarch.attention.mixture.moba_attention") is moba_attention
    assert api_refs._import("effarch.attention.no_such_name") is api_refs._MISSING
    lines = ["Token mixers by name: the registry."]
    api_refs._no_inline_type(None, "data", "MIXERS", None, None, lines)
    assert lines[:2] == ["..", ""] and lines[2].startswith("Token mixers")


def test_pybtex_plugins_are_found_without_scanning_entry_points(monkeypatch):
    """The book's bibtex_plugins extension registers pybtex's entry points once: a lookup
    then returns the class the entry point names without scanning installed packages."""
    from importlib.metadata import entry_points

    import pybtex.plugin

    sys.path.insert(0, str(ROOT / "scripts" / "sphinx_ext"))
    import bibtex_plugins

    # what sphinxcontrib-bibtex asks for: a style, labels, names, the docutils backend
    asked = [("pybtex.style.formatting", "plain"), ("pybtex.style.labels", "alpha"),
             ("pybtex.style.names", "plain"), ("pybtex.backends", "docutils")]  # fmt: skip
    want = [next(iter(entry_points(group=g, name=n))).load() for g, n in asked]
    assert bibtex_plugins.register_pybtex_entry_points() >= len(asked)
    assert "bibtex_plugins" in (ROOT / "_config.yml").read_text()

    def scan(*args, **kwargs):
        raise AssertionError("pybtex scanned the entry points")

    monkeypatch.setattr(pybtex.plugin, "entry_points", scan)
    for (group, name), cls in zip(asked, want, strict=True):
        assert pybtex.plugin.find_plugin(group, name) is cls


def test_nbval_cells_wait_a_minute_for_their_output():
    """chapters/conftest.py raises nbval's hard-coded 5-second wait for a cell's output
    messages: the attribute it sets must be the one nbval's cells read."""
    import importlib.util
    import inspect

    from nbval.plugin import IPyNbCell

    spec = importlib.util.spec_from_file_location(
        "chapters_conftest", ROOT / "chapters" / "conftest.py"
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    assert "self.output_timeout = 5" in inspect.getsource(IPyNbCell.__init__)
    assert "timeout=self.output_timeout" in inspect.getsource(IPyNbCell.runtest)
    cell = IPyNbCell.__new__(IPyNbCell)
    cell.output_timeout = 5
    other = SimpleNamespace()
    conftest.pytest_collection_modifyitems([cell, other])
    assert cell.output_timeout == conftest.OUTPUT_TIMEOUT_S == 60
    assert not hasattr(other, "output_timeout")


def test_citation_file_agrees_with_the_package_and_the_book():
    """CITATION.cff carries the release, the title and the repository of the package and the
    book, and cites the survey; the changelog has an entry for the release."""
    import yaml

    import effarch

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    book = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cff["version"] == effarch.__version__
    assert cff["title"] == book["title"]
    assert cff["repository-code"] == book["repository"]["url"]
    survey = cff["references"][0]
    assert "Speed Always Wins" in survey["title"] and survey["authors"][0]["family-names"] == "Sun"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {effarch.__version__}\n" in changelog, "CHANGELOG.md: no entry for the version"
