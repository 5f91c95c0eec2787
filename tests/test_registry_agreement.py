"""The registries agree: every task has its entry point, every model's task exists, every model
and dataset is found by the zoo's listings.

A task, a model and a dataset each register themselves where they are defined (``class
T(Task, name=...)``, ``@register_model``, ``@register_dataset``); the lists that find them
(the ``divekit.tasks`` entry points, kept by hand in ``pyproject.toml``; the model and dataset
registries find their modules with pkgutil) could drift, so these tests walk every module and
compare.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import divekit
from divekit.engine.task import Task, task_class

ROOT = Path(__file__).resolve().parents[1]


def _import_all(package: str) -> list:
    """Every module below ``package``, imported."""
    pkg = importlib.import_module(package)
    return [importlib.import_module(m.name)
            for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")]


def _defined_tasks() -> dict[str, str]:
    """name → ``module:Class`` of every Task subclass that a module of divekit.tasks defines and
    registers under a name of its own."""
    found = {}
    for module in _import_all("divekit.tasks"):
        for cls in vars(module).values():
            if (inspect.isclass(cls) and issubclass(cls, Task) and cls.__module__ == module.__name__
                    and "name" in vars(cls)):
                found[cls.name] = f"{cls.__module__}:{cls.__qualname__}"
    return found


def _declared_entry_points() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["entry-points"]["divekit.tasks"])


def test_every_task_in_divekit_tasks_has_an_entry_point_in_pyproject():
    defined = _defined_tasks()
    assert len(defined) >= 8  # classify, detect, segment, language_model, translate, the BERTs, ...
    assert _declared_entry_points() == defined


def test_the_installed_entry_points_are_pyprojects():
    """What ``task_class`` reads (the installed metadata) is what pyproject.toml declares: an
    entry point added there takes effect only after ``pip install -e .``."""
    from importlib.metadata import distribution

    installed = {ep.name: ep.value for ep in distribution("divekit").entry_points
                 if ep.group == "divekit.tasks"}
    declared = _declared_entry_points()
    assert installed == declared, (
        f"the installed divekit's entry points differ from pyproject.toml's (missing: "
        f"{sorted(set(declared) - set(installed))}, extra: {sorted(set(installed) - set(declared))});"
        " reinstall: pip install --no-deps --no-build-isolation -e .")
    for name, target in declared.items():
        module, _, qualname = target.partition(":")
        assert task_class(name) is getattr(importlib.import_module(module), qualname)


def test_every_registered_models_task_exists():
    from divekit.models import list_models, model_info

    names = list_models()
    assert len(names) > 20
    tasks = {model_info(n).task for n in names}
    for task in sorted(tasks):
        assert task_class(task).name == task
    assert {"classify", "detect", "segment", "language_model", "translate"} <= tasks


def _fresh(code: str) -> str:
    """What ``code`` prints in a new interpreter: only the imports divekit itself makes."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_model_module_is_reached_by_the_zoo():
    """A module below divekit.models that registers a model is reached by the zoo (``FAMILIES``
    orders the listing, pkgutil finds the rest): a fresh ``list_models()`` names every model
    registered anywhere."""
    from divekit.models import list_models

    _import_all("divekit.models")
    everywhere = set(list_models())
    listed = set(_fresh("from divekit.models import list_models; print(*list_models())").split())
    assert listed == everywhere


def test_every_dataset_is_listed_by_divekit_datasets():
    """Every dataset a module of divekit.data registers appears in ``divekit datasets``, run in a
    fresh interpreter (so only the imports of ``data/__init__.py`` count)."""
    from divekit.data import list_datasets

    _import_all("divekit.data")
    registered = set(list_datasets())
    assert len(registered) > 10
    out = _fresh("from divekit.cli import main; main(['datasets'])")
    lines = out.splitlines()
    assert lines[0].split() == ["name", "task", "offline", "description"]
    assert {line.split()[0] for line in lines[1:]} == registered


def test_divekit_is_the_package_under_test():
    assert Path(divekit.__file__).resolve().is_relative_to(ROOT / "src")
