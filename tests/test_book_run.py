"""``divekit book run``: the book's markdown read into cells, the two rewrites, and sections run
end to end in a real ipykernel through nbclient (tiny fixture sections, a second or two each).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from divekit.book.runner import default_out_dir
from divekit.book.sections import (
    cell_frameworks,
    parse_markdown,
    prepare,
    read_section,
    rewrite_imports,
    rewrite_quick,
)
from divekit.cli import main
from divekit.errors import DivekitError

FIXTURES = Path(__file__).parent / "fixtures" / "book_sections"
CHAPTERS = Path(__file__).resolve().parents[2] / "shared" / "book" / "chapters"
PNG = b"\x89PNG\r\n\x1a\n"


def divekit(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text(encoding="utf-8").split("\n")


# ------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("first, expected", [
    ("#@tab pytorch", {"pytorch"}), ("#@tab all", {"all"}),
    ("#@tab mxnet, pytorch", {"mxnet", "pytorch"}), ("#@tab pytorch, paddle", {"pytorch", "paddle"}),
    ("#@tab pytorch, tensorflow, paddle", {"pytorch", "tensorflow", "paddle"}),
    ("#@tab tensorflow", {"tensorflow"}), ("#@save", {"mxnet"}), ("x = 1", {"mxnet"}),
])
def test_cell_frameworks(first, expected):
    assert cell_frameworks(first + "\nprint(1)") == expected


def test_markdown_cells_are_the_pytorch_ones_with_their_file_lines():
    cells, skipped = parse_markdown((FIXTURES / "tiny.md").read_text(encoding="utf-8"))
    lines = _lines("tiny.md")
    code = [c for c in cells if c.kind == "code"]
    # an independent count: each fence's first line, by hand from the file
    firsts = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("```{.python")]
    mine = [f for f in firsts if "pytorch" in f or f == "#@tab all"]
    assert [c.source.split("\n")[0] for c in code] == mine
    assert skipped == len(firsts) - len(mine) == 3  # MXNet (no #@tab), tensorflow, paddle
    assert [c.number for c in code] == list(range(1, len(code) + 1))
    for c in code:  # the cell's lines are the file's lines from `line` on
        n = len(c.source.split("\n"))
        assert lines[c.line - 1:c.line - 1 + n] == c.source.split("\n")
        assert lines[c.line - 2].startswith("```{.python .input")
    prose = "\n".join(c.source for c in cells if c.kind == "markdown")
    assert "Prose before the code" in prose and "Some prose between cells" in prose
    assert "never run" not in prose + "".join(c.source for c in code)
    assert cells[0].kind == "markdown" and cells[0].source.startswith("# A tiny section")


def test_fence_attributes_vary_and_plain_fences_stay_prose():
    text = ("intro\n```{.python .input  n=3}\n#@tab all\na = 1\n```\n"
            "```python\nprint('prose')\n```\n```{.python .input}\n#@tab pytorch\nb = 2\n```\n")
    cells, skipped = parse_markdown(text)
    assert [(c.kind, c.source) for c in cells] == [
        ("markdown", "intro"), ("code", "#@tab all\na = 1"),
        ("markdown", "```python\nprint('prose')\n```"), ("code", "#@tab pytorch\nb = 2")]
    assert skipped == 0 and [c.line for c in cells if c.kind == "code"] == [3, 10]


# ------------------------------------------------------------------------------- rewrites
@pytest.mark.parametrize("before, after", [
    ("from d2l import torch as d2l", "from divekit.compat import d2l"),
    ("import d2l.torch as d2l", "from divekit.compat import d2l"),
    ("from d2l import torch as dd", "from divekit.compat import d2l as dd"),
    ("from d2l.torch import Timer, try_gpu as tg",
     "from divekit.compat.d2l import Timer, try_gpu as tg"),
])
def test_import_rewrite(before, after):
    source = f"#@tab pytorch\n%matplotlib inline\n{before}\nimport torch"
    new, changes = rewrite_imports(source)
    assert new == f"#@tab pytorch\n%matplotlib inline\n{after}\nimport torch"
    assert changes == [(3, before, after)]


def test_import_rewrite_changes_nothing_else():
    source = ('from d2l import mxnet as d2l\ns = "from d2l import torch as d2l"\n'
              "import d2l\nfrom d2l import (torch\n    as d2l)\nx = 1")
    new, changes = rewrite_imports(source)
    lines = new.split("\n")
    assert lines[:3] == source.split("\n")[:3]  # other frameworks, strings, the bare package
    assert lines[3] == "from divekit.compat import d2l" and lines[4] == "" and lines[5] == "x = 1"
    assert len(changes) == 1 and len(lines) == len(source.split("\n"))  # line numbers kept


def _run(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<cell>", "exec"), namespace)  # noqa: S102 - our own test strings
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


QUICK_CELL = """\
num_epochs, lr = 500, 1
lr2, num_epochs2, batch_size = 0.1, 10, 128
epochs = 3
few = {"num_epochs": 50}
def train(n=30):
    num_epochs = 10  # inside a training function
    return num_epochs
