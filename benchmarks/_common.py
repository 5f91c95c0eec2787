"""What every benchmark shares: interleaved timing, ratios with their spread, goal verdicts, the
machine's description and the markdown section a script writes for ``run_all.py``.

Why interleave. On a shared machine the load changes by the second. Timing all of one side and
then all of the other hands whichever ran during the busy minute a handicap; alternating the
sides (peer, divekit, peer, divekit, ...) spreads the load over both alike. Each round gives one
*paired* ratio (peer's time / divekit's time in the same round), so a ratio is reported as the
median of those pairs with their min–max: the spread says how far the verdict can be trusted.

Why a spread-aware verdict. A median of 1.31× against a goal of 1.3× means nothing if the pairs
ranged from 1.1× to 1.5×: the next run may well land below. So a goal is "met" only when every
pair is on the right side of it, "not met" when every pair is on the wrong side, and "not
settled" when the spread crosses it (:func:`verdict`).

Scripts use it as::

    from _common import Report, add_markdown_arg, interleave, paired_ratio, verdict

    times = interleave({"peer": run_peer, "divekit": run_ours}, repeats=5)
    r = paired_ratio(times["peer"], times["divekit"])      # > 1: divekit faster
    print(f"ratio {r}")                                     # "1.42x (1.31-1.50)"
    report = Report("Training throughput", "python benchmarks/x.py")
    report.table(["case", "ratio", "goal", "verdict"],
                 [["lenet", r.md(), "≥ 1.3×", verdict(r, 1.3)]])
    report.write(args.markdown)                             # when --markdown PATH was given

The leading underscore keeps this module out of the benchmark smoke tests (it is not a script).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import os
import platform
import pstats
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- timing


def wall(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes on the wall clock."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(sides: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 0,
               timer: Callable[[Callable[[], object]], float] = wall) -> dict[str, list[float]]:
    """Time every side ``repeats`` times, one round after another: in each round the sides run
    once each, in the order given (put the peer first: peer, divekit, peer, divekit, ...).

    ``warmup`` rounds run first and are not kept (lazy initialisation, oneDNN kernel selection,
    page faults of first-touched memory). ``timer(fn)`` returns the seconds of one call; the
    default is :func:`wall`. Returns ``{side: [seconds of round 1, round 2, ...]}``, aligned by
    round so :func:`paired_ratio` can pair them.
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(timer(fn))
    return times


@dataclass(frozen=True)
class Spread:
    """A median with the smallest and largest value it was taken from."""

    median: float
    lo: float
    hi: float
    n: int = 1  # how many values

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def __str__(self) -> str:  # plain text, for the console (the smoke tests' regexes)
        return f"{self.median:.2f}x ({self.lo:.2f}-{self.hi:.2f})"

    def md(self, digits: int = 2) -> str:
        """Markdown cell: ``**1.42×** (1.31–1.50)``."""
        return f"**{self.median:.{digits}f}×** ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


def paired_ratio(peer: Sequence[float], ours: Sequence[float]) -> Spread:
    """Speed-up of ``ours`` over ``peer`` from times measured in the same rounds: the median and
    min–max of ``peer[i] / ours[i]`` (above 1: ours is faster). For rates (higher is better)
    pass them swapped: ``paired_ratio(our_rates, peer_rates)``."""
    if len(peer) != len(ours) or not peer:
        raise ValueError(f"paired_ratio needs two equal, non-empty lists, got {len(peer)} "
                         f"and {len(ours)}")
    return Spread.of([p / o for p, o in zip(peer, ours, strict=True)])


MIN_SETTLING = 3  # fewer pairs than this settle nothing: one round has no spread to speak of


def verdict(ratio: Spread, goal: float | None, higher_is_better: bool = True) -> str:
    """"met" when the whole spread is on the right side of ``goal``, "not met" when all of it is
    on the wrong side, "not settled" when the spread crosses it or rests on fewer than
    ``MIN_SETTLING`` pairs (a ``--smoke`` run's single round); "—" without a goal."""
    if goal is None:
        return "—"
    if ratio.n < MIN_SETTLING:
        return f"not settled ({ratio.n} round{'s' * (ratio.n != 1)})"
    lo, hi = (ratio.lo, ratio.hi) if higher_is_better else (-ratio.hi, -ratio.lo)
    g = goal if higher_is_better else -goal
    if lo >= g:
        return "met"
    if hi < g:
        return "not met"
    return "not settled"


