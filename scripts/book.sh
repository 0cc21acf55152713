#!/usr/bin/env bash
# Build the book into _build/html (strict: any warning or failing cell is an error).
#   bash scripts/book.sh            build, executing notebooks (cached in _build/.jupyter_cache)
#   bash scripts/book.sh --serve    build, then serve it on http://127.0.0.1:8000
#   bash scripts/book.sh --student  the students' edition, without exercise solutions
#                                   (committed outputs), in _build/student/html
# EFFARCH_BOOK_EXECUTE=off renders the outputs committed with the notebooks instead.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

if [ "${1:-}" = "--student" ]; then
    python scripts/build_book.py --student
    echo "== open the students' edition: file://$ROOT/_build/student/html/index.html"
    exit 0
fi
python scripts/build_book.py
index="$ROOT/_build/html/index.html"
echo "== open the book: file://$index"
if [ "${1:-}" = "--serve" ]; then
    echo "== serving on http://127.0.0.1:8000 (Ctrl-C to stop)"
    exec python -m http.server --bind 127.0.0.1 --directory _build/html 8000
elif [ -z "${CI:-}" ] && { [ -n "${DISPLAY:-}" ] || [ "$(uname)" = Darwin ]; }; then
    python -m webbrowser -t "file://$index" >/dev/null 2>&1 || true
fi
