"""The engine: one Trainer for every task, the Task seam, callbacks, checkpoints, runs.

The names below load on first use, so ``import divekit.engine.device`` (the ``divekit``
command's first import) does not build the Trainer and every model family it imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from divekit.engine.callbacks import Callback
    from divekit.engine.config import LaunchConfig, TaskConfig, TrainConfig
    from divekit.engine.task import Task
    from divekit.engine.trainer import Trainer, seed_everything

_HOMES = {"Callback": "callbacks", "LaunchConfig": "config", "TaskConfig": "config",
          "TrainConfig": "config", "Task": "task", "Trainer": "trainer",
          "seed_everything": "trainer"}

__all__ = ["Callback", "LaunchConfig", "Task", "TaskConfig", "TrainConfig", "Trainer",
           "seed_everything"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"divekit.engine.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'divekit.engine' has no attribute {name!r}")
