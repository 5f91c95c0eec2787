"""The engine's modules import each other in no circle (issue 23, item 5).

A circle between modules (``trainer`` imports ``run`` at the top, ``run`` imports ``trainer``
inside a function) works only as long as every import in it stays where it is: move one to the
top of its module and Python fails with a half-initialised module. So the engine's imports
form a graph with a direction, lower modules (``task``, ``record``, ``checkpoint``) below the
ones that use them (``trainer``, then ``run``).

The walk reads each module of ``src/divekit/engine`` with :mod:`ast`, without importing it, and
counts every ``import`` of an engine module, at the top of the module *and* inside functions
(those run too, only later). Imports under ``if TYPE_CHECKING:`` are left out: they never run,
they only name types for the type checker. ``from divekit.engine import Name`` counts as an
import of the module that ``divekit/engine/__init__.py`` loads ``Name`` from (its ``_HOMES``).
A module looked up by a name in a string is not an import and is not counted: the strategy
registry (``STRATEGY_CLASSES`` in ``strategies.py``) names ``"divekit.engine.fsdp:FSDPStrategy"``
and loads it when a run asks for it, as entry points load tasks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "src" / "divekit" / "engine"
PACKAGE = "divekit.engine"


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of ``tree`` that runs (not under ``TYPE_CHECKING``), each with
    whether it sits inside a function."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                for other in child.orelse:  # the else branch of TYPE_CHECKING runs
                    visit_one(other, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, in_function))
        visit(node, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef
                                                              | ast.Lambda))

    visit(tree, False)
    return found


def _homes(init: Path) -> dict[str, str]:
    """``_HOMES`` of the package's ``__init__``: the lazily loaded name → its module."""
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "_HOMES" for t in targets):
            return ast.literal_eval(node.value)
    return {}


Edge = tuple[str, int, bool]  # (imported module, line, inside a function)


def import_graph(directory: Path, package: str = PACKAGE) -> dict[str, list[Edge]]:
    """Module name (``trainer``, ``__init__``) → the package's modules it imports when run."""
    modules = {p.stem for p in directory.glob("*.py")}
    homes = _homes(directory / "__init__.py")
    graph: dict[str, list[Edge]] = {}
    for path in sorted(directory.glob("*.py")):
        me = path.stem
        edges: list[Edge] = []
        for node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name[len(package) + 1:].split(".")[0] for a in node.names
                           if a.name.startswith(package + ".")]
            else:
                base = node.module or ""
                if node.level == 1:  # from . import x / from .x import y
                    base = f"{package}.{base}" if base else package
                elif node.level > 1:
                    continue  # above the package: not an engine module
                if base == package:
                    targets = [a.name if a.name in modules else homes.get(a.name, "__init__")
                               for a in node.names]
                elif base.startswith(package + "."):
                    targets = [base[len(package) + 1:].split(".")[0]]
            edges += [(t, node.lineno, in_function) for t in targets if t in modules and t != me]
        graph[me] = edges
    return graph


def cycles(graph: dict[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Each group of modules that reach each other (Tarjan's strongly connected components),
    with one circle in it: the edges around it, from the group's first module back to it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(g, _circle_through(graph, set(g), g[0])) for g in groups]


def _circle_through(graph: dict[str, list[Edge]], group: set[str], start: str) -> list[Edge]:
    """The shortest path of edges from ``start`` back to ``start`` inside ``group``."""
    came: dict[str, tuple[str, Edge]] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for edge in graph.get(v, []):
                w = edge[0]
                if w not in group or w in came:
                    continue
                came[w] = (v, edge)
                if w == start:
                    path: list[Edge] = []
                    node = start
                    while True:
                        prev, e = came[node]
                        path.append(e)
                        node = prev
                        if node == start:
                            return path[::-1]
                nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


def describe(circle: list[Edge]) -> str:
    """``trainer -> launch (trainer.py:34) -> run (launch.py:113, in a function) -> ...``"""
    start = circle[-1][0]
    parts, here = [start], start
    for target, line, in_function in circle:
        parts.append(f"{target} ({here}.py:{line}{', in a function' if in_function else ''})")
        here = target
    return " -> ".join(parts)


def test_the_engine_modules_import_each_other_in_no_circle():
    graph = import_graph(ENGINE)
    assert {"trainer", "run", "task", "record"} <= set(graph), sorted(graph)
    # the walk sees the imports it should: the lifecycle stands on the Trainer and the Task
    assert {"trainer", "task", "record"} <= {t for t, _, _ in graph["run"]}
    found = cycles(graph)
    shown = [f"{', '.join(group)} reach each other, as in {describe(circle)}"
             for group, circle in found]
    assert not found, "the engine's modules import each other in a circle:\n" + "\n".join(shown)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "engine"
    directory.mkdir()
    for name, text in files.items():
        (directory / f"{name}.py").write_text(text)
    return directory


def test_the_walk_finds_a_circle_closed_inside_a_function(tmp_path):
    # the circle the engine had: trainer -> run at the top, run -> trainer in a function
    directory = _package(tmp_path, {
        "__init__": "_HOMES = {'Trainer': 'trainer'}\n",
        "task": "import torch\n",
        "trainer": "from divekit.engine.run import Run\nfrom divekit.engine.task import Task\n",
        "run": "from divekit.engine import task\n\n\ndef train():\n"
               "    from divekit.engine import Trainer\n    return Trainer\n",
    })
    graph = import_graph(directory)
    assert graph["run"] == [("task", 1, False), ("trainer", 5, True)]
    ((group, circle),) = cycles(graph)
    assert group == ["run", "trainer"]
    assert describe(circle) == "run -> trainer (run.py:5, in a function) -> run (trainer.py:1)"


def test_type_checking_imports_and_relative_imports(tmp_path):
    directory = _package(tmp_path, {
        "a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
             "    from divekit.engine.b import B\nelse:\n    from .c import C\n",
        "b": "from . import a\n",
        "c": "import divekit.engine.b\n",
    })
    graph = import_graph(directory)
    assert graph == {"a": [("c", 5, False)], "b": [("a", 1, False)], "c": [("b", 1, False)]}
    ((group, circle),) = cycles(graph)
    assert group == ["a", "b", "c"] and [t for t, _, _ in circle] == ["c", "b", "a"]
    # without the else branch the type checker's import alone closes no circle
    (directory / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from divekit.engine.b import B\n")
    assert cycles(import_graph(directory)) == []