def goal_cell(goal: float | None) -> str:
    return "—" if goal is None else f"≥ {goal:g}×"


# ----------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """One side's profile of one call: every entry ``(name, self ms, calls)`` by self time, most
    first, and the call's wall-clock milliseconds under the profiler."""

    entries: list[tuple[str, float, int]]
    wall_ms: float

    @property
    def total_ms(self) -> float:
        """The self time of every entry: for torch's profiler the time inside operators (the
        rest of ``wall_ms`` is Python, the data loader and waiting); for cProfile, all of it."""
        return sum(ms for _, ms, _ in self.entries)


def op_profile(fn: Callable[[], object]) -> Profile:
    """Every operator of one call of ``fn`` under torch's profiler, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall_ms = (time.perf_counter() - start) * 1e3
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return Profile([(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events], wall_ms)


def top_ops(fn: Callable[[], object], k: int = 8) -> list[tuple[str, float, int]]:
    """The ``k`` operators that took the most self CPU time in one call of ``fn``, under
    torch's profiler: ``[(operator, self ms, calls), ...]``. Where a goal is not met, the
    top operators of both sides say where the time goes (the same kernels on both sides: the
    gap is overhead around them; a kernel only one side runs: that kernel)."""
    return op_profile(fn).entries[:k]


def summary_rows(profiles: Mapping[str, Profile], what: str) -> list[list[str]]:
    """The rows under a side-by-side profile table that say where each side's time goes in
    figures: the profiled call's wall time, the part inside the ``what`` (operators: the rest
    is Python around them, the loader, waiting) and the part inside the entries that *every*
    side has, which, when it is most of both calls and about equal, says the sides are bound by
    the same kernels, and when it is not, that the gap lies in what one side alone runs."""
    shared = set.intersection(*({name for name, _, _ in p.entries} for p in profiles.values()))
    rows = [["", *(f"whole call {p.wall_ms:,.1f} ms" for p in profiles.values())]]
    if what == "operators":
        rows.append(["", *(f"in operators {p.total_ms:,.1f} ms ({pct(p.total_ms, p.wall_ms)})"
                           for p in profiles.values())])
    in_shared = [sum(ms for name, ms, _ in p.entries if name in shared)
                 for p in profiles.values()]
    rows.append(["", *(f"in the {len(shared)} {what} every side calls {ms:,.1f} ms "
                       f"({pct(ms, p.wall_ms)})" for ms, p in zip(in_shared, profiles.values()))])
    return rows


# what a caption says of the summary rows under a torch.profiler table
SUMMARY_NOTE = ("The last three rows: each side's whole profiled call, the part inside operators "
                "(the rest is Python around them, data loading, waiting) and the part in the "
                "operators every side calls (most of both calls and about equal: both sides are "
                "bound by the same kernels).")


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole > 0 else "—"


def side_by_side(profiles: Mapping[str, Profile], what: str, k: int, digits: int = 1
                 ) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each side's top ``k`` entries side by side, then :func:`summary_rows`."""
    unit = "operator" if what == "operators" else "function"
    headers = ["#"] + [f"{name}: {unit}, self ms (calls)" for name in profiles]
    rows = []
    for i in range(k):
        row = [str(i + 1)]
        for p in profiles.values():
            e = p.entries
            row.append(f"`{e[i][0]}` {e[i][1]:.{digits}f} ({e[i][2]})" if i < len(e) else "")
        rows.append(row)
    return headers, rows + summary_rows(profiles, what)


def profile_table(sides: Mapping[str, Callable[[], object]], k: int = 8) -> tuple[
        list[str], list[list[str]]]:
    """Headers and rows of a side-by-side table of each side's operators under torch's profiler
    (one call each; :func:`op_profile`), the top ``k`` and the summary rows, for
    :meth:`Report.table`."""
    return side_by_side({name: op_profile(fn) for name, fn in sides.items()}, "operators", k)


