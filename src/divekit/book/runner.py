"""Run a section of the book headless: its cells in an IPython kernel (nbformat + nbclient +
ipykernel, the machinery Jupyter itself uses), one at a time, into a report.

The output folder ``DIR`` holds::

    report.md          header, then each cell: source, outputs, figures, time (rewritten after
                       every cell, so a crash keeps the cells before it)
    SECTION.ipynb      the executed notebook (prose and code cells with their outputs)
    figures/           the cells' pictures (``cell-007-1.png``); the kernel's $DIVEKIT_FIGURES
    work/              the kernel's working folder, where the section's own files land
    data -> DATA_DIR   so that the book's ``../data/...`` and ``../img/NAME.jpg`` resolve
    img  -> DATA_DIR/img
    kernel.log         the kernel process's own messages (read it when the kernel dies)

``.divekit-book.json`` lists every file a run wrote; ``--overwrite`` deletes those and nothing
else.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from divekit.book.sections import (
    COMPAT_IMPORT,
    FRAMEWORK,
    Cell,
    Section,
    prepare,
    quick_epochs_bound,
    read_section,
)
from divekit.errors import DivekitError
from divekit.io import atomic_write_text, same_file

MANIFEST = ".divekit-book.json"
KERNEL_NAME = "divekit-book"
DEFAULT_OUT = Path("runs") / "book"
QUICK_BATCHES = 5  # see quick_batches_bound
MAX_TEXT_LINES = 400  # of one text output in the report (the notebook keeps everything)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FIGURE_TEXT = re.compile(r"^<Figure size [\d.]+x[\d.]+ with \d+ Axes>$")
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/svg+xml": ".svg"}
_REPO = Path(__file__).resolve().parents[3]  # src/divekit/book/runner.py -> the repository

# Run silently in the kernel before the section. At the end of each cell, figures a non-inline
# Matplotlib backend (MPLBACKEND=Agg) left open are written into $DIVEKIT_FIGURES and closed, as
# the inline backend shows and closes them: by the compat layer's own save_figures() when the
# section has imported it (its figures keep one file each), else here. Agg's "cannot be shown"
# warning on plt.show() is silenced. A section that asks the inline backend for SVG only
# (``d2l.use_svg_display()``) gets PNG besides, for the report's figure files. In quick mode,
# once torch is imported, every torch DataLoader (the section's own too, as in kaggle-cifar10's
# training loop) yields at most DIVEKIT_BOOK_QUICK_BATCHES batches a pass.
KERNEL_SETUP = r"""
def _divekit_book_setup():
    import itertools, os, sys, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore", message=".*non-interactive, and thus cannot be shown")
    warnings.filterwarnings("ignore", message="IProgress not found")  # no widgets headless
    folder = Path(os.environ["DIVEKIT_FIGURES"])
    count = itertools.count(1)
    try:
        from matplotlib_inline import backend_inline
    except ImportError:
        backend_inline = None
    if backend_inline is not None:
        chosen = backend_inline.set_matplotlib_formats
        def set_matplotlib_formats(*formats, **kwargs):
            if not {"png", "retina"} & set(formats):
                formats = (*formats, "png")
            return chosen(*formats, **kwargs)
        set_matplotlib_formats.__doc__ = chosen.__doc__
        backend_inline.set_matplotlib_formats = set_matplotlib_formats
    def after(*args):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None or "inline" in str(plt.get_backend()).lower():
            return
        compat = sys.modules.get("divekit.compat.d2l._plot")
        if compat is not None and hasattr(compat, "save_figures"):
            compat.save_figures(close=True)
        for num in plt.get_fignums():
            fig = plt.figure(num)
            if fig.axes or len(fig.get_children()) > 1:
                folder.mkdir(parents=True, exist_ok=True)
                fig.savefig(folder / f"open-{next(count):04d}.png", bbox_inches="tight")
            plt.close(fig)
    get_ipython().events.register("post_run_cell", after)
    if os.environ.get("DIVEKIT_BOOK_QUICK", "") in ("", "0", "false", "no"):
        return
    try:
        batches = max(1, int(os.environ["DIVEKIT_BOOK_QUICK_BATCHES"]))
    except (KeyError, ValueError):
        batches = 5
    def bound_loaders(*args):
        data = sys.modules.get("torch.utils.data")
        loader = getattr(data, "DataLoader", None)
        if loader is None or getattr(loader, "_divekit_quick", False):
            return
        iterate, length = loader.__iter__, loader.__len__
        def __iter__(self):
            return itertools.islice(iterate(self), batches)
        def __len__(self):
            return min(length(self), batches)
        loader.__iter__, loader.__len__ = __iter__, __len__
        loader._divekit_quick = True
    get_ipython().events.register("pre_run_cell", bound_loaders)
