"""The engine: one Trainer for every task, checkpoints, optimizers, callbacks."""

from divekit.engine.trainer import Task, TrainConfig, Trainer, seed_everything

__all__ = ["Task", "TrainConfig", "Trainer", "seed_everything"]