# ----------------------------------------------------------------------------- memory


class PeakRSS:
    """Peak resident memory of this process while a block runs, sampled every ``interval_s`` by
    a background thread (``/proc/self/statm``; Linux only, 0 elsewhere)::

        with PeakRSS() as mem:
            work()
        mem.peak_mb, mem.growth_mb   # highest RSS seen; that minus the RSS at entry

    ``growth_mb`` is what the block needed beyond what the process already held; memory freed
    by an earlier block and kept by the allocator can hide part of it, so compare sides each in
    a fresh process when the figure matters.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self.rss_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb


# Peak memory of one side in a process of its own. In one process the sides' peaks mix: the
# allocator keeps what an earlier side freed, and ru_maxrss only rises. So a script that
# reports memory runs each side once more in a fresh process: ``python SCRIPT ARGS
# --memory-of SIDE``, which builds what that side needs (imports, data), runs it once and ends
# with :func:`print_peak_rss`'s line, which :func:`side_peak_rss` reads.

def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """``--no-memory`` (skip the fresh-process runs), ``--memory-runs N`` and the hidden
    ``--memory-of SIDE``."""
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (each side once more in a fresh "
                             "process)")
    parser.add_argument("--memory-runs", type=int, default=3, metavar="N",
                        help="fresh processes per side for the peak memory (default 3; 1 with "
                             "--smoke): the median is shown with its min-max, and the goal is "
                             "'not settled' when the two sides' ranges overlap")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)


def memory_runs(args: argparse.Namespace) -> int:
    """How many fresh processes a side's peak memory takes: ``--memory-runs``, 1 with
    ``--smoke``."""
    return 1 if getattr(args, "smoke", False) else max(1, args.memory_runs)


@dataclass(frozen=True)
class Peak:
    """One side's peak memory over one or more fresh processes: each run's ``(own, largest
    child, before)`` in MB (see :func:`print_peak_rss`). It reads as the tuple of the runs'
    medians, so ``own, children, before = peak`` and ``peak[0]`` work as for a single run."""

    runs: tuple[tuple[float, float, float], ...]

    def _medians(self) -> tuple[float, float, float]:
        return tuple(statistics.median(r[i] for r in self.runs) for i in range(3))

    def __iter__(self):
        return iter(self._medians())

    def __getitem__(self, i: int) -> float:
        return self._medians()[i]

    @property
    def owns(self) -> list[float]:
        return [r[0] for r in self.runs]

    @property
    def lo(self) -> float:
        return min(self.owns)

    @property
    def hi(self) -> float:
        return max(self.owns)


def own_peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` of ``/proc/self/status`` on Linux, the high-water
    mark of this process's own address space. Not ``ru_maxrss``: Linux carries that over
    ``execve`` from the address space the process had before, which for a child started by
    ``subprocess`` is its parent's (a fork shares the parent's pages), so a small child of a
    large benchmark would report the benchmark's peak. Elsewhere, ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    scale = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def print_peak_rss(fn: Callable[[], object]) -> None:
    """Run ``fn`` once and print ``peak_rss_mb OWN CHILDREN BEFORE``: this process's peak RSS
    (:func:`own_peak_rss_mb`), its largest finished child's (loader workers, spawned ranks:
    ``ru_maxrss``, which counts the pages a forked child shares with this process) and the RSS
    just before the call, in MB."""
    import resource

    before = PeakRSS.rss_mb()
    fn()
    own = own_peak_rss_mb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak_rss_mb {own:.1f} {children:.1f} {before:.1f}", flush=True)


def side_peak_rss(script: str, side: str, argv: Sequence[str] = (),
                  timeout: float = 1800) -> tuple[float, float, float]:
    """``(own, largest child, before)`` peak RSS in MB of ``side`` run once by ``python script
    *argv --memory-of side`` in a fresh process (see :func:`print_peak_rss`)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script, *argv, "--memory-of", side],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("peak_rss_mb ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"--memory-of {side} failed (exit {proc.returncode}): "
                           + " | ".join(tail))
    own, children, before = lines[-1].split()[1:]
    return float(own), float(children), float(before)


