"""Run every benchmark and regenerate BENCHMARKS.md's tables (``make bench``).

Each script in ``benchmarks/`` runs in its own process at its standard settings (its defaults
plus ``STANDARD[name]`` below) with ``--markdown PATH``, and writes its section there: a ``## ``
title, the command, its tables. This script puts each section between the markers

    <!-- bench:NAME -->
    ...generated...
    <!-- /bench:NAME -->

in BENCHMARKS.md, adds one line on the run (date, wall time, load average before → after), and
leaves the hand-written text outside the markers alone. A section whose markers are missing is
appended at the end; a script that has no ``--markdown`` yet gets its console output in a code
block, so every benchmark's figures are regenerated, converted or not. The ``header`` block at
the top says when, on what machine (CPU, cores, torch, threads), under what load, and at what
fp32 GEMM rate the machine ran during this run. Then README.md's headline table (between its
``<!-- bench:headline -->`` markers) is regenerated from the new file by ``_headline.py``. The
file is replaced atomically (a temporary file, then a rename), so an interrupted run leaves the
old file whole. A script that fails keeps
its old section and makes the run exit 1.

    python benchmarks/run_all.py                      # everything; rewrites BENCHMARKS.md
    python benchmarks/run_all.py --only bert,rnn      # just these (the other sections stay)
    python benchmarks/run_all.py --list               # the benchmarks and their arguments
    python benchmarks/run_all.py --smoke -o /tmp/B.md # every --smoke, into a scratch copy

``--smoke`` runs every script's ``--smoke`` (tiny sizes, seconds each) and writes a scratch copy,
never BENCHMARKS.md: it tests the pipeline, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
from _common import gemm_gflops, load_average, machine_line, md_table, utc_now, write_atomically  # noqa: E402

# The order of value (the figures the README quotes first); scripts not named here follow in
# alphabetical order.
ORDER = ["train_throughput", "bert", "rnn", "translation", "detection_ops", "hardware",
         "augment", "dense", "decoding", "book", "distributed", "complexity"]
# Arguments beyond a script's defaults that make its standard run (at least 5 interleaved
# repeats where it times a peer).
STANDARD: dict[str, list[str]] = {
    "train_throughput": ["--repeats", "5"],
    "bert": ["--repeats", "5"],
    "rnn": ["--rounds", "5"],
    "translation": ["--repeats", "5"],
    "detection_ops": ["--repeats", "7"],
    "hardware": ["--repeats", "5"],  # SCALE-Sim's run is ~2 min over all layers a round
    "book": ["--repeats", "5"],
}
HEADER = "header"


class RunAllError(Exception):
    """A mistake in run_all's own arguments: printed as one line, exit 2."""


def scripts() -> list[str]:
    """Every benchmark script: ``benchmarks/*.py`` but this one and the ``_`` helpers, in
    ``ORDER`` first."""
    names = {p.stem for p in HERE.glob("*.py")
             if not p.name.startswith("_") and p.stem != Path(__file__).stem}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def writes_markdown(name: str) -> bool:
    """Whether the script takes ``--markdown PATH`` (it says so in its source)."""
    source = (HERE / f"{name}.py").read_text(encoding="utf-8")
    return "--markdown" in source or "add_markdown_arg" in source


def command_of(name: str, smoke: bool) -> list[str]:
    args = ["--smoke"] if smoke else STANDARD.get(name, [])
    return [sys.executable, str(HERE / f"{name}.py"), *args]


def shown(cmd: list[str]) -> str:
    """The command as a user types it from the repository root."""
    return " ".join(["python", f"benchmarks/{Path(cmd[1]).name}", *cmd[2:]])


