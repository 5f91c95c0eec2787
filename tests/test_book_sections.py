"""The book's sections, each run with ``divekit book run --quick`` on the compat layer
(``make test-book``; marked ``book``, deselected by default; skipped without ../shared/book).

Each section writes its report into ``runs/book-sections/CHAPTER/SECTION/`` (or
``$DIVEKIT_BOOK_SECTIONS_OUT``); at the end a table of every section (pass / FAIL / skip, cells
run, seconds, the one-line error) is printed and written to ``SUMMARY.md`` there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from divekit.book.runner import run_section
from divekit.book.sections import find_sections
from divekit.errors import DivekitError
from divekit.io import atomic_write_text

CHAPTERS = Path(__file__).resolve().parents[2] / "shared" / "book" / "chapters"
OUT = Path(os.environ.get("DIVEKIT_BOOK_SECTIONS_OUT")
           or Path(__file__).resolve().parents[1] / "runs" / "book-sections")
SECTIONS = ([(p.relative_to(CHAPTERS).as_posix(), n) for p, n, _ in find_sections(CHAPTERS)]
            if CHAPTERS.is_dir() else [])
RESULTS: list[tuple[str, str, str, float, str]] = []  # section, status, cells, seconds, error

pytestmark = [pytest.mark.book,
              pytest.mark.skipif(not CHAPTERS.is_dir(), reason="../shared/book is not present")]


def _table() -> str:
    width = max([len("section"), *(len(r[0]) for r in RESULTS)])
    lines = [f"| {'section':<{width}} | status | cells | seconds | error |",
             f"| {'-' * width} | ------ | ----- | ------- | ----- |"]
    for section, status, cells, seconds, error in RESULTS:
        lines.append(f"| {section:<{width}} | {status:<6} | {cells:>5} | {seconds:>7.1f} | "
                     f"{error.replace('|', '/')} |")
    passed = sum(r[1] == "pass" for r in RESULTS)
    runnable = sum(r[1] != "skip" for r in RESULTS)
    lines += ["", f"{passed} of {runnable} sections with PyTorch cells pass "
              f"({len(RESULTS)} sections, {sum(r[3] for r in RESULTS):.0f} s)"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not RESULTS:
        return
    table = _table()
    atomic_write_text(OUT / "SUMMARY.md", "# divekit book run --quick: the book's sections\n\n"
                      + table)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n\n" + table + f"(reports in {OUT})")


@pytest.mark.parametrize("section, cells", SECTIONS, ids=[s for s, _ in SECTIONS])
def test_section_runs_quick(section, cells):
    if cells == 0:
        RESULTS.append((section, "skip", "0/0", 0.0, "no PyTorch cells"))
        pytest.skip("no PyTorch cells")
    t0 = time.perf_counter()
    out = OUT / Path(section).with_suffix("")
    try:
        result = run_section(CHAPTERS / section, out, quick=True, timeout=900.0,
                             overwrite=True, progress=False)
    except DivekitError as e:
        RESULTS.append((section, "FAIL", f"0/{cells}", time.perf_counter() - t0, str(e)))
        pytest.fail(str(e), pytrace=False)
    ran = f"{len(result.runs)}/{cells}"
    if result.error is not None:
        line = result.error.one_line(Path(section).name)
        RESULTS.append((section, "FAIL", ran, result.seconds, line))
        pytest.fail(line, pytrace=False)
    RESULTS.append((section, "pass", ran, result.seconds, ""))