def sides_peak_rss(script: str, sides: Sequence[str], argv: Sequence[str] = (),
                   parallel: int = 2, runs: int = 1) -> dict[str, Peak]:
    """The :class:`Peak` of every side over ``runs`` fresh processes each, ``parallel`` processes
    at a time (a peak RSS is each process's own, so running them side by side changes nothing
    but the wall time); the runs of the sides are interleaved (side a, side b, side a, ...)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [(side, pool.submit(side_peak_rss, script, side, argv))
                   for _ in range(runs) for side in sides]
        done: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
        for side, f in futures:
            done[side].append(f.result())
    return {side: Peak(tuple(r)) for side, r in done.items()}


def forwarded_argv(drop: Sequence[str] = ("--markdown", "--no-memory", "--memory-runs")
                   ) -> list[str]:
    """This script's command-line arguments for a ``--memory-of`` child: the same sizes, less
    ``drop`` (with the values of ``--markdown`` and ``--memory-runs``: the child writes no
    section and measures itself once)."""
    import sys

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = name in ("--markdown", "--memory-runs") and "=" not in arg
            continue
        argv.append(arg)
    return argv


def memory_verdict(ours: Peak, peer: Peak) -> str:
    """Issue 26's memory goal, divekit ≤ the peer, judged on the ranges of the fresh processes as
    the time goals are: "met" when divekit's highest run is at or below the peer's lowest, "not
    met" when its lowest is above the peer's highest, "not settled" when they overlap (a peak
    RSS varies by tens of MB between identical runs). With one run a side, a plain comparison."""
    if ours.hi <= peer.lo:
        return "met"
    return "not met" if ours.lo > peer.hi else "not settled"


def memory_note(runs: int) -> str:
    """What a memory table's caption says of its runs."""
    if runs <= 1:
        return "One fresh process a side."
    return (f"Each side in {runs} fresh processes, the sides' runs interleaved: the median peak "
            "and its min–max; the goal is judged on the ranges (not settled where they "
            "overlap).")


MEMORY_HEADERS = ["side", "peak RSS, MB", "of which the call, MB", "largest child, MB"]


def memory_cells(peak: Peak) -> list[str]:
    """A memory row's cells after the side's name (see :data:`MEMORY_HEADERS`): the runs'
    medians, the peak's min–max beside it when there were several runs."""
    own, children, before = peak
    spread = f" ({peak.lo:,.0f}–{peak.hi:,.0f})" if len(peak.runs) > 1 else ""
    return [f"{own:,.0f}{spread}", f"{own - before:+,.0f}", f"{children:,.0f}" if children else "—"]


# ----------------------------------------------------------------------------- --compile

COMPILE_GOAL = 1.2  # issue 26: --compile becomes a family's default where it wins this much
COMPILE_HEADERS = ["case", "eager", "compiled", "compiled / eager (min–max)",
                   "compile s, first run", "compile s, later runs", f"≥ {COMPILE_GOAL}×"]


@dataclass(frozen=True)
class CompileResult:
    """Eager and compiled seconds per step, round by round, and the compile time of each
    round (the compiled first call beyond the eager first call)."""

    eager: list[float]
    compiled: list[float]
    compile_s: list[float]

    @property
    def ratio(self) -> Spread:
        """Compiled speed over eager speed, per round (above 1: compiling pays)."""
        return paired_ratio(self.eager, self.compiled)

    def cells(self, case: str, unit: Callable[[float], str]) -> list[str]:
        """A row under :data:`COMPILE_HEADERS`; ``unit(seconds per step)`` formats a speed."""
        later = Spread.of(self.compile_s[1:]) if len(self.compile_s) > 1 else None
        return [case, unit(statistics.median(self.eager)), unit(statistics.median(self.compiled)),
                self.ratio.md(), f"{self.compile_s[0]:.1f}",
                f"{later.median:.1f} ({later.lo:.1f}–{later.hi:.1f})" if later else "—",
                verdict(self.ratio, COMPILE_GOAL)]

    def __str__(self) -> str:
        return (f"compiled/eager {self.ratio} after compilation (goal >= {COMPILE_GOAL}x: "
                f"{verdict(self.ratio, COMPILE_GOAL)}); compile {self.compile_s[0]:.1f} s "
                f"first run, later runs {[round(c, 1) for c in self.compile_s[1:]]} s")


