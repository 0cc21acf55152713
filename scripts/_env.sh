# Sourced by book.sh and test.sh: make (or reuse) the project's virtual environment.
# Creates .venv with Python >= 3.10, installs torch (EFFARCH_TORCH overrides the spec),
# then effarch in editable mode with every extra. Re-runs install nothing unless
# pyproject.toml changed. Packages are installed without their bytecode (pip's default
# compiles every file of every package, torch's thousands included, most of which nothing
# imports): Python writes the bytecode of what is imported, the first time it is imported,
# so writing it stays on for everything run from here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EFFARCH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: effarch needs Python >= 3.10 (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.effarch-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "== installing effarch and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        # A pinned CPU-or-CUDA torch; on a GPU machine you may preinstall your own.
        "$VENV/bin/python" -m pip install --quiet --no-compile "${EFFARCH_TORCH:-torch==2.13.0}"
    fi
    "$VENV/bin/python" -m pip install --quiet --no-compile -e "$ROOT[kernels,book,test]"
    echo "$want" > "$stamp"
fi
unset PYTHONDONTWRITEBYTECODE
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