_divekit_book_setup()
del _divekit_book_setup
"""


# -------------------------------------------------------------------------------- results
@dataclass
class CellError:
    """Why a cell failed: the exception's name and last line, and where."""

    cell: int
    line: int  # in the source file (.md), or in the notebook cell
    ename: str
    message: str  # the one line, e.g. "NameError: name 'foo' is not defined"
    traceback: str = ""

    def one_line(self, name: str) -> str:
        return f"{name}: cell {self.cell} (line {self.line}): {self.message}"


@dataclass
class CellRun:
    """A code cell that ran: its outputs in order (("text", str) or ("figure", path relative to
    the output folder)), its time, and its error if it failed."""

    cell: Cell
    items: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    error: CellError | None = None

    @property
    def figures(self) -> list[str]:
        return [v for k, v in self.items if k == "figure"]


@dataclass
class RunResult:
    section: Section
    out_dir: Path
    report: Path
    notebook: Path
    quick: bool
    runs: list[CellRun] = field(default_factory=list)
    error: CellError | None = None
    seconds: float = 0.0
    status: str = "starting"

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.runs) == len(self.section.code_cells)

    @property
    def figures(self) -> list[str]:
        return [f for r in self.runs for f in r.figures]


# ----------------------------------------------------------------------------- locations
def default_data_dir() -> Path:
    """``$DIVEKIT_DATA``, else ``../shared/data`` beside the repository when it exists, else
    divekit's cache (``~/.cache/divekit``)."""
    env = os.environ.get("DIVEKIT_DATA")
    if env:
        return Path(env).expanduser()
    shared = _REPO.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "divekit"


def default_chapters_dir() -> Path | None:
    """``../shared/book/chapters`` (from the current folder, then beside the repository)."""
    for base in (Path.cwd().parent, _REPO.parent):
        folder = base / "shared" / "book" / "chapters"
        if folder.is_dir():
            return folder
    return None


def default_out_dir(section: Path) -> Path:
    """``runs/book/STEM``, or ``STEM-2``, ``-3``... when it already holds a report."""
    n = 1
    while True:
        out = DEFAULT_OUT / (section.stem if n == 1 else f"{section.stem}-{n}")
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return out
        n += 1


