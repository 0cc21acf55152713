"""The package's shape, kept: the import contracts hold, and the rules they cannot express.

``lint-imports`` (import-linter, configured in ``pyproject.toml``) checks the direction of the
dependencies (experiments -> models -> families -> building blocks -> checks), that
``effarch_kernels`` never imports ``effarch``, and that no package has an import cycle. The
tests below add what import-linter does not see: no private name imported across modules, no
import of our own code hidden inside a function (only the lazy kernel and Triton imports may
be), modules short enough to read, and every kernel launch saying whether it may fuse
multiply-adds (Triton 3.10 changes the default; ``effarch_kernels.common.FP_FUSION``).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 800
# the one kind of import allowed inside a function: a kernel, launched only when used
LAZY_ALLOWED = ("effarch_kernels", "triton")


def _modules() -> list[Path]:
    return sorted((ROOT / "effarch").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def _internal(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules of ours that an import statement names (relative ones as '.x')."""
    if isinstance(node, ast.ImportFrom):
        name = "." * node.level + (node.module or "")
        return [name] if node.level or name.split(".")[0] in ("effarch", "effarch_kernels") else []
    return [a.name for a in node.names if a.name.split(".")[0] in ("effarch", "effarch_kernels")]


def private_imports(path: Path) -> list[str]:
    """``from <our module> import _name`` and ``<our module>._name`` in one file."""
    tree = ast.parse(path.read_text())
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _internal(node):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if isinstance(node, ast.ImportFrom) and private:
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                modules.add(bound)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def hidden_imports(path: Path) -> list[str]:
    """Imports of our own modules inside a function or class body (an import cycle dodged)."""
    tree = ast.parse(path.read_text())
    found = []
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(scope):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _internal(node):
                    if not name.startswith(LAZY_ALLOWED):
                        found.append(f"{path.name}:{node.lineno} imports {name} in {scope.name}")
    return found


def launches_without_fp_fusion(path: Path) -> list[str]:
    """Kernel launches (``kernel[grid](...)``) that do not pass ``enable_fp_fusion``."""
    return [
        f"{path.name}:{node.lineno} launches {ast.unparse(node.func.value)}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and "enable_fp_fusion" not in [kw.arg for kw in node.keywords]
    ]


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": str(pythonpath)}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache", "--no-logo", "--config", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_no_private_name_is_imported_across_modules():
    found = [hit for path in _modules() for hit in private_imports(path)]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_no_import_of_our_code_inside_a_function():
    found = [hit for path in _modules() for hit in hidden_imports(path)]
    assert not found, "imports hidden in functions (a cycle dodged?):\n" + "\n".join(found)


def test_every_module_is_short_enough_to_read():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "effarch").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_every_kernel_launch_says_whether_to_fuse_multiply_adds():
    launches = sorted((ROOT / "kernels").glob("*.py"))
    found = [hit for path in launches for hit in launches_without_fp_fusion(path)]
    assert not found, "launches left to the Triton version's FMA default:\n" + "\n".join(found)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The AST checks above flag a private import and a hidden import when there is one."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from .ops import _scale, delta_rule\n"
        "from . import ops\n"
        "def f():\n"
        "    from effarch.linear import gla\n"
        "    from effarch_kernels.flash_attention import flash_attention_forward\n"
        "    return ops._heads\n"
    )
    assert private_imports(bad) == ["bad.py:1 imports _scale", "bad.py:6 uses ops._heads"]
    assert hidden_imports(bad) == ["bad.py:4 imports effarch.linear in f"]
    launch = tmp_path / "launch.py"
    launch.write_text(
        "kern[(n, b * h)](x, y, BLOCK=16, enable_fp_fusion=FP_FUSION)\n"
        "kern[grid](x, y, **sizes)\n"
        "table[0](x)\n"
    )
    assert launches_without_fp_fusion(launch) == [
        "launch.py:2 launches kern",
        "launch.py:3 launches table",
    ]


def test_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a building block reaching up into a family: a cycle and a layer broken
        (
            "effarch/nn/conv.py",
            "from ..linear import gla\n",
            "effarch.nn is not allowed to import effarch.linear",
        ),
        # a new subpackage or module that nobody placed in the layers (exhaustive contract)
        ("effarch/newfamily.py", "import torch\n", "- effarch.newfamily"),
        # a kernel importing the package that launches it
        (
            "kernels/__init__.py",
            "import effarch\n",
            "effarch_kernels is not allowed to import effarch",
        ),
    ],
)
def test_import_contracts_fail_when_broken(tmp_path, module, line, broken):
    """Reintroduce a forbidden import in a copy of the package: lint-imports must fail."""
    shutil.copytree(ROOT / "effarch", tmp_path / "effarch")
    shutil.copytree(ROOT / "kernels", tmp_path / "effarch_kernels")
    target = tmp_path / module.replace("kernels/", "effarch_kernels/", 1)
    target.write_text((target.read_text() if target.exists() else "") + "\n" + line)
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    assert broken in result.stdout, result.stdout


def test_import_contracts_find_a_cycle_inside_a_family(tmp_path):
    """Two sibling modules that import each other (the cycle a function-level import once
    hid) break the acyclic contract, wherever the import statement stands."""
    shutil.copytree(ROOT / "effarch", tmp_path / "effarch")
    shutil.copytree(ROOT / "kernels", tmp_path / "effarch_kernels")
    ssm = tmp_path / "effarch" / "ssm"
    s4 = ssm / "s4.py"  # effarch.ssm.layers imports s4; now s4 imports layers back
    s4.write_text(s4.read_text() + "\n\ndef _f():\n    from . import layers\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "No cycles are allowed in effarch.ssm" in result.stdout, result.stdout


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages by hand: a new subpackage must be added there, or
    an editable install works while the built wheel lacks it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "effarch").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