def compiled_vs_eager(build: Callable[[bool], Callable[[], object]], rounds: int,
                      steps: int) -> CompileResult:
    """``build(compiled)`` gives a fresh step function (its model compiled in place with
    ``divekit.engine.compile.compile_model`` when ``compiled``); every round builds both, eager
    first, and times the first call (where torch.compile compiles) and then ``steps`` calls.
    The in-process compile caches are cleared before every build (``torch._dynamo.reset()``)
    and Inductor's disk cache is a fresh folder for the whole measurement, so round 1's compile
    time is a first run's and the later rounds' a run's on a machine that compiled it before."""
    import shutil
    import tempfile

    import torch._dynamo

    had = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache = tempfile.mkdtemp(prefix="dk-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    per_step: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(rounds):
            for compiled in (False, True):
                torch._dynamo.reset()
                step = build(compiled)
                first[compiled].append(wall(step))
                per_step[compiled].append(
                    wall(lambda step=step: [step() for _ in range(steps)]) / steps)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if had is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = had
    return CompileResult(per_step[False], per_step[True],
                         [c - e for c, e in zip(first[True], first[False])])


# ----------------------------------------------------------------------------- the machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average, or "n/a" where the OS has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def gemm_gflops(n: int = 1024, seconds: float = 1.0, threads: int | None = None) -> float:
    """The machine's fp32 matrix-multiply rate in GFLOP/s: ``n × n`` by ``n × n`` products
    (2n³ floating-point operations each) repeated for about ``seconds``, the median of five
    slices. The ceiling a compute-bound step can reach here: a training step's FLOPs divided by
    its time, over this figure, says how close to the machine it runs."""
    import torch  # here, not at the top: run_all's --list and argument errors need no torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: kernel choice, first touch of out
        per_slice = max(seconds / 5, 0.01)
        rates = []
        for _ in range(5):
            calls, start = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=out)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= per_slice:
                    break
            rates.append(2 * n**3 * calls / elapsed / 1e9)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(previous)


def machine_line(threads: int | None = None) -> str:
    """One line: CPU, logical cores, torch version, threads, load average now."""
    import torch

    t = threads if threads is not None else torch.get_num_threads()
    return (f"{cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{t} thread(s), load {load_average()}")


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- generated blocks

# BENCHMARKS.md's and README's generated parts sit between ``<!-- bench:NAME -->`` and
# ``<!-- /bench:NAME -->``; the text outside the markers is hand-written and never touched.
MARKER = "<!-- {slash}bench:{name} -->"


def block_pattern(name: str) -> re.Pattern[str]:
    start, end = MARKER.format(slash="", name=name), MARKER.format(slash="/", name=name)
    return re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)


def block_of(text: str, name: str) -> str | None:
    """The generated text between NAME's markers, or None without them."""
    m = block_pattern(name).search(text)
    if m is None:
        return None
    start = MARKER.format(slash="", name=name)
    return m.group(0)[len(start) + 1: -len(MARKER.format(slash="/", name=name))]


def replace_block(text: str, name: str, body: str, missing: Callable[[str, str], str] | None = None
                  ) -> str:
    """``text`` with the part between NAME's markers replaced by ``body`` (backslashes in it kept
    as they are). Without the markers, ``missing(text, block)`` places the whole marked block, or,
    when ``missing`` is None, a :class:`KeyError` names the markers that are not there."""
    body = body if body.endswith("\n") else body + "\n"
    block = f"{MARKER.format(slash='', name=name)}\n{body}{MARKER.format(slash='/', name=name)}"
    pattern = block_pattern(name)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    if missing is None:
        raise KeyError(f"no {MARKER.format(slash='', name=name)} ... "
                       f"{MARKER.format(slash='/', name=name)} markers")
    return missing(text, block)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and a rename: readers see the old file
    or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- markdown


def add_markdown_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", metavar="PATH", default=None,
                        help="also write this benchmark's section of BENCHMARKS.md (a '## ' "
                             "title, the command, the tables) to PATH; benchmarks/run_all.py "
                             "puts it between the section's markers")


