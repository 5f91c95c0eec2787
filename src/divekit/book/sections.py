"""A section of the book as cells: the book's markdown (or a Jupyter notebook) read into the code
cells of one framework and the prose between them, and the two rewrites ``divekit book run``
makes to the code (the ``d2l`` import; in quick mode, literal epoch counts).

The book's markdown marks a code cell with a fence whose info string holds ``.python`` and
``.input`` (```` ```{.python .input} ````, ```` ```{.python .input  n=3} ````). The cell's first
line names its frameworks: ``#@tab pytorch``, ``#@tab all`` or a list (``#@tab mxnet, pytorch``);
a cell without a ``#@tab`` line is MXNet's, the book's default framework.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from divekit.errors import DivekitError

FRAMEWORK = "pytorch"
DEFAULT_FRAMEWORK = "mxnet"  # a cell without a #@tab line
COMPAT_IMPORT = "from divekit.compat import d2l"
QUICK_NAMES = ("num_epochs", "epochs")  # names whose literal int is clearly an epoch count
SUFFIXES = (".md", ".ipynb")

_FENCE_OPEN = re.compile(r"^```+\s*\{(?P<info>[^}]*)\}\s*$")
_FENCE_CLOSE = re.compile(r"^```+\s*$")
_TAB = re.compile(r"^#\s*@tab\b(?P<names>.*)$")
_MAGIC = re.compile(r"^\s*[%!]")


@dataclass
class Cell:
    """One cell: ``kind`` is ``"code"`` or ``"markdown"``; ``line`` is the 1-based line of the
    source file where the cell's first line is (for a notebook: 1, lines count within the cell);
    ``number`` counts the code cells that run, from 1 (0 for markdown)."""

    kind: str
    source: str
    line: int = 1
    number: int = 0


@dataclass
class Rewrite:
    """One change ``divekit book run`` made to a code cell: the cell, the line (of the source
    file), and the text before and after."""

    cell: int
    line: int
    before: str
    after: str
    why: str  # "import" or "quick"


@dataclass
class Section:
    """A section ready to run: its cells in order, and what was skipped or rewritten."""

    path: Path
    cells: list[Cell]
    skipped: int = 0  # code cells of other frameworks
    rewrites: list[Rewrite] = field(default_factory=list)
    notebook: bool = False

    @property
    def code_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == "code"]

    def file_line(self, cell: Cell, line_in_cell: int) -> int:
        """The line of the source file of the cell's ``line_in_cell``-th line (1-based)."""
        return cell.line + max(1, line_in_cell) - 1


# ------------------------------------------------------------------------------------ reading
def cell_frameworks(source: str) -> set[str]:
    """The frameworks a book code cell belongs to, from its ``#@tab`` first line (``{"all"}``
    for ``#@tab all``; the default framework when the cell has no ``#@tab`` line)."""
    first = source.lstrip("\n").split("\n", 1)[0].strip()
    m = _TAB.match(first)
    if m is None:
        return {DEFAULT_FRAMEWORK}
    names = {n.strip().lower() for n in re.split(r"[,\s]+", m.group("names")) if n.strip()}
    return names or {DEFAULT_FRAMEWORK}


def is_framework_cell(source: str, framework: str = FRAMEWORK) -> bool:
    names = cell_frameworks(source)
    return framework in names or "all" in names


def parse_markdown(text: str, framework: str = FRAMEWORK) -> tuple[list[Cell], int]:
    """The cells of a section in the book's markdown: ``framework``'s code cells, the prose
    between them as markdown cells (other frameworks' code left out), and how many code cells
    of other frameworks were skipped. An unclosed fence runs to the end of the file."""
    lines = text.splitlines()
    cells: list[Cell] = []
    prose: list[str] = []
    prose_start = 1
    skipped = 0
    number = 0
    i = 0

    def flush_prose() -> None:
        body = "\n".join(prose).strip("\n")
        if body.strip():
            cells.append(Cell("markdown", body, prose_start))
        prose.clear()

    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        info = m.group("info").split() if m else []
        if not (m and ".python" in info and ".input" in info):
            if not prose:
                prose_start = i + 1
            prose.append(lines[i])
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and not _FENCE_CLOSE.match(lines[end]):
            end += 1
        source = "\n".join(lines[start:end])
        i = end + 1
        if is_framework_cell(source, framework):
            flush_prose()
            number += 1
            cells.append(Cell("code", source, start + 1, number))
        else:
            skipped += 1
    flush_prose()
    return cells, skipped


