"""One spawn of 2 gloo processes for every distributed test file that asks for one.

Starting two fresh interpreters, importing torch and divekit, joining a gloo group and warming
up a first ``fit`` costs ~5 s of the 2-core budget per spawn, while the small runs the tests
compare take a second or two after that. So the files below do not spawn on their own: each
names a *section* here (its module, its worker, and optionally a ``prepare`` run in this process
first), and the first file whose fixture asks for its results runs every section the session
needs, one after the other, in one spawn. Each section writes under its own folder, as its
worker did when it had a spawn of its own, so the tests read the same files.

A section that raises records its traceback and ends the spawn (its peer may be waiting in a
collective, so going on is no option); the files whose sections finished still get their
results, the others fail with that traceback. Running one file alone spawns for its section
only.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path

import pytest

from divekit.engine.launch import spawn_local

# name -> (test module, its fixture reading the results, worker(rank, out), prepare(out) or None).
# The order is the order they run in: async last (its stragglers and unequal step counts are
# the runs most likely to leave a peer waiting, should one ever fail).
SECTIONS: dict[str, tuple[str, str, str, str | None]] = {
    "equivalence": ("test_distributed_equivalence", "two_process_runs", "_worker", None),
    "tensor": ("test_strategy_tensor", "runs", "_worker", "_prepare"),
    "fsdp": ("test_strategy_fsdp", "runs", "_worker", "_prepare"),
    "pipeline": ("test_strategy_pipeline", "pipeline_runs", "_worker", None),
    "lm": ("test_lm_distributed", "two_process_runs", "_worker", None),
    "async": ("test_strategy_async", "runs", "_worker", None),
}
RANKS = (0, 1)

_root: Path | None = None


def _needed(session: pytest.Session) -> list[str]:
    """The sections whose fixture a selected test uses (all of them in ``make test``)."""
    used = {(item.module.__name__.rpartition(".")[2], name) for item in session.items
            if getattr(item, "module", None) is not None
            for name in getattr(item, "fixturenames", ())}
    return [s for s, (module, fixture, *_) in SECTIONS.items() if (module, fixture) in used]


def _worker(rank: int, root: str, sections: list[tuple[str, str, str]]) -> None:
    """Each (name, module, worker) in turn, in this rank's process."""
    for name, module, worker in sections:
        out = Path(root) / name
        try:
            getattr(importlib.import_module(module), worker)(rank, str(out))
        except BaseException:
            (out / f"error-rank{rank}.txt").write_text(traceback.format_exc())
            raise
        (out / f"done-rank{rank}").touch()


def _run_all(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-process-runs")
    names = _needed(request.session)
    for name in list(names):
        module, _, _, prepare = SECTIONS[name]
        (root / name).mkdir()
        if prepare is not None:
            try:
                getattr(importlib.import_module(module), prepare)(root / name)
            except BaseException:  # this section cannot run; the others still do
                (root / name / "error-prepare.txt").write_text(traceback.format_exc())
                names.remove(name)
    if names:
        try:
            spawn_local(_worker, len(RANKS), str(root),
                        [(name, SECTIONS[name][0], SECTIONS[name][2]) for name in names])
        except Exception:  # the failing section wrote its traceback; later ones did not run
            (root / "spawn-error.txt").write_text(traceback.format_exc())
    return root


def section_dir(name: str, request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of section ``name``'s results, after the session's one spawn (run on the
    first call); fails the asking test when that section did not finish on every rank."""
    global _root
    if _root is None:
        _root = _run_all(request, tmp_path_factory)
    if not (_root / name).is_dir():
        raise RuntimeError(f"section {name!r} is not in this session's spawn")
    out = _root / name
    if all((out / f"done-rank{r}").exists() for r in RANKS):
        return out
    errors = [p.read_text() for p in [out / "error-prepare.txt",
                                      *(out / f"error-rank{r}.txt" for r in RANKS)]
              if p.exists()]
    if not errors:
        spawn_error = _root / "spawn-error.txt"
        errors = [f"section {name!r} did not run: an earlier section or the spawn failed\n"
                  + (spawn_error.read_text() if spawn_error.exists() else "")]
    pytest.fail("\n".join(errors), pytrace=False)
