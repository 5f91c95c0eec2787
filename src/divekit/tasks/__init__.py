"""Tasks: one module per job, each one :class:`~divekit.engine.task.Task` subclass with its
config, data, model building, steps and metrics.

The built-in tasks (and any package's) are found by name through the ``divekit.tasks`` entry
points (``pyproject.toml``); a model's registered task names the one that trains it. Training,
evaluating and predicting are the engine's run lifecycle (:mod:`divekit.engine.run`), the same
for every task, and this package offers those functions as they are::

    from divekit.tasks import train, evaluate, predict
    result = train({"model": "resnet18", "data": "digits", "epochs": 5})
    evaluate(result.run_dir)
    predict(result.run_dir, ["seven.png"], top_k=3)

``train`` takes a dict of options (completed by the model's recipe), a task's config dataclass,
or a :class:`~divekit.engine.task.Task` instance.
"""

from __future__ import annotations

from divekit.engine.run import evaluate, load_run, predict, train

__all__ = ["evaluate", "load_run", "predict", "train"]