def parse_notebook(text: str, name: str = "notebook") -> list[Cell]:
    """The cells of a Jupyter notebook (every code cell runs). Raises :class:`DivekitError` for a
    file that is not a notebook, or a notebook of another language."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DivekitError(f"{name}: not a Jupyter notebook (not JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise DivekitError(f"{name}: not a Jupyter notebook (no list of cells; nbformat 4 is "
                           "read)")
    meta = data.get("metadata") or {}
    language = ((meta.get("kernelspec") or {}).get("language")
                or (meta.get("language_info") or {}).get("name") or "python")
    if str(language).lower() != "python":
        raise DivekitError(f"{name}: a {language} notebook; divekit book runs Python notebooks")
    cells: list[Cell] = []
    number = 0
    for raw in data["cells"]:
        if not isinstance(raw, dict):
            continue
        source = raw.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        if raw.get("cell_type") == "code":
            number += 1
            cells.append(Cell("code", source, 1, number))
        elif raw.get("cell_type") == "markdown":
            cells.append(Cell("markdown", source, 1))
    return cells


def read_section(path: str | os.PathLike, framework: str = FRAMEWORK) -> Section:
    """Read a section (``.md`` in the book's format, or ``.ipynb``) into its cells. Raises
    :class:`DivekitError` for a missing file, another extension, or nothing to run."""
    p = Path(path)
    if not p.exists():
        raise DivekitError(f"{path}: no such file")
    if p.is_dir():
        raise DivekitError(f"{path}: a folder; give a section file (.md or .ipynb), or list "
                           "the sections with `divekit book list`")
    if p.suffix.lower() not in SUFFIXES:
        raise DivekitError(f"{path}: unknown kind of file {p.suffix or '(no extension)'!r}; "
                           "give the book's markdown (.md) or a Jupyter notebook (.ipynb)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DivekitError(f"{path}: cannot read it ({e})") from None
    if p.suffix.lower() == ".ipynb":
        cells, skipped, notebook = parse_notebook(text, p.name), 0, True
        if not any(c.kind == "code" and c.source.strip() for c in cells):
            raise DivekitError(f"{path}: the notebook has no code cells")
    else:
        cells, skipped = parse_markdown(text, framework)
        notebook = False
        if not any(c.kind == "code" for c in cells):
            raise DivekitError(f"{path}: no {framework} code cells (a cell belongs to "
                               f"{framework} when its first line is `#@tab {framework}`, "
                               f"`#@tab all` or a #@tab list with {framework}; "
                               f"{skipped} cells of other frameworks)")
    return Section(p, cells, skipped, notebook=notebook)


def find_sections(folder: str | os.PathLike) -> Iterator[tuple[Path, int, int]]:
    """The sections in ``folder`` and its subfolders, one level down as the book's chapters
    folder has them (``*.md`` and ``*.ipynb``, sorted): each with the number of PyTorch code
    cells and of other frameworks' code cells."""
    root = Path(folder)
    found = [p for pattern in ("*.md", "*/*.md", "*.ipynb", "*/*.ipynb")
             for p in root.glob(pattern)]
    for p in sorted(found):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if p.suffix == ".ipynb":
            try:
                cells, skipped = parse_notebook(text, p.name), 0
            except DivekitError:
                continue
        else:
            cells, skipped = parse_markdown(text)
        yield p, sum(c.kind == "code" for c in cells), skipped


# ---------------------------------------------------------------------------------- rewrites
def _parseable(source: str) -> ast.Module | None:
    """The cell's syntax tree, IPython's ``%magic`` and ``!shell`` lines blanked (same lines and
    columns); None when it still does not parse (the kernel will report the error)."""
    masked = "\n".join("" if _MAGIC.match(line) else line for line in source.split("\n"))
    try:
        return ast.parse(masked)
    except (SyntaxError, ValueError):
        return None


def _offsets(source: str) -> list[int]:
    """The character offset of each line's start (ast columns are UTF-8 byte offsets)."""
    starts, pos = [], 0
    for line in source.split("\n"):
        starts.append(pos)
        pos += len(line) + 1
    return starts


def _index(source: str, starts: list[int], lineno: int, col: int) -> int:
    line = source.split("\n")[lineno - 1]
    return starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))


def _splice(source: str, edits: list[tuple[int, int, int, int, str]]) -> str:
    """Replace the spans (lineno, col, end_lineno, end_col, text), keeping the line count: a
    span over several lines is padded with newlines so later lines keep their numbers."""
    starts = _offsets(source)
    for lineno, col, end_lineno, end_col, text in sorted(edits, reverse=True):
        a = _index(source, starts, lineno, col)
        b = _index(source, starts, end_lineno, end_col)
        text = text + "\n" * (end_lineno - lineno - text.count("\n"))
        source = source[:a] + text + source[b:]
    return source


