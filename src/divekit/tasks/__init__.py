"""Tasks: one module per job, each one :class:`~divekit.engine.task.Task` subclass with its
config, data, model building, steps and metrics.

The built-in tasks (and any package's) are found by name through the ``divekit.tasks`` entry
points (``pyproject.toml``); a model's registered task names the one that trains it. Training,
evaluating and predicting are the engine's, the same for every task::

    from divekit.tasks import train, evaluate, predict
    result = train({"model": "resnet18", "data": "digits", "epochs": 5})
    evaluate(result.run_dir)
    predict(result.run_dir, ["seven.png"], top_k=3)
"""

from __future__ import annotations

from typing import Any

from divekit.engine.run import evaluate, load_run, make_config, predict
from divekit.engine.run import train as _train_task
from divekit.engine.task import Task, TrainResult, task_class
from divekit.models import model_info

__all__ = ["evaluate", "load_run", "predict", "task_for", "train"]


def task_for(model: str) -> type[Task]:
    """The Task class that trains ``model`` (its registered task)."""
    name = model_info(model).task
    return task_class(name)


def train(config: Any, callbacks: list | None = None) -> TrainResult:
    """Train from a config dataclass, or from a dict of options (``model`` and ``data`` at
    least) completed by the model's recommended recipe; writes a run directory."""
    if isinstance(config, dict):
        cls = task_for(config.get("model") or "")
        config = make_config(cls.Config, config)
    else:
        cls = task_for(config.model) if not config.model.startswith("torchvision:") else task_class("classify")
    return _train_task(cls(config), callbacks)
