"""README's headline figures, generated from BENCHMARKS.md (never typed by hand).

Every table in BENCHMARKS.md's generated blocks (between ``<!-- bench:NAME -->`` markers) that
has a goal column holds the goals of issue 26 and the others: one row per goal, with a ratio
(its median and min–max), the goal and the verdict (met / not met / not settled). This module
reads those rows back and writes them as one table between the README's
``<!-- bench:headline -->`` markers, so the figures the README leads with are exactly the ones
the last ``make bench`` measured. ``run_all.py`` calls :func:`update_readme` after it writes
BENCHMARKS.md; by hand:

    python benchmarks/_headline.py            # rewrite README.md's block from BENCHMARKS.md
    python benchmarks/_headline.py --check    # exit 1 if the block is stale (a test runs this)

The tables of different benchmarks differ in their columns, so a goal row is recognised by its
cells, not by a fixed layout: the goal is the cell under a header starting with "goal" (or, where
the header itself names it, "goal ≥ 20×", the header's figure); the verdict is the cell under
"verdict" or, where there is none, the goal column's own "met" / "not met" / "not settled"; the
ratio is the first cell after the first column that reads as a ratio (``**8.00×** (6.47–8.53)``
or ``2.34 (1.64-2.74)x``). Rows without a goal ("—") are context, not goals, and are left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import replace_block, write_atomically  # noqa: E402

BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->",
                   re.DOTALL)
RATIO = re.compile(r"\d[\d,.]*\s*×|\d\)\s*x$")
VERDICTS = ("not settled", "not met", "met")
FIGURE = re.compile(r"(?<![A-Za-z])[+-]?\d[\d,.]*(?![A-Za-z\d])")  # "8,433", "-0.002"; not d2l
HEADLINE = "headline"


@dataclass(frozen=True)
class Goal:
    """One goal row of a generated table."""

    benchmark: str
    what: str
    ratio: str
    goal: str
    verdict: str


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``text``: ``(header cells, body rows)``."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines) - 1:
        head, rule = lines[i].strip(), lines[i + 1].strip()
        if head.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(cells(lines[j]))
                j += 1
            out.append((cells(head), rows))
            i = j
        else:
            i += 1
    return out


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def verdict_in(cell: str) -> str | None:
    low = cell.lower()
    return next((v for v in VERDICTS if low.startswith(v)), None)


def label(header: list[str], row: list[str], ratio_col: int) -> str:
    """What a goal row is about: its first cell and every later cell before the ratio that names
    rather than measures (no free-standing figure: "divekit / d2l loop", "against" columns), and
    numbers in the first column or a ``batch`` column with their header ("length 50, batch
    64")."""
    parts = []
    for i in range(ratio_col):
        cell, head = row[i].replace("**", ""), header[i].lower()
        if re.fullmatch(r"[\d,.]+", cell) and (i == 0 or head == "batch"):
            parts.append(f"{header[i]} {cell}")
        elif i == 0 or (cell and not FIGURE.search(cell)):
            parts.append(f"vs {cell}" if head == "against" else cell)
    return ", ".join(parts).replace(", vs ", " vs ")


def goals_of(name: str, body: str) -> list[Goal]:
    """The goal rows of one generated block."""
    found = []
    for header, rows in tables(body):
        lowered = [h.lower() for h in header]
        goal_col = next((i for i, h in enumerate(lowered) if h.startswith("goal")), None)
        if goal_col is None:
            continue
        verdict_col = next((i for i, h in enumerate(lowered) if "verdict" in h), goal_col)
        header_goal = header[goal_col][4:].strip()  # "goal ≥ 20×" -> "≥ 20×"; "goal" -> ""
        for row in rows:
            if len(row) != len(header):
                continue
            verdict = verdict_in(row[verdict_col])
            ratio_col = next((i for i in range(1, len(row)) if RATIO.search(row[i])), None)
            if verdict is None or ratio_col is None:
                continue
            goal = row[goal_col] if verdict_col != goal_col else header_goal
            if goal in ("", "—"):
                goal = header_goal
            what = label(header, row, ratio_col)
            goal = re.sub(r"^([\d.]+)x$", r"≥ \1×", goal)  # the book's "1.5x"
            ratio = row[ratio_col].replace("**", "")
            ratio = re.sub(r"^([\d.]+) \(([\d.]+)-([\d.]+)\)x$", r"\1× (\2–\3)", ratio)
            found.append(Goal(name, what, ratio, goal, row[verdict_col]))
    return found


def collect(benchmarks_md: str) -> list[Goal]:
    """Every goal row of every generated block, in the file's order."""
    return [g for m in BLOCK.finditer(benchmarks_md) if m["name"] != "header"
            for g in goals_of(m["name"], m["body"])]


def generated_on(benchmarks_md: str) -> str:
    """The header block's "generated" line (when and how the last run was made)."""
    for m in BLOCK.finditer(benchmarks_md):
        if m["name"] == "header":
            for _header, rows in tables(m["body"]):
                for row in rows:
                    if row and row[0] == "generated":
                        return row[1]
    return "unknown"


def headline(benchmarks_md: str) -> str:
    """The README block's text."""
    goals = collect(benchmarks_md)
    counts = {v: sum(verdict_in(g.verdict) == v for g in goals) for v in VERDICTS}
    lines = [
        "Generated from [BENCHMARKS.md](BENCHMARKS.md) by `benchmarks/_headline.py` (run by "
        f"`make bench`; last run: {generated_on(benchmarks_md)}). Every goal the benchmarks "
        "judge, same-run ratios against the peer: median of interleaved rounds (min–max); "
        "*met* only when the whole spread clears the goal. "
        f"{counts['met']} met, {counts['not settled']} not settled, {counts['not met']} not met; "
        "the analysis of each goal not met or not settled (profile tables of both sides) is "
        "beside its table in BENCHMARKS.md, and why they fall short is in its section [Goals not "
        "met, and why](BENCHMARKS.md#goals-not-met-and-why).",
        "",
        "| benchmark | what | ratio (min–max) | goal | verdict |",
        "| --- | --- | ---: | --- | --- |",
    ]
    lines += [f"| {g.benchmark} | {g.what} | {g.ratio} | {g.goal} | {g.verdict} |"
              for g in goals]
    return "\n".join(lines) + "\n"


def replace_readme_block(text: str, body: str) -> str:
    """README's text with the headline block's body replaced; README must have the markers (a
    README without them is an error, not a table appended somewhere)."""
    try:
        return replace_block(text, HEADLINE, body)
    except KeyError as e:
        raise SystemExit(f"error: README.md has {e.args[0]}") from None


def update_readme(benchmarks: Path = ROOT / "BENCHMARKS.md",
                  readme: Path = ROOT / "README.md") -> bool:
    """Rewrite README's headline block from ``benchmarks``; True when it changed."""
    old = readme.read_text(encoding="utf-8")
    new = replace_readme_block(old, headline(benchmarks.read_text(encoding="utf-8")))
    if new == old:
        return False
    write_atomically(readme, new)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 if README.md's block differs from BENCHMARKS.md's figures")
    p.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    if args.check:
        text = args.readme.read_text(encoding="utf-8")
        want = replace_readme_block(text,
                             headline(args.benchmarks.read_text(encoding="utf-8")))
        if want != text:
            print("README.md's headline block is stale: run python benchmarks/_headline.py",
                  file=sys.stderr)
            return 1
        print("README.md's headline block matches BENCHMARKS.md")
        return 0
    changed = update_readme(args.benchmarks, args.readme)
    print(f"{args.readme}: headline block {'rewritten' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
