"""The dataset registry: ``load_dataset(name, **kw)`` and ``list_datasets()``.

A loader is registered with :func:`register_dataset` and called as
``loader(data_dir=..., download=..., seed=..., **options)``; it returns the task's data object
(for classification an :class:`~divekit.data.vision.ImageClassificationData`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from divekit.errors import UnknownNameError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[..., Any]
    description: str
    task: str  # "classify", "detect", "segment", "text", ...
    offline: bool  # True when it needs no files at all (embedded or generated)


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, *, task: str, offline: bool, description: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = DatasetInfo(name, fn, description or (doc[0] if doc else ""), task, offline)
        return fn

    return wrap


_discovered = False


def _discover() -> None:
    """Import every public module of divekit.data once: importing one registers its datasets,
    so a new data module needs no list to join."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a module that looks a dataset up while importing must not recurse
    import importlib
    import pkgutil

    import divekit.data

    for module in pkgutil.iter_modules(divekit.data.__path__):
        if not module.name.startswith("_") and module.name != "registry":
            importlib.import_module(f"divekit.data.{module.name}")


def dataset_info(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("dataset", name, _REGISTRY) from None


def load_dataset(name: str, **kwargs: Any) -> Any:
    """Load a registered dataset, e.g. ``load_dataset('digits', resize=28)``."""
    return dataset_info(name).loader(**kwargs)


def list_datasets(task: str | None = None) -> list[str]:
    _discover()
    return sorted(n for n, i in _REGISTRY.items() if task is None or i.task == task)
