"""Draw the book's learning path from the prerequisites each page states at its top.

    python scripts/learning_path.py          write guide/learning_path.md and .svg
    python scripts/learning_path.py --check  fail if they are not what the pages say

Every notebook opens with a line naming its prerequisites as links to earlier pages; this
script reads those links (nothing else), checks that they form a path without cycles, and
writes the page that lists and draws them. The test command runs ``--check``, so the
learning path can never disagree with the pages.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "guide"
LINK = re.compile(r"\[([^\]]+)\]\(([^)]+?\.ipynb)(?:#[^)]*)?\)")


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "chapters").rglob("*.ipynb") if "checkpoint" not in str(p))


def title(nb: dict) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    raise ValueError("a notebook without a '# ' title")


def prerequisites(path: Path, nb: dict) -> list[Path]:
    """The pages linked in the header's prerequisites (markdown cells before the first code
    cell: from the word "Prerequisites" to the end of its paragraph or the next bold label)."""
    found: list[Path] = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            break
        text = "".join(cell["source"])
        start = text.lower().find("prerequisite")
        if start < 0:
            continue
        # the prerequisites run to the end of their paragraph or to the next bold label
        stops = [i for i in (text.find("\n\n", start), text.find("\n**", start)) if i >= 0]
        for _, target in LINK.findall(text[start : min(stops, default=len(text))]):
            page = (path.parent / target).resolve()
            if not page.is_file():
                raise ValueError(f"{path.name}: prerequisite {target} does not exist")
            if page not in found:
                found.append(page)
    return found


def graph() -> dict[Path, tuple[str, list[Path]]]:
    """``{page: (title, prerequisites)}``, checked to have no cycle."""
    g = {}
    for path in notebooks():
        nb = json.loads(path.read_text())
        g[path.resolve()] = (title(nb), prerequisites(path.resolve(), nb))
    state: dict[Path, int] = {}

    def visit(p: Path, trail: tuple[Path, ...]) -> None:
        if state.get(p) == 2:
            return
        if state.get(p) == 1:
            cycle = " -> ".join(q.stem for q in (*trail, p))
            raise ValueError(f"the prerequisites form a cycle: {cycle}")
        state[p] = 1
        for q in g[p][1]:
            visit(q, (*trail, p))
        state[p] = 2

    for p in g:
        visit(p, ())
    return g


def depth(g: dict[Path, tuple[str, list[Path]]]) -> dict[Path, int]:
    memo: dict[Path, int] = {}

    def d(p: Path) -> int:
        if p not in memo:
            memo[p] = 1 + max((d(q) for q in g[p][1]), default=-1)
        return memo[p]

    return {p: d(p) for p in g}


def short(t: str) -> str:
    """'2.1 Linear attention: from softmax ...' -> '2.1 Linear attention'."""
    return t.split(":")[0].strip()


def markdown(g: dict[Path, tuple[str, list[Path]]]) -> str:
    rows = []
    for p, (t, pre) in g.items():
        link = f"[{short(t)}](../{p.relative_to(ROOT).as_posix()})"
        needs = ", ".join(f"[{short(g[q][0])}](../{q.relative_to(ROOT).as_posix()})" for q in pre)
        rows.append(f"| {link} | {needs or 'nothing but Python and PyTorch'} |")
    return "\n".join(
        [
            "# Learning path",
            "",
            "Which page builds on which, as each page states at its top. Read a page after",
            "the pages it points to; pages side by side can be read in any order. The figure",
            "and the table are generated from the pages themselves",
            "(`python scripts/learning_path.py`), so they always agree.",
            "",
            "```{figure} learning_path.svg",
            ":alt: the book's pages as boxes, arrows to the pages that build on them",
            ":width: 100%",
            "",
            "Each arrow points from a page to one that builds on it.",
            "```",
            "",
            "| page | builds on |",
            "|---|---|",
            *rows,
            "",
        ]
    )


def svg(g: dict[Path, tuple[str, list[Path]]]) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small and searchable
    plt.rcParams["svg.hashsalt"] = "effarch"  # the same drawing gives the same file
    levels = depth(g)
    columns: dict[int, list[Path]] = {}
    for p in g:
        columns.setdefault(levels[p], []).append(p)
    pos = {}
    tallest = max(len(c) for c in columns.values())
    for x, col in sorted(columns.items()):
        for i, p in enumerate(col):
            pos[p] = (x * 3.0, (tallest - 1) / 2 - i + (len(col) - 1) / 2 - (tallest - 1) / 2)
    fig, ax = plt.subplots(figsize=(3.1 * (max(columns) + 1), 0.62 * tallest + 0.4))
    boxes = {
        p: ax.text(
            *pos[p],
            short(t),
            ha="center",
            va="center",
            fontsize=10,
            bbox=dict(boxstyle="round,pad=0.35", fc="#eef3fb", ec="#4a6fa5", lw=0.8),
        )  # fmt: skip
        for p, (t, _) in g.items()
    }
    for p, (_, pre) in g.items():
        for q in pre:  # from the right edge of the prerequisite to the left edge of the page
            ax.annotate(
                "", xy=(0, 0.5), xycoords=boxes[p], xytext=(1, 0.5), textcoords=boxes[q],
                arrowprops=dict(arrowstyle="->", color="0.45", lw=0.9, shrinkA=1, shrinkB=1),
            )  # fmt: skip
    ax.set_xlim(-1.4, max(columns) * 3.0 + 1.4)
    ax.set_ylim(-tallest / 2 - 0.2, tallest / 2 + 0.2)
    ax.axis("off")
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    args = parser.parse_args()
    g = graph()
    want = {GUIDE / "learning_path.md": markdown(g), GUIDE / "learning_path.svg": svg(g)}
    if args.check:
        stale = [p.name for p, text in want.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {stale}; run python scripts/learning_path.py", file=sys.stderr)
            return 1
        print(f"learning path up to date ({len(g)} pages)")
        return 0
    for p, text in want.items():
        p.write_text(text)
    print(f"wrote {', '.join(p.name for p in want)} ({len(g)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