# ----------------------------------------------------------------------------- markers


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the part between NAME's markers replaced by ``body``; without markers, the
    block is appended at the end (the header's goes after the ``# `` title)."""
    def place(text: str, block: str) -> str:
        if name == HEADER:
            m = re.search(r"(?m)^# .*\n", text)
            at = m.end() if m else 0
            return text[:at] + "\n" + block + "\n" + text[at:]
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return _common.replace_block(text, name, body, missing=place)


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    name: str
    command: str
    returncode: int
    seconds: float
    load_before: str
    load_after: str
    output: str
    section: str | None  # the markdown for the markers; None: keep the old one

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.section is not None


def run_script(name: str, smoke: bool, timeout_s: float, echo: bool = True) -> Outcome:
    """Run one benchmark in its own process, its output streamed to ours, and collect its
    section (its ``--markdown`` file, or its output in a code block)."""
    cmd = command_of(name, smoke)
    with tempfile.TemporaryDirectory(prefix=f"dk-bench-{name}-") as tmp:
        md = Path(tmp) / "section.md"
        markdown = writes_markdown(name)
        full = cmd + (["--markdown", str(md)] if markdown else [])
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        load_before, start = load_average(), time.perf_counter()
        proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        killer = threading.Timer(timeout_s, kill_group, (proc,))
        killer.start()
        lines = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(f"  {name}| {line}", end="", flush=True)
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the script runs in its own session, stop it
            kill_group(proc)
            raise
        finally:
            timed_out = not killer.is_alive()
            killer.cancel()
        seconds = time.perf_counter() - start
        output = "".join(lines)
        if timed_out:
            output += f"\n(run_all: stopped after {timeout_s:.0f} s)\n"
        section = None
        if code == 0:
            if not markdown:
                section = fallback_section(name, shown(cmd), output)
            elif md.is_file():
                section = md.read_text(encoding="utf-8")
    outcome = Outcome(name, shown(cmd), code, seconds, load_before, load_average(), output,
                      section)
    if outcome.ok:
        outcome.section = outcome.section.rstrip("\n") + "\n\n" + run_line(outcome) + "\n"
    return outcome


def kill_group(proc: subprocess.Popen[str]) -> None:
    """Stop a script and the processes it started (loader workers, gloo ranks): it runs in a
    session of its own, so its process group is exactly those."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def fallback_section(name: str, command: str, output: str) -> str:
    """The section of a script without ``--markdown``: its docstring's first line as the title
    and its console output as it printed it."""
    doc = (HERE / f"{name}.py").read_text(encoding="utf-8")
    m = re.search(r'^"""(.+?)$', doc, re.MULTILINE)
    title = m.group(1).replace('"""', "").strip().rstrip(".") if m else name
    return (f"## {title}\n\n```\n{command}\n```\n\nConsole output of the run (this script does "
            f"not write markdown tables yet):\n\n```\n{output.rstrip()}\n```\n")


def run_line(o: Outcome) -> str:
    return (f"*Run by `benchmarks/run_all.py` on {utc_now()}: {o.seconds:.0f} s, "
            f"load average {o.load_before} → {o.load_after}.*")


def header(outcomes: list[Outcome], smoke: bool, gemm: dict[str, float], loads: tuple[str, str],
           seconds: float, partial: bool) -> str:
    failed = [o.name for o in outcomes if not o.ok]
    what = "`--smoke` (tiny sizes: these figures test the pipeline, they measure nothing)" \
        if smoke else "standard settings"
    ran = ", ".join(f"`{o.name}`" for o in outcomes)
    rows = [
        ["generated", f"{utc_now()} by `python benchmarks/run_all.py`"
                      + (" --only ..." if partial else "") + f", {what}"],
        ["benchmarks run", ran + (" (the other sections keep their own run's date)"
                                  if partial else "")],
        ["failed (old section kept)", ", ".join(f"`{n}`" for n in failed) or "none"],
        ["machine", machine_line()],
        ["fp32 GEMM rate (1024³)", "; ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in gemm.items())],
        ["load average (1 min)", f"{loads[0]} before → {loads[1]} after"],
        ["wall time", f"{seconds:.0f} s"],
    ]
    return ("Every table between `bench:` markers below is generated by the run described here "
            "(hand-written text sits outside the markers). Ratios are medians of interleaved "
            "repeats with their min–max; a goal is \"met\" only when the whole spread clears it, "
            "\"not settled\" when the spread crosses it.\n\n"
            + md_table(["run", ""], rows, "ll") + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Run from anywhere; paths are the repository's.")
    p.add_argument("--only", default=None, help="comma-separated benchmark names (see --list)")
    p.add_argument("--skip", default=None, help="comma-separated benchmark names to leave out")
    p.add_argument("--list", action="store_true", help="print the benchmarks and their commands")
    p.add_argument("--smoke", action="store_true",
                   help="every script's --smoke into a scratch copy (-o; default: a file in "
                        "the temp folder), never BENCHMARKS.md")
    p.add_argument("-o", "--output", default=None,
                   help="the file to write (default: BENCHMARKS.md; with --smoke a temp file)")
    p.add_argument("--template", default=str(ROOT / "BENCHMARKS.md"),
                   help="the file whose prose and markers are kept (default: BENCHMARKS.md)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per script before it is stopped (default 5400; --smoke 300)")
    p.add_argument("--no-gemm", action="store_true",
                   help="skip measuring the GEMM rate (tests)")
    p.add_argument("--quiet", action="store_true", help="do not echo the scripts' output")
    return p.parse_args(argv)


def selected(args: argparse.Namespace) -> list[str]:
    names = scripts()
    for option in ("only", "skip"):
        value = getattr(args, option)
        if value:
            asked = [n.strip() for n in value.split(",") if n.strip()]
            unknown = [n for n in asked if n not in names]
            if unknown:
                raise RunAllError(f"--{option}: no benchmark named {', '.join(unknown)} "
                                  f"(known: {', '.join(names)})")
            names = [n for n in names if (n in asked) == (option == "only")]
    if not names:
        raise RunAllError("nothing to run: --only/--skip left no benchmark")
    return names


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        names = selected(args)
        template = Path(args.template)
        if not template.is_file():
            raise RunAllError(f"--template {template}: no such file")
        if args.output:
            output = Path(args.output)
        elif args.smoke:
            output = Path(tempfile.gettempdir()) / "divekit-bench-smoke" / "BENCHMARKS.md"
        else:
            output = ROOT / "BENCHMARKS.md"
        if args.smoke and output.resolve() == (ROOT / "BENCHMARKS.md").resolve():
            raise RunAllError("--smoke writes a scratch copy, never BENCHMARKS.md: give -o "
                              "another path")
    except RunAllError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for n in scripts():
            kind = "markdown" if writes_markdown(n) else "console output"
            print(f"{n:<18} {shown(command_of(n, args.smoke)):<58} ({kind})")
        return 0
    timeout = args.timeout or (300.0 if args.smoke else 5400.0)
    gemm_s = 0.25 if args.smoke else 1.0  # seconds per GEMM measurement
    loads = [load_average()]
    start = time.perf_counter()
    gemm: dict[str, float] = {}
    if not args.no_gemm:
        import torch

        for t in sorted({1, torch.get_num_threads()}):
            gemm[f"{t} thread{'s' * (t > 1)}, before"] = gemm_gflops(threads=t,
                                                                      seconds=gemm_s)
    print(f"run_all: {len(names)} benchmark(s) {'--smoke ' if args.smoke else ''}-> {output}",
          flush=True)
    outcomes = []
    for name in names:
        print(f"[{name}] {shown(command_of(name, args.smoke))}", flush=True)
        o = run_script(name, args.smoke, timeout, echo=not args.quiet)
        outcomes.append(o)
        status = ("ok" if o.ok else f"FAILED (exit {o.returncode})" if o.returncode
                  else "FAILED (exit 0, but it wrote no --markdown section)")
        print(f"[{name}] {status} in {o.seconds:.0f} s", flush=True)
        if not o.ok and args.quiet:
            print(o.output[-3000:], flush=True)
    if not args.no_gemm:
        import torch

        for t in sorted({1, torch.get_num_threads()}):
            gemm[f"{t} thread{'s' * (t > 1)}, after"] = gemm_gflops(threads=t, seconds=gemm_s)
    loads.append(load_average())
    text = template.read_text(encoding="utf-8")
    for o in outcomes:
        if o.ok and o.section is not None:
            text = replace_block(text, o.name, o.section)
    partial = len(names) < len(scripts())
    text = replace_block(text, HEADER, header(outcomes, args.smoke, gemm, (loads[0], loads[1]),
                                              time.perf_counter() - start, partial))
    write_atomically(output, text)
    if output.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        from _headline import update_readme  # README's headline figures come from this file

        changed = update_readme(output, ROOT / "README.md")
        print(f"run_all: README.md's headline block {'rewritten' if changed else 'unchanged'}")
    failed = [o.name for o in outcomes if not o.ok]
    print(f"run_all: wrote {output}; "
          + (f"FAILED: {', '.join(failed)} (their old sections kept)" if failed
             else "every benchmark ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the running script (a session of its own) is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