def _compat_import(node: ast.stmt) -> str | None:
    """The ``divekit.compat`` form of a statement that imports the book's ``d2l.torch``."""
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        if node.module == "d2l" and [a.name for a in node.names] == ["torch"]:
            name = node.names[0].asname or "torch"
            return COMPAT_IMPORT + ("" if name == "d2l" else f" as {name}")
        if node.module == "d2l.torch":
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            return f"from divekit.compat.d2l import {names}"
    if isinstance(node, ast.Import) and len(node.names) == 1:
        alias = node.names[0]
        if alias.name == "d2l.torch" and alias.asname:
            return COMPAT_IMPORT + ("" if alias.asname == "d2l" else f" as {alias.asname}")
    return None


def rewrite_imports(source: str) -> tuple[str, list[tuple[int, str, str]]]:
    """Replace the book's ``from d2l import torch as d2l`` (and ``import d2l.torch as d2l``,
    ``from d2l.torch import X``) by ``from divekit.compat import d2l``; nothing else changes.
    Returns the new source and the (line in cell, before, after) of each change."""
    tree = _parseable(source)
    if tree is None:
        return source, []
    lines = source.split("\n")
    edits, changes = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        new = _compat_import(node)
        if new is None or node.end_lineno is None or node.end_col_offset is None:
            continue
        before = "\n".join(lines[node.lineno - 1:node.end_lineno])
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, new))
        changes.append((node.lineno, before.strip(), new))
    return _splice(source, edits), sorted(changes)


def quick_epochs_bound() -> int:
    """The quick-mode epoch bound: ``DIVEKIT_BOOK_QUICK_EPOCHS`` (default 2), as the compat
    layer reads it."""
    try:
        return max(1, int(os.environ.get("DIVEKIT_BOOK_QUICK_EPOCHS", 2)))
    except ValueError:
        return 2


def _literal_int(node: ast.expr) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    return None


def rewrite_quick(source: str, bound: int | None = None,
                  names: tuple[str, ...] = QUICK_NAMES) -> tuple[str, list[tuple[int, str, str]]]:
    """Bound the literal epoch counts of a cell for quick mode: an assignment of a literal int
    to ``num_epochs`` or ``epochs`` (``num_epochs = 10``, ``num_epochs, lr = 500, 1``, at any
    depth, e.g. inside a training function) gets ``min(value, bound)``. Values already within
    the bound, other names, keyword arguments and expressions are left alone. Returns the new
    source and the (line in cell, before, after) of each change."""
    bound = quick_epochs_bound() if bound is None else bound
    tree = _parseable(source)
    if tree is None:
        return source, []
    pairs: list[tuple[ast.expr, ast.expr]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Tuple | ast.List) and isinstance(node.value,
                                                                           ast.Tuple | ast.List):
                    if len(target.elts) == len(node.value.elts):
                        pairs += zip(target.elts, node.value.elts)
                else:
                    pairs.append((target, node.value))
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs.append((node.target, node.value))
    edits, changes = [], []
    lines = source.split("\n")
    for target, value in pairs:
        n = _literal_int(value)
        if not (isinstance(target, ast.Name) and target.id in names and n is not None
                and n > bound and value.end_lineno == value.lineno):
            continue
        new = f"min({n}, {bound})"
        assert value.end_col_offset is not None
        edits.append((value.lineno, value.col_offset, value.lineno, value.end_col_offset, new))
        before = lines[value.lineno - 1]
        changes.append((value.lineno, before.strip(), before.strip()))
    new_source = _splice(source, edits)
    new_lines = new_source.split("\n")
    changes = sorted({(ln, b, new_lines[ln - 1].strip()) for ln, b, _ in changes})
    return new_source, changes


def prepare(section: Section, quick: bool = False, bound: int | None = None) -> Section:
    """The section with the compat import (and, in quick mode, bounded epoch counts) in its
    code cells, every change listed in ``rewrites``."""
    cells, rewrites = [], []
    for cell in section.cells:
        if cell.kind != "code":
            cells.append(cell)
            continue
        source, changes = rewrite_imports(cell.source)
        found = [(ln, b, a, "import") for ln, b, a in changes]
        if quick:
            source, changes = rewrite_quick(source, bound)
            found += [(ln, b, a, "quick") for ln, b, a in changes]
        rewrites += [Rewrite(cell.number, section.file_line(cell, ln), b, a, why)
                     for ln, b, a, why in sorted(found)]
        cells.append(replace(cell, source=source))
    return replace(section, cells=cells, rewrites=rewrites)