# ------------------------------------------------------------------------- output folder
class OutputFolder:
    """The files of one run under ``DIR``, and the record of which are ours."""

    def __init__(self, root: Path, stem: str):
        self.root = root
        self.report = root / "report.md"
        self.notebook = root / f"{stem}.ipynb"
        self.figures = root / "figures"
        self.work = root / "work"
        self.data = root / "data"
        self.img = root / "img"
        self.kernel_log = root / "kernel.log"
        self.manifest = root / MANIFEST
        self.ours: set[str] = set()

    def claim(self, overwrite: bool, inputs: list[Path], data_dir: Path) -> None:
        """Check the folder before anything runs; with ``overwrite``, delete what a previous run
        recorded as its own (only that)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise DivekitError(f"-o {str(root)!r} exists and is not a folder")
        for item in inputs:
            for mine in (self.report, self.notebook, self.kernel_log):
                if same_file(mine, item):
                    raise DivekitError(f"-o {str(root)!r} would write over the input {item}; "
                                       "choose another folder")
        previous = self.report.exists() or self.manifest.exists()
        if previous and not overwrite:
            raise DivekitError(f"{root} already holds a report ({self.report}); pass "
                               "--overwrite to replace it, or choose another -o")
        listed = self._listed()
        for link, target in ((self.data, data_dir), (self.img, data_dir / "img")):
            if not (link.exists() or link.is_symlink()):
                continue
            same = os.path.realpath(link) == os.path.realpath(target)
            if not (link.is_symlink() and (same or link.name in listed)):
                raise DivekitError(f"{link} exists and is not a link divekit made to "
                                   f"{target} (the section's ../{link.name}): choose another -o")
        for folder in (self.figures, self.work):
            if folder.exists() and not folder.is_dir():
                raise DivekitError(f"{folder} exists and is not a folder: choose another -o")
        if previous:
            self._remove_previous(listed)

    def _listed(self) -> list[str]:
        """The files the previous run in this folder recorded as its own."""
        try:
            listed = json.loads(self.manifest.read_text(encoding="utf-8")).get("files", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [str(x) for x in listed] if isinstance(listed, list) else []

    def _remove_previous(self, listed: list[str]) -> None:
        root = self.root.resolve()
        folders: set[Path] = set()
        for rel in listed:
            path = self.root / str(rel)
            try:  # only inside the folder, never through a link
                (path.parent.resolve() / path.name).relative_to(root)
            except (ValueError, OSError):
                continue
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
                folders.update(p for p in path.parents if p != self.root and
                               self.root in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()

    def make(self, data_dir: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.figures.mkdir(exist_ok=True)
        self.work.mkdir(exist_ok=True)
        for link, target in ((self.data, data_dir), (self.img, data_dir / "img")):
            if link.is_symlink() and os.path.realpath(link) != os.path.realpath(target):
                link.unlink()  # ours (claim checked): it pointed to another data folder
            if target.is_dir() and not link.is_symlink():
                link.symlink_to(target.resolve(), target_is_directory=True)
            if link.is_symlink():
                self.ours.add(link.name)
        self.ours.update(["report.md", self.notebook.name, "kernel.log", MANIFEST])

    def record(self) -> None:
        """Note the files now in ``figures/`` and ``work/`` as ours, and save the list."""
        for folder in (self.figures, self.work):
            for dirpath, dirnames, filenames in os.walk(folder):
                base = Path(dirpath)
                for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
                    self.ours.add((base / name).relative_to(self.root).as_posix())
        atomic_write_text(self.manifest, json.dumps({"files": sorted(self.ours)}, indent=1) + "\n")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        try:
            return {p.name: (p.stat().st_mtime_ns, p.stat().st_size)
                    for p in self.figures.iterdir() if p.is_file()}
        except OSError:
            return {}


# ------------------------------------------------------------------------------- kernel
@dataclass
class KernelChoice:
    """The kernel: a Python executable (a kernel spec made on the fly) or a Jupyter spec name."""

    python: str | None = None
    spec: str | None = None

    def describe(self) -> str:
        return (f"{self.python} (ipykernel, a kernel spec made for this run)" if self.python
                else f"Jupyter kernel spec {self.spec!r}")


def choose_kernel(kernel: str | None) -> KernelChoice:
    """``None``: this Python (``sys.executable``) with its own ipykernel; a path to a Python
    executable; or the name of an installed Jupyter kernel spec."""
    if kernel is None or kernel == "":
        from importlib.util import find_spec

        if find_spec("ipykernel") is None:
            raise DivekitError("divekit book run needs ipykernel in this Python: pip install "
                               "'divekit[book]' (nbformat, nbclient, ipykernel)")
        return KernelChoice(python=sys.executable)
    path = Path(kernel).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return KernelChoice(python=str(path))
    if path.is_dir():
        raise DivekitError(f"--kernel {kernel!r} is a folder; give a Python executable or a "
                           "Jupyter kernel name")
    from jupyter_client.kernelspec import KernelSpecManager

    names = sorted(KernelSpecManager().find_kernel_specs())
    if kernel not in names:
        raise DivekitError(f"--kernel {kernel!r}: neither a Python executable nor a Jupyter "
                           f"kernel (installed: {', '.join(names) or 'none'})")
    return KernelChoice(spec=kernel)


@contextmanager
def _kernel_manager(choice: KernelChoice) -> Iterator[Any]:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    if choice.spec is not None:
        yield AsyncKernelManager(kernel_name=choice.spec)
        return
    with tempfile.TemporaryDirectory(prefix="divekit-kernel-") as tmp:
        folder = Path(tmp) / KERNEL_NAME
        folder.mkdir()
        spec = {"argv": [choice.python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (divekit book)", "language": "python"}
        (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        ksm = KernelSpecManager(kernel_dirs=[tmp], ensure_native_kernel=False)
        yield AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def kernel_env(out: OutputFolder, data_dir: Path, quick: bool) -> dict[str, str]:
    """The kernel's environment: ours, with the figure and data folders, quick mode, and
    divekit importable; MPLBACKEND stays as the user has it."""
    import divekit

    env = dict(os.environ)
    env["DIVEKIT_FIGURES"] = str(out.figures.resolve())
    env["DIVEKIT_DATA"] = str(data_dir.resolve() if data_dir.exists() else data_dir)
    env.pop("DIVEKIT_BOOK_QUICK", None)
    if quick:
        env["DIVEKIT_BOOK_QUICK"] = "1"
        env["DIVEKIT_BOOK_QUICK_BATCHES"] = str(quick_batches_bound())
    package_root = str(Path(divekit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's start-up note
    env.setdefault("JUPYTER_PLATFORM_DIRS", "1")
    return env


# ------------------------------------------------------------------------------ outputs
def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _fence(text: str, info: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{info}\n{text.rstrip(chr(10))}\n{ticks}"


def _clip(text: str, tail: bool = False) -> str:
    """At most MAX_TEXT_LINES lines: the first and last halves, or (``tail``, a traceback,
    whose last exception holds the cell's own frame) the last lines."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) <= MAX_TEXT_LINES:
        return "\n".join(lines)
    if tail:
        return "\n".join([f"[... {len(lines) - MAX_TEXT_LINES} lines left out; the notebook "
                          "has them all ...]", *lines[-MAX_TEXT_LINES:]])
    half = MAX_TEXT_LINES // 2
    return "\n".join([*lines[:half], f"[... {len(lines) - 2 * half} lines left out; the "
                      "notebook has them all ...]", *lines[-half:]])


def collect_outputs(outputs: list[Any], out: OutputFolder, number: int,
                    new_files: list[Path]) -> list[tuple[str, str]]:
    """A cell's outputs as report items: text (stdout/stderr/results) and figures (images the
    kernel displayed, saved as files, then the files that appeared in ``figures/``)."""
    items: list[tuple[str, str]] = []
    shown: set[bytes] = set()
    k = 0

    def figure_name(suffix: str) -> Path:
        nonlocal k
        while True:
            k += 1
            path = out.figures / f"cell-{number:03d}-{k}{suffix}"
            if not path.exists():
                return path

    for o in outputs:
        kind = o.get("output_type")
        if kind == "stream":
            items.append(("stream", strip_ansi(str(o.get("text", "")))))
        elif kind in ("execute_result", "display_data"):
            data = o.get("data", {})
            images = [m for m in _IMAGE_TYPES if m in data]
            if images:
                mime = images[0]
                value = data[mime]
                value = "".join(value) if isinstance(value, list) else str(value)
                raw = value.encode() if mime == "image/svg+xml" else base64.b64decode(value)
                if raw in shown:  # `fig` as the last line: the result and the inline flush
                    continue
                shown.add(raw)
                path = figure_name(_IMAGE_TYPES[mime])
                _write_bytes(path, raw)
                items.append(("figure", path.relative_to(out.root).as_posix()))
            elif "text/plain" in data:
                value = data["text/plain"]
                items.append(("text", strip_ansi("".join(value) if isinstance(value, list)
                                                 else str(value))))
    for f in new_files:
        target = figure_name(f.suffix or ".png")
        f.rename(target)
        items.append(("figure", target.relative_to(out.root).as_posix()))
    merged: list[tuple[str, str]] = []  # stream pieces join as printed; results on a new line
    for kind, v in items:
        if kind != "figure" and merged and merged[-1][0] == "text":
            joint = "" if kind == "stream" or merged[-1][1].endswith("\n") else "\n"
            merged[-1] = ("text", merged[-1][1] + joint + v)
        else:
            merged.append(("text" if kind == "stream" else kind, v))
    if any(kind == "figure" for kind, _ in merged):  # "<Figure size ...>" says nothing more
        merged = [(kind, "\n".join(line for line in v.split("\n")
                                   if not _FIGURE_TEXT.match(line.strip())))
                  if kind == "text" else (kind, v) for kind, v in merged]
    return [(kind, v) for kind, v in merged if kind == "figure" or v.strip()]


def _write_bytes(path: Path, data: bytes) -> None:
    from divekit.io import atomic_write_bytes

    atomic_write_bytes(path, data)


def error_of(cell: Cell, section: Section, node: Any, ename: str, evalue: str,
             traceback: list[str]) -> CellError:
    """The error of a failed cell: the line of the cell where it failed (the innermost frame in
    the cell itself, from IPython's ``Cell In[N], line L``), and the exception's last line."""
    text = strip_ansi("\n".join(traceback))
    count = node.get("execution_count")
    line = 1
    for m in re.finditer(r"Cell In\[(\d+)\], line (\d+)", text):
        if count is None or int(m.group(1)) == count:
            line = int(m.group(2))
    message = ""
    for candidate in text.split("\n"):
        if ename and (candidate.startswith(ename + ":") or candidate.strip() == ename):
            message = candidate.strip()
    if not message:
        first = (evalue or "").strip().split("\n")[0]
        message = f"{ename}: {first}" if first else ename
    if len(message) > 300:
        message = message[:297] + "..."
    return CellError(cell.number, section.file_line(cell, line), ename, message, text)


# ------------------------------------------------------------------------------- report
QUICK_NOTE = ("on: DIVEKIT_BOOK_QUICK=1, so the compat layer's training functions run at most "
              "{epochs} epochs (DIVEKIT_BOOK_QUICK_EPOCHS) and its data loaders yield at most "
              "{batches} batches a pass (DIVEKIT_BOOK_QUICK_BATCHES); literal epoch counts "
              "(`num_epochs`, `epochs`) in the cells are bounded by min(value, {epochs}), and "
              "every torch DataLoader, the section's own too, yields at most {batches} batches "
              "a pass. "
              "Numbers and pictures are then not the book's.")


def quick_batches_bound() -> int:
    """The quick-mode batch bound a run gives the kernel: ``DIVEKIT_BOOK_QUICK_BATCHES`` when
    set, else 5 (the compat layer's own default is 4, but the book's own loops report 5 times
    an epoch, ``(i + 1) % (num_batches // 5)``, which divides by zero below 5 batches)."""
    try:
        return max(1, int(os.environ.get("DIVEKIT_BOOK_QUICK_BATCHES", QUICK_BATCHES)))
    except ValueError:
        return QUICK_BATCHES


def render_report(result: RunResult, started: datetime, data_dir: Path, kernel: str) -> str:
    section = result.section
    code = section.code_cells
    kind = "notebook" if section.notebook else f"{FRAMEWORK} cells of the book's markdown"
    lines = [f"# {section.path.name}", "",
             f"- section: `{section.path}` ({len(code)} {kind}"
             + (f"; {section.skipped} cells of other frameworks skipped" if section.skipped
                else "") + ")",
             f"- date: {started.isoformat(timespec='seconds')}",
             "- quick mode: " + (QUICK_NOTE.format(epochs=quick_epochs_bound(),
                                                   batches=quick_batches_bound())
                                 if result.quick else "off (the book's own settings)")]
    imports = [r for r in section.rewrites if r.why == "import"]
    quick = [r for r in section.rewrites if r.why == "quick"]
    if imports:
        lines.append(f"- rewritten: the book's import becomes `{COMPAT_IMPORT}` (divekit's "
                     "compat layer, not the book's d2l package); nothing else of the code "
                     "changes" + (" except the quick-mode bounds below" if quick else ""))
        lines += [f"  - cell {r.cell} (line {r.line}): `{r.before}` → `{r.after}`"
                  for r in imports]
    else:
        lines.append("- rewritten: no `d2l` import found; the code runs as written"
                     + (" except the quick-mode bounds below" if quick else ""))
    if quick:
        lines.append("- quick-mode bounds:")
        lines += [f"  - cell {r.cell} (line {r.line}): `{r.before}` → `{r.after}`"
                  for r in quick]
    data_note = "" if data_dir.is_dir() else " (absent)"
    lines += [f"- data dir: `{data_dir}`{data_note} (`../data` and `../img` of the working "
              "folder `work/` point there)",
              f"- kernel: {kernel}",
              f"- status: {result.status}", ""]
    for run in result.runs:
        cell = run.cell
        where = f"line {cell.line}" if not section.notebook else "notebook cell"
        lines += [f"## Cell {cell.number} ({where}, {run.seconds:.1f} s)", "",
                  _fence(cell.source, "python"), ""]
        for kind_, value in run.items:
            if kind_ == "text":
                lines += [_fence(_clip(value), "text"), ""]
            else:
                lines += [f"![]({value})", ""]
        if run.error is not None:
            lines += [f"**Error** at line {run.error.line}: `{run.error.message}`", "",
                      _fence(_clip(run.error.traceback, tail=True), "text"), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_notebook(section: Section) -> Any:
    """The section as an nbformat notebook: markdown cells for the prose, code cells (with their
    source line in the metadata) for the code."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["divekit"] = {"section": str(section.path)}
    for cell in section.cells:
        if cell.kind == "code":
            node = nbformat.v4.new_code_cell(cell.source)
            node.metadata["divekit"] = {"cell": cell.number, "line": cell.line}
        else:
            node = nbformat.v4.new_markdown_cell(cell.source)
        nb.cells.append(node)
    return nb


# ---------------------------------------------------------------------------------- run
def run_section(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                quick: bool = False, timeout: float | None = None,
                data_dir: str | os.PathLike | None = None, kernel: str | None = None,
                overwrite: bool = False, progress: bool = True,
                framework: str = FRAMEWORK) -> RunResult:
    """Run a section's cells in a fresh kernel, writing the report and the executed notebook
    after every cell. A failing cell stops the run: the result's ``error`` says where and why.
    Bad input (file, folder, kernel) raises :class:`DivekitError` before anything runs."""
    section = prepare(read_section(path, framework), quick=quick)
    data = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if data_dir and not data.is_dir():
        raise DivekitError(f"--data-dir {str(data_dir)!r} is not a folder")
    if timeout is not None and not (timeout > 0):
        raise DivekitError(f"--timeout must be positive, got {timeout}")
    choice = choose_kernel(kernel)
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        raise DivekitError(f"divekit book run needs nbformat, nbclient and ipykernel ({e}): "
                           "pip install 'divekit[book]'") from None
    if out_dir is not None and not str(out_dir).strip():
        raise DivekitError("-o needs a folder name")
    root = Path(out_dir) if out_dir is not None else default_out_dir(section.path)
    out = OutputFolder(root, section.path.stem)
    out.claim(overwrite, [section.path], data)
    out.make(data)

    started = datetime.now().astimezone()
    result = RunResult(section, out.root, out.report, out.notebook, quick, status="running")
    nb = to_notebook(section)
    code_index = [i for i, c in enumerate(section.cells) if c.kind == "code"]
    description = choice.describe()

    def save() -> None:
        atomic_write_text(out.report, render_report(result, started, data, description))
        atomic_write_text(out.notebook, nbformat.writes(nb))
        out.record()

    save()
    env = kernel_env(out, data, quick)
    t0 = time.perf_counter()
    bar = _progress(len(code_index), section.path.name, progress)
    try:
        with _kernel_manager(choice) as km, open(out.kernel_log, "ab") as log:
            client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False,
                                    coalesce_streams=True, shutdown_kernel="immediate",
                                    startup_timeout=120,
                                    resources={"metadata": {"path": str(out.work.resolve())}})
            setup = client.setup_kernel(cleanup_kc=True, env=env, stdout=log, stderr=log)
            try:
                setup.__enter__()
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                result.status = f"the kernel did not start ({type(e).__name__}: {first})"
                save()
                raise DivekitError(f"{result.status}; its log: {out.kernel_log}") from None
            try:
                _run_silently(client, KERNEL_SETUP)
                for index in code_index:
                    cell = section.cells[index]
                    result.status = f"running cell {cell.number} of {len(code_index)}"
                    bar.set_postfix_str(f"cell {cell.number}, line {cell.line}", refresh=True)
                    run = _run_cell(client, section, index, out, timeout)
                    result.runs.append(run)
                    bar.update(1)
                    if run.error is not None:
                        result.error = run.error
                        result.status = (f"failed at cell {cell.number} (line {run.error.line})"
                                         f": {run.error.message}")
                        break
                    save()
                else:
                    result.status = (f"passed: {len(code_index)} cells in "
                                     f"{time.perf_counter() - t0:.1f} s")
            except KeyboardInterrupt:
                result.status = "interrupted (Ctrl-C); the cells above ran"
                raise
            finally:
                result.seconds = time.perf_counter() - t0
                try:
                    setup.__exit__(None, None, None)  # shut the kernel down
                except Exception:  # noqa: BLE001 - it is gone already
                    pass
                save()
    finally:
        bar.close()
    return result


def _run_cell(client: Any, section: Section, index: int, out: OutputFolder,
              timeout: float | None) -> CellRun:
    """Execute the notebook's cell ``index`` (a code cell of the section) and collect its
    outputs and figures; a failure is the run's ``error``, not an exception."""
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    cell, node = section.cells[index], client.nb.cells[index]
    run = CellRun(cell)
    before = out.snapshot()
    tic = time.perf_counter()
    try:
        client.execute_cell(node, index)
    except CellExecutionError as e:
        run.error = error_of(cell, section, node, e.ename, e.evalue, _traceback(node))
    except CellTimeoutError:
        run.error = CellError(cell.number, cell.line, "CellTimeoutError",
                              f"TimeoutError: the cell ran past {timeout:g} s (--timeout)")
    except DeadKernelError:
        run.error = CellError(cell.number, cell.line, "DeadKernelError",
                              "the kernel died (out of memory, or a crash in native code; its "
                              f"log: {out.kernel_log})")
    run.seconds = time.perf_counter() - tic
    run.items = collect_outputs(node.get("outputs", []), out, cell.number,
                                _new_files(out, before))
    return run


def _run_silently(client: Any, code: str) -> None:
    from jupyter_core.utils import run_sync

    reply = run_sync(client.kc.execute_interactive)(code, silent=True, store_history=False,
                                                     timeout=120, output_hook=lambda msg: None)
    if reply["content"].get("status") != "ok":
        raise DivekitError(f"the kernel refused divekit's set-up code: "
                           f"{reply['content'].get('ename')}: {reply['content'].get('evalue')}")


def _traceback(node: Any) -> list[str]:
    for o in node.get("outputs", []):
        if o.get("output_type") == "error":
            return list(o.get("traceback", []))
    return []


def _new_files(out: OutputFolder, before: dict[str, tuple[int, int]]) -> list[Path]:
    """Files in ``figures/`` that appeared or changed since ``before``, oldest first."""
    now = out.snapshot()
    changed = [name for name, stamp in now.items() if before.get(name) != stamp]
    return sorted((out.figures / n for n in changed), key=lambda p: (now[p.name][0], p.name))


def _progress(total: int, name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="cell", file=sys.stderr, disable=not enabled,
                leave=True, dynamic_ncols=True)
