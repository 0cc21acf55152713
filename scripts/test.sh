#!/usr/bin/env bash
# Run the whole test suite: lint and format (ruff), the import contracts (import-linter,
# configured in pyproject.toml), the notebooks' shared setup cell,
# unit and reference tests and the real-browser test of the book, then nbval over chapters/
# (every notebook re-executed, checked cells compared with their committed outputs) in an
# environment where `import triton` fails, as on a reader's laptop.
# Installs what it needs: the virtual environment (via _env.sh) and, when missing,
# Debian's chromium for the browser test (needs root or sudo).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

if [ -z "${EFFARCH_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "== installing chromium for the browser test"
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: no chromium and no apt-get; set EFFARCH_CHROMIUM to a Chromium binary" >&2
    fi
fi

start=$(date +%s)
echo "== ruff"
ruff check .
ruff format --check .
echo "== import contracts (import-linter: layers, no cycles, kernels standalone)"
lint-imports --no-logo
echo "== notebook setup cells"
python -m effarch.notebook sync --check
# Notebooks run at their CPU size here, whatever the machine, to keep the suite fast.
export EFFARCH_SIZE="${EFFARCH_SIZE:-small}"
# pytest exits 5 when extra arguments (-k ...) select nothing in one of the two runs
run() { local rc=0; "$@" || rc=$?; [ "$rc" -eq 5 ] && return 0; return "$rc"; }
echo "== pytest: tests/ (unit, reference, kernels under the interpreter, browser)"
# one worker per core (pytest-xdist), each file on one worker: the browser tests share one
# book build, and nothing in tests/ times itself. Files are handed out in name order, not
# xdist's default of most tests first, which left the few long browser tests (two book
# builds) to the end, on one worker, while the other had nothing left to do.
run python -m pytest tests -n auto --dist loadfile --no-loadscope-reorder --durations=15 "$@"
echo "== pytest: nbval over chapters/, with Triton made unimportable (as on a laptop)"
# Pages that assert claims about their own timings (they call effarch.bench.remeasured) run
# one after another with the cores to themselves; the others, which time nothing they
# assert, run one per core on one thread each (a page whose torch asks for every core,
# beside another such page, waits on it: several times slower than running both in turn).
timed=() untimed=()
for nb in "$ROOT"/chapters/*/*.ipynb; do
    if grep -q "remeasured(" "$nb"; then timed+=("$nb"); else untimed+=("$nb"); fi
done
run_nbval() {
    PYTHONPATH="$ROOT/scripts/without_triton${PYTHONPATH:+:$PYTHONPATH}" \
        run python -m pytest --nbval-lax --nbval-current-env --durations=10 "$@"
}
echo "-- ${#untimed[@]} pages that time nothing they assert, one per core"
OMP_NUM_THREADS=1 run_nbval -n auto --dist loadfile "${untimed[@]}" "$@"
echo "-- ${#timed[@]} pages that assert their timings, one at a time"
run_nbval "${timed[@]}" "$@"
echo "== test suite finished in $(( $(date +%s) - start )) s"
