"""``benchmarks/run_all.py`` (``make bench``) and ``benchmarks/_common.py``: the pipeline that
regenerates BENCHMARKS.md's tables.

* the measuring helpers: paired ratios with their spread, the spread-aware goal verdict, the
  markdown table;
* the markers: a section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` is
  replaced, the prose around it is kept, missing markers are appended;
* the pipeline end to end on a folder of cheap scripts (``--smoke --only fast`` into a scratch
  copy): the header with the machine, load and GEMM rate, the script's section in its markers
  (every real script's ``--smoke --markdown`` section: tests/test_benchmarks_smoke.py);
* failures: a failing script keeps its old section and the run exits 1; a script without
  ``--markdown`` gets its console output; bad arguments are one line, exit 2.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("_common")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def run_all(common):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCHMARKS))


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- measuring


def test_paired_ratio_pairs_rounds(common):
    # round i: the peer took peer[i] s, divekit ours[i] s; the ratios are 2, 4, 3
    r = common.paired_ratio([2.0, 8.0, 3.0], [1.0, 2.0, 1.0])
    assert (r.median, r.lo, r.hi, r.n) == (3.0, 2.0, 4.0, 3)
    # not the ratio of the medians (3 / 1 = 3 here too) but of pairs: check a case where they
    # differ
    r = common.paired_ratio([1.0, 10.0, 10.0], [1.0, 1.0, 10.0])
    assert r.median == 1.0 and r.hi == 10.0
    with pytest.raises(ValueError):
        common.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize(("lo", "hi", "expected"), [
    (1.31, 1.50, "met"), (1.30, 1.40, "met"), (1.10, 1.50, "not settled"),
    (0.90, 1.29, "not met"),
])
def test_verdict_uses_the_whole_spread(common, lo, hi, expected):
    assert common.verdict(common.Spread((lo + hi) / 2, lo, hi, 5), 1.3) == expected


def test_verdict_lower_is_better_and_few_rounds(common):
    s = common.Spread(0.8, 0.7, 0.85, 5)  # e.g. memory divekit / course, goal <= 1.0
    assert common.verdict(s, 1.0, higher_is_better=False) == "met"
    assert common.verdict(common.Spread(1.1, 0.9, 1.2, 5), 1.0, higher_is_better=False) \
        == "not settled"
    assert common.verdict(common.Spread(5.0, 5.0, 5.0, 1), 1.2).startswith("not settled")
    assert common.verdict(common.Spread(5.0, 5.0, 5.0, 5), None) == "—"


def test_interleave_alternates_sides(common):
    calls = []
    times = common.interleave({"peer": lambda: calls.append("p"),
                               "divekit": lambda: calls.append("d")}, repeats=3, warmup=1)
    assert calls == ["p", "d"] * 4
    assert {k: len(v) for k, v in times.items()} == {"peer": 3, "divekit": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_md_table_and_report(common, tmp_path):
    table = common.md_table(["a", "b"], [["x|y", 1.5]])
    assert table.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1.5 |"]
    with pytest.raises(ValueError):
        common.md_table(["a", "b"], [["only one"]])
    report = common.Report("Title", "python benchmarks/x.py --repeats 5")
    report.table(["k", "v"], [["a", "1"]], caption="Caption:")
    report.write(tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    assert text.startswith("## Title\n\n```\npython benchmarks/x.py --repeats 5\n```\n")
    assert "Caption:\n\n| k | v |" in text and "torch " in text
    assert common.command_line(["/x/benchmarks/bert.py", "--markdown", "/tmp/a.md",
                                "--repeats", "5"]) == "python benchmarks/bert.py --repeats 5"


def test_profile_table_names_the_operators(common):
    import torch

    a = torch.randn(64, 64)
    headers, rows = common.profile_table({"mm": lambda: a @ a @ a,
                                          "add": lambda: a + a}, k=3)
    assert headers == ["#", "mm: operator, self ms (calls)", "add: operator, self ms (calls)"]
    assert any("aten::mm" in r[1] for r in rows[:3]) and any("aten::add" in r[2] for r in rows[:3])
    whole, inside, shared = rows[3:]  # the summary: where each side's call goes, in figures
    assert [r[0] for r in rows[3:]] == ["", "", ""]
    assert all(c.startswith("whole call ") and c.endswith(" ms") for c in whole[1:])
    assert all(c.startswith("in operators ") and c.endswith("%)") for c in inside[1:])
    # matmul and addition share no operator: nothing is common to both sides
    assert shared[1:] == ["in the 0 operators every side calls 0.0 ms (0%)"] * 2


def test_function_table_sums_what_both_sides_call(common):
    import math

    def both():
        return sum(math.sqrt(i) for i in range(20000))

    headers, rows = common.function_table({"a": both, "b": lambda: (both(), sorted(range(9)))},
                                          k=2)
    assert headers == ["#", "a: function, self ms (calls)", "b: function, self ms (calls)"]
    whole, shared = rows[2:]
    assert whole[1].startswith("whole call ") and shared[2].startswith("in the ")
    # every function of side a is called by side b too: a's shared part is (nearly) all of it
    share_a = int(shared[1].rsplit("(", 1)[1].rstrip("%)"))
    assert share_a >= 80, shared


def test_gemm_rate_is_positive(common):
    assert common.gemm_gflops(n=128, seconds=0.05, threads=1) > 0.01


def test_peak_rss_sees_an_allocation(common):
    import torch

    with common.PeakRSS(interval_s=0.001) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del x
    assert mem.growth_mb > 30 or mem.peak_mb == 0.0  # 0: no /proc (not Linux)


# ----------------------------------------------------------------------------- markers


def test_replace_block_keeps_the_prose(run_all):
    text = ("# Benchmarks\n\nintro prose\n\n<!-- bench:rnn -->\nold table\n<!-- /bench:rnn -->\n\n"
            "analysis prose\n")
    out = run_all.replace_block(text, "rnn", "new table")
    assert out == text.replace("old table", "new table")
    assert run_all._common.block_of(out, "rnn") == "new table\n"
    out = run_all.replace_block(out, "bert", "bert table\n")  # no markers: appended
    assert out.endswith("analysis prose\n\n<!-- bench:bert -->\nbert table\n<!-- /bench:bert -->\n")
    out = run_all.replace_block(out, "header", "when and where\n")  # after the title
    assert out.startswith("# Benchmarks\n\n<!-- bench:header -->\nwhen and where\n"
                          "<!-- /bench:header -->\n")
    assert run_all.replace_block(out, "rnn", "a \\1 backslash") .count("a \\1 backslash") == 1


def test_every_script_is_listed():
    proc = run("--list")
    assert proc.returncode == 0, proc.stderr
    scripts = [p.stem for p in BENCHMARKS.glob("*.py")
               if not p.name.startswith("_") and p.stem != "run_all"]
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert sorted(listed) == sorted(scripts)
    assert "python benchmarks/train_throughput.py --repeats 5" in proc.stdout


def test_bad_arguments_are_one_line(tmp_path):
    proc = run("--only", "nosuch", "--list")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --only: no benchmark named "
                                                           "nosuch")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run("--smoke", "-o", str(ROOT / "BENCHMARKS.md"))
    assert proc.returncode == 2 and "never BENCHMARKS.md" in proc.stderr


# ----------------------------------------------------------------------------- end to end


def test_smoke_pipeline_fills_the_markers(run_all, tmp_path, monkeypatch):
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    # a script with --markdown: its section says which arguments it was given
    (scripts / "fast.py").write_text(
        '"""A fast benchmark."""\nimport sys\nargs = sys.argv[1:sys.argv.index("--markdown")]\n'
        'print("fast figures 1.5x")\n'
        'open(sys.argv[sys.argv.index("--markdown") + 1], "w").write(\n'
        '    "## Fast\\n\\n```\\npython benchmarks/fast.py " + " ".join(args) + "\\n```\\n\\n'
        '| side | figure |\\n| --- | ---: |\\n| divekit | 1.5x |\\n")\n')
    (scripts / "other.py").write_text('"""Not selected."""\nraise SystemExit("ran")\n')
    monkeypatch.setattr(run_all, "HERE", scripts)
    template = tmp_path / "template.md"
    template.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- bench:header -->\nold\n"
                        "<!-- /bench:header -->\n\n<!-- bench:fast -->\nstale figures\n"
                        "<!-- /bench:fast -->\n\n<!-- bench:other -->\nother figures\n"
                        "<!-- /bench:other -->\n\nhand-written analysis of the fast one\n")
    out = tmp_path / "B.md"
    code = run_all.main(["--smoke", "--only", "fast", "--template", str(template), "-o", str(out),
                         "--quiet"])
    assert code == 0
    text = out.read_text()
    assert template.read_text().count("stale figures") == 1  # the template is left alone
    assert "stale figures" not in text
    assert run_all._common.block_of(text, "other") == "other figures\n"  # not selected: kept
    assert "hand-written intro" in text and text.endswith("hand-written analysis of the fast one\n")
    header = run_all._common.block_of(text, "header")
    for needed in ("GFLOP/s", "load average", "torch ", "logical cores", "`fast`", "--smoke"):
        assert needed in header, needed
    assert "`other`" not in header
    fast = run_all._common.block_of(text, "fast")
    assert fast.startswith("## Fast\n\n```\npython benchmarks/fast.py --smoke\n```\n")
    assert "| divekit | 1.5x |" in fast
    assert "Run by `benchmarks/run_all.py`" in fast and "load average" in fast


def test_failure_keeps_the_old_section(run_all, tmp_path, monkeypatch, capsys):
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    (scripts / "good.py").write_text(
        '"""A good benchmark."""\nimport sys\nprint("figures 1.5x")\n'
        'if "--markdown" in sys.argv:\n'
        '    open(sys.argv[sys.argv.index("--markdown") + 1], "w").write("## Good\\n\\n| a |\\n")\n')
    (scripts / "plain.py").write_text('"""Console only."""\nprint("plain figures 2.0x")\n')
    (scripts / "bad.py").write_text('"""Broken."""\nraise SystemExit("it broke")\n')
    (scripts / "slow.py").write_text('"""Hangs."""\nimport time\ntime.sleep(60)\n')
    template = tmp_path / "T.md"
    template.write_text("# B\n\n<!-- bench:bad -->\nlast good bad figures\n<!-- /bench:bad -->\n")
    monkeypatch.setattr(run_all, "HERE", scripts)
    out = tmp_path / "out.md"
    start = time.perf_counter()
    code = run_all.main(["--template", str(template), "-o", str(out), "--no-gemm", "--quiet",
                         "--timeout", "5"])
    assert code == 1
    assert time.perf_counter() - start < 40  # slow.py was stopped at its timeout
    text = out.read_text()
    assert run_all._common.block_of(text, "bad") == "last good bad figures\n"
    good = run_all._common.block_of(text, "good")
    assert good.startswith("## Good\n\n| a |\n") and "Run by" in good
    plain = run_all._common.block_of(text, "plain")
    assert plain.startswith("## Console only\n") and "plain figures 2.0x" in plain
    assert "`bad`" in run_all._common.block_of(text, "header").split("failed")[1].splitlines()[0]
    said = capsys.readouterr().out
    assert "FAILED: bad, slow" in said and "stopped after 5 s" in said
    assert run_all._common.block_of(text, "slow") is None  # never ran to the end: no section


def test_memory_goal_is_judged_on_the_ranges_of_several_fresh_processes(common):
    Peak = common.Peak
    ours = Peak(((900.0, 0.0, 800.0), (940.0, 0.0, 810.0), (910.0, 0.0, 805.0)))
    own, children, before = ours  # reads as the runs' medians
    assert (own, children, before) == (910.0, 0.0, 805.0) and ours[0] == 910.0
    assert common.memory_verdict(ours, Peak(((950.0, 0, 0), (990.0, 0, 0)))) == "met"
    assert common.memory_verdict(ours, Peak(((930.0, 0, 0), (990.0, 0, 0)))) == "not settled"
    assert common.memory_verdict(ours, Peak(((850.0, 0, 0), (899.0, 0, 0)))) == "not met"
    one = Peak(((910.0, 0, 0),))  # one run a side: a plain comparison
    assert common.memory_verdict(one, Peak(((920.0, 0, 0),))) == "met"
    assert common.memory_verdict(Peak(((930.0, 0, 0),)), Peak(((920.0, 0, 0),))) == "not met"
    assert common.memory_cells(ours) == ["910 (900–940)", "+105", "—"]
    assert common.memory_cells(Peak(((1234.0, 432.0, 1000.0),))) == ["1,234", "+234", "432"]
    assert "3 fresh processes" in common.memory_note(3)


def test_memory_children_get_the_sizes_but_not_the_runs_or_the_markdown(common, monkeypatch):
    monkeypatch.setattr("sys.argv", ["x.py", "--steps", "4", "--memory-runs", "3",
                                     "--markdown=/tmp/a.md", "--no-memory", "--smoke"])
    assert common.forwarded_argv() == ["--steps", "4", "--smoke"]
