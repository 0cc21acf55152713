"""Write the book's API reference pages (guide/api) from the package's own modules.

    python scripts/api_pages.py          write guide/api/*.md and their entries in _toc.yml
    python scripts/api_pages.py --check  fail if they are not what the package holds

One page per public part of ``effarch`` (:data:`PARTS`): its docstring, then every public
module of it with the names that module defines, read by Sphinx's autodoc from the
docstrings. Each name is documented once, in the module that defines it; a name a module
re-exports from another is left to its home. The test command runs ``--check``, so a new
module or part cannot be missing from the reference.

A last page documents ``effarch_kernels``, the optional Triton kernels: each module's
docstring and its launchers (the plain Python functions that check shapes and launch a
kernel) and documented constants, found in the module's source so that writing the page
needs no Triton. The book's Sphinx imports the modules with ``triton`` mocked
(``autodoc_mock_imports``), so the page builds on a machine without Triton too.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "guide" / "api"
KERNELS = ROOT / "kernels"
TOC = ROOT / "_toc.yml"

# (part, what it holds), in the book's order
PARTS = [
    ("attention", "softmax attention and its exact efficient forms: tiled and flash attention, "
                  "KV caches, RoPE, GQA, MLA, mixtures of attention, quantized attention "
                  "(chapters 1, 4)"),
    ("linear", "linear attention, its decays, gates and delta rules, test-time training, "
               "linearization (chapter 2)"),
    ("ssm", "state space models: S4D, Mamba's selective scan, Mamba-2's SSD (chapter 2.3)"),
    ("unified", "every token mixer as a memory with an update rule (chapter 2.5)"),
    ("sparse", "static, dynamic and training-free sparse attention, KV-cache policies, NSA "
               "(chapter 3)"),
    ("moe", "routers, balance losses, the MoE layer, expert variants, upcycling (chapter 5)"),
    ("models", "TinyLM, HybridLM, YOCO, the transformer cost model, the trained byte model "
               "(chapters 2, 6)"),
    ("diffusion", "masked and block diffusion language models (chapter 7)"),
    ("vision", "scan orders over a grid of image patches (chapter 8.1)"),
    ("audio", "waveform models that stream (chapter 8.2)"),
    ("dist", "ring attention, sequence and expert parallelism on torch.distributed "
             "(chapters 5.4, 9.2)"),
    ("nn", "the building blocks several families share: short convolution, norms, LoRA, "
           "SwiGLU"),
    ("tasks", "synthetic tasks: MQAR, copying, permutations, digits, tones, text"),
    ("bench", "the measuring toolkit: time, memory, FLOPs, sweeps, fits and plots"),
    ("train", "one trainer for every experiment"),
    ("scan", "the first-order linear recurrence as a parallel scan"),
    ("experiments", "the book's experiments: configurations, runs, stored results"),
    ("survey", "the survey's map as data"),
    ("notebook", "what every notebook shares: the setup cell, glue, interactive figures"),
]  # fmt: skip
# module-level names that are not the module's own API
EXCLUDE = {"effarch.unified.rule": ["Tensor"]}  # an alias of torch.Tensor

INDEX = """\
# API reference

Every public name of the `effarch` package, from its docstring: the shapes, the equation it
computes, and the library it corresponds to (flash-attn, flash-linear-attention, mamba_ssm,
transformers), so that one can be swapped for the other. The chapters show each one at work.

Conventions shared by the whole package:

- tensors are `[batch, seq, heads, head_dim]` (`[B, T, H, D]`), as in flash-attn and
  flash-linear-attention; the state of a linear-attention head is `[B, H, K, V]`;
- bad input raises `ValueError` or `TypeError` naming the argument, what it expects and what
  it got;
- functions with a Triton kernel take `backend="torch" | "triton" | "auto"`: `"auto"` runs the
  kernel on CUDA tensors when Triton can, PyTorch otherwise, so everything here also runs on a
  laptop's CPU.

Each name is documented in the module that defines it; import it from its part,
`from effarch.linear import gla`, as the chapters do.

| part | what it holds |
|---|---|
{rows}

