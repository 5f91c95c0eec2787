"""The model registry: ``create_model(name, **kw)`` and ``list_models()``, as in timm.

Builders register themselves with :func:`register_model`; the CLI never hard-codes a list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from divekit.errors import UnknownNameError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_shape: tuple[int, int, int] | None  # default (C, H, W) input; None for sequence models
    task: str  # "classify", "detect", "language_model", ...
    # the family's hyper-parameters: a frozen dataclass whose fields are the builder's keyword
    # arguments (the CLI's `divekit train MODEL` options come from it); None: none to set
    config: type | None = None
    # the recommended training recipe, as timm's pretrained configs and torchvision's reference
    # recipes carry it: dataset name (or "*" for any) -> training options (optimizer, lr, ...)
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def recipe(self, data: str | None) -> dict[str, Any]:
        """The training options recommended for ``data``: the ``"*"`` entry, updated with the
        dataset's own."""
        return {**self.recipes.get("*", {}), **(self.recipes.get(data, {}) if data else {})}

    def model_options(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The builder's keyword arguments from :attr:`config`, with ``values`` on top
        (checked by the config dataclass; unknown names refused)."""
        if self.config is None:
            if values:
                raise ValueError(f"model {self.name!r} takes no options, got {sorted(values)}")
            return {}
        return dataclasses.asdict(self.config(**(values or {})))


_REGISTRY: dict[str, ModelInfo] = {}

# The model families in the course's order, which is the order of `divekit models`. Importing
# one registers its builders; they load on demand, one at a time until a name is found
# (``resnet50`` needs neither the detectors' torchvision nor BERT), and all of them for a
# listing or an unknown name. A new module of divekit.models that registers builders needs no
# entry here: every other module is found by pkgutil and loaded after these (this list only
# orders the listing and the search).
FAMILIES = ["lenet", "alexnet", "vgg", "nin", "googlenet", "resnet", "densenet", "rnn", "seq2seq",
            "transformer", "ssd", "yolo", "centernet", "rcnn", "bert", "fcn"]
_loaded: set[str] = set()


def _families() -> list[str]:
    """FAMILIES, then every other public module of divekit.models (alphabetically)."""
    import pkgutil

    import divekit.models

    rest = sorted(m.name for m in pkgutil.iter_modules(divekit.models.__path__)
                  if not m.name.startswith("_") and m.name not in FAMILIES and m.name != "registry")
    return [*FAMILIES, *rest]


def _load_families(until: str | None = None) -> None:
    """Import the families not loaded yet, in order, stopping once ``until`` is registered."""
    import importlib

    for family in _families():
        if until is not None and until in _REGISTRY:
            return
        if family not in _loaded:
            importlib.import_module(f"divekit.models.{family}")
            _loaded.add(family)


def register_model(
    name: str | None = None,
    *,
    input_shape: tuple[int, int, int] | None = (1, 28, 28),
    task: str = "classify",
    description: str | None = None,
    config: type | None = None,
    recipes: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name`` (default: the function's name).

    ``config`` is the family's hyper-parameter dataclass (fields named as the builder's
    arguments) and ``recipes`` its recommended training options per dataset (see
    :class:`ModelInfo`).

    The description defaults to the first line of the builder's docstring.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = ModelInfo(key, fn, description or (doc[0] if doc else ""), input_shape,
                                   task, config, dict(recipes or {}))
        return fn

    return wrap


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        _load_families(until=name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("model", name, _REGISTRY) from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model('resnet18', num_classes=10, in_channels=1)``."""
    return model_info(name).builder(**kwargs)


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``task`` when given."""
    _load_families()
    return sorted(n for n, info in _REGISTRY.items() if task is None or info.task == task)