def md_escape(cell: object) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
             align: str | None = None) -> str:
    """A markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: the
    first column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError("md_table: every row and the alignment need one entry per header")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |",
             "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, as typed from the repository root, without ``--markdown``
    and its path (which differ from run to run)."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    args, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a == "--markdown":
            skip = True
        elif not a.startswith("--markdown="):
            args.append(a)
    return " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *args])


class Report:
    """A benchmark's section of BENCHMARKS.md, built while the script runs and written at the
    end: a ``## `` title, the command that produced it (default: this process's own), a line
    on the machine, then tables and short generated notes in the order they were added."""

    def __init__(self, title: str, command: str | None = None,
                 threads: int | None = None) -> None:
        self.title, self.command = title, command or command_line()
        self.parts: list[str] = [f"Generated {utc_now()}: {machine_line(threads)}."]

    def text(self, paragraph: str) -> None:
        self.parts.append(paragraph.strip())

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]],
              align: str | None = None, caption: str | None = None) -> None:
        if caption:
            self.parts.append(caption.strip())
        self.parts.append(md_table(headers, rows, align))

    def code(self, text: str) -> None:
        self.parts.append("```\n" + text.rstrip("\n") + "\n```")

    def render(self) -> str:
        head = f"## {self.title}\n\n```\n{self.command}\n```"
        return "\n\n".join([head, *self.parts]) + "\n"

    def write(self, path: str | os.PathLike[str] | None) -> None:
        """Write the section to ``path`` (nothing when it is None: ``--markdown`` not given)."""
        if path is None:
            return
        Path(path).write_text(self.render(), encoding="utf-8")


def function_profile(fn: Callable[[], object], warm: bool = True) -> Profile:
    """Every function of one call of ``fn`` under cProfile, by self time. torch operators show
    as built-ins; a C kernel called through ctypes counts as its Python caller's self time.
    ``warm`` calls ``fn`` once first, so first-touch page faults and lazy set-up are not what
    the profile sees."""
    if warm:
        fn()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall_ms = (time.perf_counter() - start) * 1e3
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, self s, cum s, _)}
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    return Profile([(f"{Path(file).name}:{line}({name})" if line else name, own * 1e3, calls)
                    for (file, line, name), (_, calls, own, _cum, _callers) in top], wall_ms)


def top_functions(fn: Callable[[], object], k: int = 8, warm: bool = True
                  ) -> list[tuple[str, float, int]]:
    """The ``k`` functions with the most self time over one call of ``fn`` (cProfile):
    ``[(function, self ms, calls), ...]`` (:func:`function_profile`)."""
    return function_profile(fn, warm).entries[:k]


def function_table(sides: Mapping[str, Callable[[], object]], k: int = 8, warm: bool = True,
                   digits: int = 2) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a side-by-side table of each side's top functions by self time (one
    call each, :func:`function_profile`) and the summary rows."""
    profiles = {name: function_profile(fn, warm) for name, fn in sides.items()}
    return side_by_side(profiles, "functions", k, digits)


def profile_report(report: Report, name: str, outcome: str,
                   sides: dict[str, Callable[[], object]], k: int = 8) -> None:
    """Print and add to ``report`` a side-by-side table of each side's top functions by self
    time (:func:`function_table` of ``sides``, ``{"d2l": fn, "divekit": fn}``, one call each
    after a warm-up call): the analysis a goal not met (``outcome``) owes its reader."""
    headers, rows = function_table(sides, k)
    caption = (f"Where the time goes in {name} (its goal: {outcome}): the top functions by self "
               "time of one call of each side after a warm-up call (cProfile), then each "
               "side's whole call and the part in the functions both sides call.")
    print(caption)
    for row in rows:
        print("  " + " | ".join(row))
    report.table(headers, rows, align="l" * len(headers), caption=caption)


def endless(loader, first_epoch: int = 0):
    """The loader's batches, epoch after epoch, calling ``set_epoch(first_epoch)``,
    ``set_epoch(first_epoch + 1)``, ... first where it has one (a profile's steps then see the
    batches the timed run sees)."""
    epoch = first_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1
