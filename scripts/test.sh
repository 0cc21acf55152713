#!/usr/bin/env bash
# Run the whole test suite: lint and format (ruff), the notebooks' shared setup cell,
# unit and reference tests, nbval over chapters/ (every notebook re-executed, checked
# cells compared with their committed outputs), and the real-browser test of the book.
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
echo "== notebook setup cells"
python -m effarch.notebook sync --check
echo "== pytest: tests/ and nbval over chapters/"
# Notebooks run at their CPU size here, whatever the machine, to keep the suite fast.
EFFARCH_SIZE="${EFFARCH_SIZE:-small}" python -m pytest tests chapters \
    --nbval-lax --nbval-current-env --durations=15 "$@"
echo "== test suite finished in $(( $(date +%s) - start )) s"