inner = train()
num_steps = 35
kw = dict(num_epochs=10)
num_epochs3 = 7
flt = 0
epochs_f = 5.0
"""


def test_quick_rewrite_bounds_literal_epoch_counts_only():
    new, changes = rewrite_quick(QUICK_CELL, bound=2)
    ast.parse(new)
    before, after = _run(QUICK_CELL), _run(new)
    assert after["num_epochs"] == 2 and after["epochs"] == 2 and after["inner"] == 2
    for name in ("lr", "lr2", "num_epochs2", "batch_size", "few", "num_steps", "kw",
                 "num_epochs3", "flt", "epochs_f"):
        assert after[name] == before[name], name  # other names, dict keys, keywords, floats
    assert [line for line, _, _ in changes] == [1, 3, 6]
    assert changes[0][1:] == ("num_epochs, lr = 500, 1", "num_epochs, lr = min(500, 2), 1")
    assert len(new.split("\n")) == len(QUICK_CELL.split("\n"))
    assert rewrite_quick("num_epochs = 2\nepochs = 1", bound=2) == ("num_epochs = 2\nepochs = 1", [])


def test_quick_bound_follows_the_compat_layer_setting(monkeypatch):
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_EPOCHS", "3")
    new, _ = rewrite_quick("num_epochs = 10\n%time x = 1")  # a magic line does not stop it
    assert new == "num_epochs = min(10, 3)\n%time x = 1"


def test_prepare_lists_rewrites_with_file_lines():
    section = prepare(read_section(FIXTURES / "compat.md"), quick=True)
    lines = _lines("compat.md")
    imports = [r for r in section.rewrites if r.why == "import"]
    assert [(r.cell, r.before) for r in imports] == [
        (1, "from d2l import torch as d2l"), (2, "import d2l.torch as d2l_again")]
    assert all(lines[r.line - 1] == r.before for r in imports)
    assert section.code_cells[0].source.split("\n")[1] == "from divekit.compat import d2l"


def test_default_out_dir_takes_the_next_free_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_out_dir(Path("x/gru.md")) == Path("runs/book/gru")
    (tmp_path / "runs/book/gru").mkdir(parents=True)
    assert default_out_dir(Path("gru.md")) == Path("runs/book/gru")  # empty: still free
    (tmp_path / "runs/book/gru/report.md").write_text("x")
    (tmp_path / "runs/book/gru-2").write_text("a file")
    assert default_out_dir(Path("gru.md")) == Path("runs/book/gru-3")


# ------------------------------------------------------------------------------ end to end
def _outputs(report: str) -> list[str]:
    return re.findall(r"```text\n(.*?)\n```", report, flags=re.S)


def _report_cells(report: str) -> list[str]:
    return [line for line in report.split("\n") if line.startswith("## Cell ")]


def test_run_tiny_section(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "cat1.jpg").write_bytes(b"jpg")
    out = tmp_path / "out"
    code, stdout, err = divekit(capsys, "book", "run", str(FIXTURES / "tiny.md"), "--quick",
                                "-o", str(out), "--data-dir", str(data))
    assert code in (0, None), err
    assert "5/5" in err  # the progress bar, one tick per cell, on stderr
    assert f"report:   {out / 'report.md'}" in stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert len(_report_cells(report)) == 5
    assert "quick mode: on" in report and "`num_epochs, lr = min(500, 2), 1`" in report
    assert f"data dir: `{data}`" in report and "status: passed: 5 cells" in report
    for text in ("hello from pytorch 4.0", "num_epochs 2, lr 1, epochs 1", "to stderr",
                 "cwd work quick 1", "data True", "img ['cat1.jpg']", "figures True"):
        assert text in report, text
    assert "never run" not in report and "<Figure size" not in report
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["cell-002-1.png", "cell-004-1.png"]  # the inline backend's images
    for name in figures:
        assert (out / "figures" / name).read_bytes().startswith(PNG)
        assert f"![](figures/{name})" in report
    import nbformat

    nb = nbformat.read(out / "tiny.ipynb", as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code_cells) == 5 and all(c.execution_count for c in code_cells)
    assert any(c.cell_type == "markdown" and "Some prose" in c.source for c in nb.cells)
    manifest = json.loads((out / ".divekit-book.json").read_text())["files"]
    assert {"report.md", "tiny.ipynb", "figures/cell-002-1.png", "data", "img"} <= set(manifest)


def test_headless_agg_saves_pictures_and_no_figure_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "agg"
    data = tmp_path / "data"  # the fixture lists ../img: a data folder of its own, not the shared
    (data / "img").mkdir(parents=True)
    code, _, err = divekit(capsys, "book", "run", str(FIXTURES / "tiny.md"), "-o", str(out),
                           "--data-dir", str(data), "--no-progress")
    assert code in (0, None), err
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "<Figure size" not in report and "quick mode: off" in report
    assert "num_epochs 500, lr 1" in report  # not quick: the book's own value
    figures = sorted((out / "figures").iterdir())
    assert [p.name for p in figures] == ["cell-002-1.png", "cell-004-1.png"]
    assert all(p.read_bytes().startswith(PNG) for p in figures)
    # the kernel did print the figure's repr (Agg shows nothing): the report dropped it
    notebook = (out / "tiny.ipynb").read_text(encoding="utf-8")
    assert "<Figure size 200x100 with 1 Axes>" in notebook and "image/png" not in notebook


def test_failing_cell_stops_the_run_with_one_line(tmp_path, capsys):
    out = tmp_path / "fail"
    code, stdout, err = divekit(capsys, "book", "run", str(FIXTURES / "failing.md"), "-o",
                                str(out), "--no-progress")
    line = _lines("failing.md").index("foo(z)") + 1
    assert code == 1
    assert err.splitlines() == [
        f"error: failing.md: cell 3 (line {line}): NameError: name 'foo' is not defined"]
    assert "Traceback" not in err + stdout
    report = (out / "report.md").read_text(encoding="utf-8")
    assert len(_report_cells(report)) == 3
    for text in ("first cell ran", "second cell ran 2", "third cell starts 4",
                 f"**Error** at line {line}", f"failed at cell 3 (line {line})"):
        assert text in report, text
    assert "never printed" not in "\n".join(_outputs(report)[:-1])  # [-1]: the traceback
    assert "fourth cell never runs" not in report
    assert (out / "failing.ipynb").exists()


def test_notebook_input_and_its_cell_lines(tmp_path, capsys):
    out = tmp_path / "nb"
    code, _, err = divekit(capsys, "book", "run", str(FIXTURES / "notebook.ipynb"), "-o",
                           str(out), "--no-progress")
    assert code == 1
    assert err.splitlines() == [
        "error: notebook.ipynb: cell 2 (line 2): ZeroDivisionError: division by zero"]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "```text\n6\n```" in report and "ZeroDivisionError" in report


@pytest.mark.parametrize("name, words", [
    ("missing.md", "no such file"), ("tiny.txt", "unknown kind of file"),
    ("nocode.md", "no pytorch code cells"), ("broken.ipynb", "not a Jupyter notebook"),
    (".", "a folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, name, words):
    path = tmp_path / name if name in ("tiny.txt", ".") else FIXTURES / name
    if name == "tiny.txt":
        path.write_text("print(1)\n")
    out = tmp_path / "never"
    code, stdout, err = divekit(capsys, "book", "run", str(path), "-o", str(out))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert words in err and "Traceback" not in err
    assert not out.exists()


def test_existing_report_needs_overwrite_which_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ("book", "run", str(FIXTURES / "failing.md"), "-o", str(out), "--no-progress")
    assert divekit(capsys, *argv)[0] == 1
    code, _, err = divekit(capsys, *argv)
    assert code == 2 and "already holds a report" in err and len(err.splitlines()) == 1
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "keep.png").write_bytes(PNG)
    (out / "work" / "stale.txt").write_text("the last run's")
    manifest = json.loads((out / ".divekit-book.json").read_text())
    manifest["files"].append("work/stale.txt")
    (out / ".divekit-book.json").write_text(json.dumps(manifest))
    code, _, err = divekit(capsys, "--debug", *argv, "--overwrite")
    # --debug shows the kernel's traceback before the one line
    assert code == 1 and "----> 5 foo(z)" in err and err.splitlines()[-1].startswith("error:")
    assert (out / "notes.txt").read_text() == "mine" and (out / "figures" / "keep.png").exists()
    assert not (out / "work" / "stale.txt").exists()  # listed as the last run's own
    assert (out / "report.md").exists()


def test_help_teaches(capsys):
    code, out, _ = divekit(capsys, "book", "run", "--help")
    assert code == 0
    for words in ("--quick", "DIVEKIT_BOOK_QUICK=1", "min(500, 2)", "report.md", "figures/",
                  "from divekit.compat import d2l", "examples:", "--timeout", "--data-dir",
                  "--kernel"):
        assert words in out, words
    code, _, err = divekit(capsys, "book")
    assert code == 2 and "book needs an action" in err


def test_book_list(capsys):
    code, out, _ = divekit(capsys, "book", "list", str(FIXTURES))
    assert code in (0, None)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:-1]}
    assert rows["tiny.md"] == ["5", "3"] and rows["failing.md"] == ["4", "0"]
    assert rows["nocode.md"] == ["-", "2"] and rows["notebook.ipynb"] == ["2", "0"]
    assert "broken.ipynb" not in rows
    code, _, err = divekit(capsys, "book", "list", str(FIXTURES / "tiny.md"))
    assert code == 2 and "not a folder" in err


def test_timeout_and_kernel_options_are_checked(tmp_path, capsys):
    section = str(FIXTURES / "tiny.md")
    code, _, err = divekit(capsys, "book", "run", section, "--timeout", "-1")
    assert code == 2 and "--timeout" in err
    code, _, err = divekit(capsys, "book", "run", section, "--kernel", "no-such-kernel-x",
                           "-o", str(tmp_path / "k"))
    assert code == 2 and "no-such-kernel-x" in err and not (tmp_path / "k").exists()
    with pytest.raises(DivekitError, match="not a folder"):
        from divekit.book.runner import run_section

        run_section(section, tmp_path / "d", data_dir=tmp_path / "missing")


def test_a_timed_out_cell_is_a_failure(tmp_path, capsys):
    slow = tmp_path / "slow.md"
    slow.write_text("```{.python .input}\n#@tab pytorch\nprint('start')\n```\n\n"
                    "```{.python .input}\n#@tab pytorch\nimport time\ntime.sleep(30)\n```\n")
    code, _, err = divekit(capsys, "book", "run", str(slow), "-o", str(tmp_path / "o"),
                           "--timeout", "2", "--no-progress")
    assert code == 1 and err.splitlines() == [
        "error: slow.md: cell 2 (line 7): TimeoutError: the cell ran past 2 s (--timeout)"]


# -------------------------------------------------------------------- on the compat layer
def test_compat_section_runs_on_divekit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "compat"
    code, _, err = divekit(capsys, "book", "run", str(FIXTURES / "compat.md"), "-o", str(out),
                           "--no-progress", "--quick")
    assert code in (0, None), err
    report = (out / "report.md").read_text(encoding="utf-8")
    # quick: the section's own torch DataLoader is bounded too, and its literal epoch count
    assert "batches 5 5 epochs 2" in report and "`num_epochs = min(10, 2)`" in report
    assert "`from d2l import torch as d2l` → `from divekit.compat import d2l`" in report
    assert "device type cpu same module True" in report or "device type cuda" in report
    assert "IProgress" not in report
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["cell-003-1.png", "cell-003-2.png"]  # d2l.plot's, and a plain plt one


# two of the book's sections in make test (all 45: make test-book): a picture, and a training run
# that prints the book's perplexity line
REAL_SECTIONS = {"chapter_attention-mechanisms/attention-cues.md": r"",
                 "chapter_recurrent-neural-networks/rnn-concise.md":
                     r"perplexity \d+\.\d, [\d.]+ tokens/sec on cpu"}


@pytest.mark.skipif(not CHAPTERS.is_dir(), reason="../shared/book is not present")
@pytest.mark.parametrize("section", REAL_SECTIONS)
def test_real_sections_run_quick(section, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = divekit(capsys, "book", "run", str(CHAPTERS / section), "--quick", "-o",
                           str(out), "--no-progress")
    assert code in (0, None), err
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "status: passed" in report and "from divekit.compat import d2l" in report
    assert re.search(REAL_SECTIONS[section], report)
    assert "<Figure size" not in report
    assert list((out / "figures").glob("*.png"))
    assert os.path.islink(out / "data")


def test_a_data_folder_of_the_users_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.csv").write_text("1")
    code, _, err = divekit(capsys, "book", "run", str(FIXTURES / "tiny.md"), "-o", str(out),
                           "--overwrite")
    assert code == 2 and "not a link divekit made" in err and len(err.splitlines()) == 1
    assert (out / "data" / "mine.csv").read_text() == "1" and not (out / "report.md").exists()
