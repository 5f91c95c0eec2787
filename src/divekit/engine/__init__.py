"""The engine: one Trainer for every task, the Task seam, callbacks, checkpoints, runs."""

from divekit.engine.callbacks import Callback
from divekit.engine.config import LaunchConfig, TaskConfig, TrainConfig
from divekit.engine.task import Task
from divekit.engine.trainer import Trainer, seed_everything

__all__ = ["Callback", "LaunchConfig", "Task", "TaskConfig", "TrainConfig", "Trainer",
           "seed_everything"]
