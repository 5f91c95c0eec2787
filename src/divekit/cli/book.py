"""``divekit book run`` and ``divekit book list``: the book's sections, run headless on divekit's
compat layer."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from divekit.cli._common import add_action_command, add_command
from divekit.errors import DivekitError

COMMANDS = ("book",)  # the top-level commands add_commands adds (`divekit book` imports only this)

EXAMPLES = """\
examples:
  divekit book list                                   the sections in ../shared/book/chapters
  divekit book run ../shared/book/chapters/chapter_attention-mechanisms/attention-cues.md
  divekit book run chapter_recurrent-modern/gru.md --quick -o runs/gru
  divekit book run my-notes.ipynb --timeout 600 --data-dir ~/d2l-data
"""

RUN_EPILOG = """\
what runs:
  the book's markdown: the code cells for PyTorch (first line `#@tab pytorch`, `#@tab all` or a
  #@tab list with pytorch), in order, in one fresh IPython kernel of this Python (nbclient +
  ipykernel, as Jupyter runs a notebook); MXNet cells (no #@tab line) and other frameworks' cells
  are skipped. A notebook: every code cell. The book's `from d2l import torch as d2l` becomes
  `from divekit.compat import d2l`; nothing else of the code changes (but see --quick).
  The first failing cell stops the run: one line `error: SECTION: cell N (line L): ...`, exit 1.

--quick:
  sets DIVEKIT_BOOK_QUICK=1 in the kernel: the compat layer's training functions run at most
  DIVEKIT_BOOK_QUICK_EPOCHS (2) epochs, and data loaders (the compat layer's and the section's
  own torch DataLoaders) at most DIVEKIT_BOOK_QUICK_BATCHES (5 here: the book's own loops
  report 5 times an epoch) batches a pass; a literal epoch count the section sets itself
  (`num_epochs, lr = 500, 1`) becomes `min(500, 2)`. The report lists every rewrite. A check
  that the section runs, in a minute or so a section on a laptop CPU; the numbers are not the
  book's.

where outputs go (-o DIR, default runs/book/SECTION, or SECTION-2, ... when taken):
  DIR/report.md        every cell: source, printed output, figures, time (updated after each)
  DIR/SECTION.ipynb    the executed notebook
  DIR/figures/         the pictures (PNG), embedded in the report
  DIR/work/            the kernel's working folder; DIR/data and DIR/img link to the data
                       folder, so the book's ../data/... and ../img/NAME.jpg resolve
  DIR/kernel.log       the kernel's own messages
"""


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    actions = add_action_command(sub, parent, "book", help="run the book's sections on divekit",
                                 description="Run sections of the Dive into Deep Learning book "
                                 "(its markdown, or notebooks) headless on divekit's d2l compat "
                                 "layer, into a report with outputs and figures.",
                                 examples=EXAMPLES)

    p = add_command(
        actions, parent, "run", help="run a section cell by cell into a report",
        description="Run SECTION (the book's .md or a .ipynb) cell by cell in a fresh kernel with "
        "`from divekit.compat import d2l`, writing DIR/report.md and the executed notebook.",
        examples=RUN_EPILOG + "\n" + EXAMPLES)
    p.add_argument("section", metavar="SECTION", help="a section: the book's .md or a .ipynb")
    p.add_argument("--quick", action="store_true",
                   help="bound epochs and batches (DIVEKIT_BOOK_QUICK=1 and literal epoch "
                   "counts); see below")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="output folder (default: runs/book/SECTION, or SECTION-2, ... if taken)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report already in -o DIR (deletes only the files an earlier "
                   "run wrote there)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop a cell that runs longer (default: no limit; 900 with --quick; "
                   "0: no limit)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="the book's data folder, ../data of the section (default: "
                   "$DIVEKIT_DATA, else ../shared/data beside the repository, else "
                   "~/.cache/divekit)")
    p.add_argument("--kernel", metavar="NAME|PYTHON",
                   help="a Python executable with ipykernel, or an installed Jupyter kernel name "
                   "(default: this Python, with a kernel spec made for the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=cmd_run)

    p = add_command(actions, parent, "list", help="the sections in a chapters folder",
                    description="The sections (.md, .ipynb) under DIR with their PyTorch code "
                    "cells.", examples=EXAMPLES)
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="a chapters folder (default: ../shared/book/chapters when present)")
    p.set_defaults(handler=cmd_list)

    from divekit.book.reproduce import EXPERIMENTS

    listing = "\n".join(f"  {e.name:<17} {e.what} (~{e.minutes:g} min"
                        f"{'' if e.default else ', only with --only'})" for e in EXPERIMENTS)
    p = add_command(
        actions, parent, "reproduce", help="the book's headline results, at its settings",
        description="Run the book's headline experiments at the book's settings (the sections "
        "unchanged on the compat layer; divekit's own training for sections the chapters folder "
        "lacks) and write DIR/reproduce.md: experiment, the book's figure, divekit's, data, time.",
        examples="experiments:\n" + listing + "\n\nexamples:\n  divekit book reproduce\n"
        "  divekit book reproduce --only gru,transformer -o runs/reproduce")
    p.add_argument("--only", metavar="NAMES", help="comma-separated experiments (default: all "
                   "but those marked 'only with --only')")
    p.add_argument("--chapters", metavar="DIR",
                   help="the chapters folder (default: ../shared/book/chapters when present)")
    p.add_argument("-o", "--output", metavar="DIR", default="runs/reproduce",
                   help="output folder (default: runs/reproduce)")
    p.add_argument("--data-dir", metavar="DIR", help="the book's data folder (as for run)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier reproduce.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from divekit.book.reproduce import reproduce

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    rows = reproduce(args.chapters, args.output, only=only, data_dir=args.data_dir,
                     overwrite=args.overwrite, progress=not args.no_progress,
                     echo=lambda line: print(line, file=sys.stderr))
    width = max(len(r.experiment.name) for r in rows)
    for r in rows:
        print(f"{r.experiment.name:<{width}}  book: {r.experiment.book:<45}  divekit: "
              f"{r.divekit or '-'}  ({r.seconds:.0f} s, {r.status})")
    print(f"table: {Path(args.output) / 'reproduce.md'}")


QUICK_TIMEOUT = 900.0


def _timeout(args: argparse.Namespace) -> float | None:
    value = args.timeout
    if value is None:
        return QUICK_TIMEOUT if args.quick else None
    if math.isnan(value) or value < 0:
        raise DivekitError(f"--timeout must be a number of seconds >= 0, got {value}")
    return None if value == 0 or math.isinf(value) else value


def cmd_run(args: argparse.Namespace) -> None:
    from divekit.book.runner import run_section

    debug = getattr(args, "debug", False) or bool(os.environ.get("DIVEKIT_DEBUG"))
    timeout = _timeout(args)
    try:
        result = run_section(args.section, args.output, quick=args.quick, timeout=timeout,
                             data_dir=args.data_dir, kernel=args.kernel,
                             overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted; the report keeps the cells that ran", file=sys.stderr)
        raise SystemExit(130) from None
    name = Path(args.section).name
    if result.error is not None:
        if debug and result.error.traceback:
            print(result.error.traceback, file=sys.stderr)
        print(f"report: {result.report} (the cells before {result.error.cell} and its error)")
        sys.stdout.flush()
        print(f"error: {result.error.one_line(name)}", file=sys.stderr)
        raise SystemExit(1)
    n = len(result.runs)
    print(f"ran {n} cell{'s' * (n != 1)} of {name} in {result.seconds:.1f} s"
          + (" (quick)" if args.quick else ""))
    print(f"report:   {result.report}")
    print(f"notebook: {result.notebook}")
    print(f"figures:  {len(result.figures)} in {result.out_dir / 'figures'}")


def cmd_list(args: argparse.Namespace) -> None:
    from divekit.book.runner import default_chapters_dir
    from divekit.book.sections import find_sections

    if args.dir is None:
        folder = default_chapters_dir()
        if folder is None:
            raise DivekitError("no DIR given and ../shared/book/chapters is absent; give a "
                               "folder of sections")
    else:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise DivekitError(f"{args.dir!r} is not a folder")
    rows = [(p.relative_to(folder).as_posix(), n, skipped)
            for p, n, skipped in find_sections(folder)]
    if not rows:
        raise DivekitError(f"no sections (.md, .ipynb) under {folder}")
    width = max(len("section"), *(len(r[0]) for r in rows))
    print(f"{'section':<{width}}  {'pytorch cells':>13}  {'other cells':>11}")
    for rel, n, skipped in rows:
        print(f"{rel:<{width}}  {n if n else '-':>13}  {skipped:>11}")
    runnable = [r for r in rows if r[1]]
    print(f"{len(rows)} sections under {folder}, {len(runnable)} with PyTorch cells"
          + (f"; run one: divekit book run {folder / runnable[0][0]} --quick" if runnable
             else ""))
