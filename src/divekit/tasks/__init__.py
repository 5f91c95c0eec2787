"""Tasks: one module per job. Each builds data, model, loss and metrics from a config and
hands them to the engine, and holds the job's inference.

A task module exposes ``Config`` (a dataclass whose fields become ``divekit train`` options),
``train(config)``, and optionally ``evaluate(run_dir, ...)``, ``predict(...)`` and
``add_commands(subparsers)`` for commands of its own (``divekit generate``, ...).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from divekit.errors import DivekitError

# model task (as registered in divekit.models) -> module implementing it
TASK_MODULES: dict[str, str] = {
    "classify": "divekit.tasks.classify",
    "detect": "divekit.tasks.detect",
    "language_model": "divekit.tasks.language_model",
    "translate": "divekit.tasks.translate",
}


def task_module(task: str) -> ModuleType:
    try:
        return importlib.import_module(TASK_MODULES[task])
    except KeyError:
        raise DivekitError(f"no training task for {task!r} models yet") from None


# modules adding commands of their own to the CLI through add_commands(subparsers, parent)
COMMAND_MODULES: list[str] = ["divekit.tasks.finetune", "divekit.tasks.language_model",
                              "divekit.tasks.sequence", "divekit.tasks.translate"]


def command_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in COMMAND_MODULES]