The Triton kernels behind `backend="triton"` are a package of their own,
[`effarch_kernels`](kernels.md): their launchers can be called directly on CUDA tensors.
"""


def _modules(part: str) -> list[str]:
    package = importlib.import_module(f"effarch.{part}")
    if not hasattr(package, "__path__"):
        return []
    found = pkgutil.iter_modules(package.__path__)
    return sorted(f"effarch.{part}.{m.name}" for m in found if not m.name.startswith("_"))


def _directive(module: str, members: bool) -> list[str]:
    lines = [f".. automodule:: {module}"]
    if not members:
        return [*lines, "   :no-members:"]
    lines += ["   :members:", "   :undoc-members:"]
    mod = importlib.import_module(module)
    skip = []
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name)
        defined = inspect.isfunction(obj) or inspect.isclass(obj)
        if defined and obj.__module__ != module:  # re-exported: documented at home
            skip.append(name)
    skip += [n for n in EXCLUDE.get(module, []) if n not in skip]
    if skip:
        lines.append(f"   :exclude-members: {', '.join(skip)}")
    return lines


def page(part: str) -> str:
    """The Markdown of one part's page."""
    modules = _modules(part)
    lines = [f"# effarch.{part}", "", "```{eval-rst}"]
    lines += [*_directive(f"effarch.{part}", members=not modules), "```", ""]
    for module in modules:  # a section per module, so each has its place in the contents
        lines += [f"## {module}", "", "```{eval-rst}"]
        lines += [*_directive(module, members=True), "```", ""]
    return "\n".join(lines)


def _kernel_names(path: Path) -> tuple[list[str], list[str]]:
    """A kernel module's launchers (public functions without a decorator: the
    ``@triton.jit`` ones are device code) and its constants with a docstring, in order."""
    body = ast.parse(path.read_text()).body
    functions = [
        node.name
        for node in body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and not node.decorator_list
    ]
    constants = [
        target.id
        for node, after in zip(body, body[1:], strict=False)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and not target.id.startswith("_")
    ]
    return functions, constants


def kernels_page() -> str:
    """The Markdown of the effarch_kernels page."""
    lines = ["# effarch_kernels", "", "```{eval-rst}", ".. automodule:: effarch_kernels",
             "   :no-members:", "```", ""]  # fmt: skip
    for path in sorted(KERNELS.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = f"effarch_kernels.{path.stem}"
        functions, constants = _kernel_names(path)
        lines += [f"## {module}", "", "```{eval-rst}", f".. automodule:: {module}",
                  "   :no-members:", ""]  # fmt: skip
        lines += [f".. autodata:: {module}.{name}" for name in constants]
        lines += [f".. autofunction:: {module}.{name}" for name in functions]
        lines += ["```", ""]
    return "\n".join(lines)


def pages() -> dict[Path, str]:
    """Every page of guide/api, by path."""
    rows = "\n".join(f"| [`effarch.{p}`]({p}.md) | {what} |" for p, what in PARTS)
    out = {API / "index.md": INDEX.format(rows=rows)}
    out.update({API / f"{p}.md": page(p) for p, _ in PARTS})
    out[API / "kernels.md"] = kernels_page()
    return out


def toc(text: str) -> str:
    """``_toc.yml`` with the API section, after the notation page, as :data:`PARTS` says."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() == "- file: guide/api/index":  # the old section, replaced below
            while i < len(lines) and ("sections:" in lines[i] or "guide/api/" in lines[i]):
                i += 1
            continue
        out.append(line)
        if line.strip() == "- file: guide/notation":
            out.append("      - file: guide/api/index\n        sections:\n")
            out += [f"          - file: guide/api/{p}\n" for p, _ in PARTS]
            out.append("          - file: guide/api/kernels\n")
    return "".join(out)


def public_parts() -> list[str]:
    """The parts of the package a reader imports: subpackages and modules not named ``_*``."""
    root = importlib.import_module("effarch")
    return sorted(m.name for m in pkgutil.iter_modules(root.__path__) if not m.name.startswith("_"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the pages are stale")
    args = parser.parse_args()
    missing = sorted(set(public_parts()) - {p for p, _ in PARTS})
    if missing:
        print(f"parts of effarch without an API page (add them to PARTS): {missing}")
        return 1
    want = pages()
    want[TOC] = toc(TOC.read_text())
    stale = [p for p, text in want.items() if not p.is_file() or p.read_text() != text]
    extra = sorted(set(API.glob("*.md")) - set(want))
    if args.check:
        for path in [*stale, *extra]:
            print(f"stale: {path.relative_to(ROOT)} (run python scripts/api_pages.py)")
        return 1 if stale or extra else 0
    API.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(want[path])
    for path in extra:
        path.unlink()
    print(f"wrote {len(stale)} file(s), removed {len(extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
