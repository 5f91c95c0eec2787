"""The seam between a job (classification, detection, a language model, ...) and the engine.

A :class:`Task` says what a batch means; the :class:`~divekit.engine.trainer.Trainer` owns
everything else: devices, AMP, the optimizer and schedule, gradient clipping, distribution,
checkpoints, the validation loop and the callbacks. A new job is one small subclass::

    class Regression(Task, name="regression"):
        Config = RegressionConfig                       # a frozen TrainConfig subclass

        def train_data(self):  return TensorBatchLoader(self.x, self.y, batch_size=32, shuffle=True)
        def val_data(self):    return TensorBatchLoader(self.xv, self.yv, batch_size=256)
        def build_model(self): return nn.Linear(4, 1)

        def training_step(self, model, batch):
            x, y = batch
            loss = F.mse_loss(model(x), y)
            return loss, {"loss": loss.detach()}

        def validation_step(self, model, batch):
            x, y = batch
            return {"sq_err": F.mse_loss(model(x), y, reduction="sum"), "count": y.numel()}

        def validation_end(self, sums):
            return {"mse": sums["sq_err"] / sums["count"]}

The five methods above the last are required (``validation_end`` has a default). Every other
hook exists here as a documented no-op, so the whole life cycle reads in this one file and a
misspelled hook is an error: defining ``on_epoc_end`` fails when the class is created.

Life cycle, as the Trainer calls it::

    model = build_model(); groups = param_groups(model)
    for epoch:  on_epoch_start(model, epoch)
                for batch in train_data(): loss, logs = training_step(model, batch)
                on_validation_start(model)
                sums = Σ validation_step(model, batch)   (tensors and numbers add; lists join)
                metrics = validation_end(sums)
                row = summarize({train_*, val_*, ...})
                on_epoch_end(model, epoch, run, metrics)   (rank 0, with a run directory)
    checkpoints hold checkpoint_state() per rank; resume calls restore_checkpoint_state.
    `divekit evaluate` runs the same validation loop, then on_evaluate(model, run, metrics).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from divekit.engine.checkpoint import CheckpointDir
from divekit.errors import DivekitError

_TASKS: dict[str, type[Task]] = {}


class Task:
    """One training job. Subclass it with ``class MyTask(Task, name="my_task")``.

    ``config`` is the task's frozen config dataclass (:attr:`Config`). ``record`` is what a run
    directory's ``config.json`` saved (``run_record()`` and more) when the task is rebuilt to
    evaluate or predict; it lets ``build_model`` size the model without loading the data.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    # the options of ``divekit predict`` for this task's runs: a dataclass whose fields (made
    # with divekit.config.option) are keyword arguments of predict(); None: no options
    PredictConfig: ClassVar[type | None] = None

    def __init__(self, config: Any, record: dict[str, Any] | None = None):
        self.config = config
        self.record = record or {}

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        hooks = {n for n in vars(Task) if n.startswith("on_")}
        unknown = sorted(n for n in vars(cls) if n.startswith("on_") and n not in hooks)
        if unknown:
            raise TypeError(
                f"{cls.__name__} defines {', '.join(unknown)}, which is not a Task hook; "
                f"the hooks are {', '.join(sorted(hooks))}"
            )
        for method in ("training_step", "validation_step", "validation_end", "on_epoch_end"):
            _check_signature(cls, method)
        if name is not None:
            cls.name = name
            _TASKS[name] = cls

    # ------------------------------------------------------------------ required
    def train_data(self) -> Iterable:
        """The training batches of one epoch (iterable with ``len``). Under data parallelism it
        must offer ``shard(rank, world_size)`` and ``global_batch_size(i)``, as
        :class:`~divekit.data.loader.TensorBatchLoader` does."""
        raise NotImplementedError(f"{type(self).__name__} must define train_data()")

    def val_data(self) -> Iterable | None:
        """The validation batches, or ``None`` for a task without validation."""
        raise NotImplementedError(f"{type(self).__name__} must define val_data()")

    def build_model(self) -> nn.Module:
        """A fresh model (on the CPU; the Trainer moves it)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_model()")

    def training_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The *mean* loss over ``batch`` (already on the device) and metrics to log, each a
        mean over the batch (the Trainer averages them over the epoch, weighted by
        :meth:`batch_size`)."""
        raise NotImplementedError(f"{type(self).__name__} must define training_step()")

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """Sums and counts of one validation batch. The Trainer adds tensors and numbers over
        the batches (and the ranks), joins lists, and hands the totals to
        :meth:`validation_end`. It runs the model in eval mode under ``inference_mode``."""
        raise NotImplementedError(f"{type(self).__name__} must define validation_step()")

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        """The epoch's validation metrics from the totals. Numbers are logged as ``val_NAME``;
        other values (predictions, confusion matrices) only reach :meth:`on_epoch_end` and
        :meth:`on_evaluate`. Default: each total divided by ``sums["count"]``."""
        if "count" not in sums:
            raise DivekitError(f"{type(self).__name__}.validation_step returns no 'count'; "
                               "return one or define validation_end")
        count = max(float(sums["count"]), 1.0)
        return {k: float(v) / count for k, v in sums.items() if k != "count"}

    # ------------------------------------------------------------------ optional hooks
    def param_groups(self, model: nn.Module) -> Iterable:
        """What the optimizer updates: ``model.parameters()``, or groups with their own ``lr``
        (fine-tuning: a new head at 10× the rate, frozen stages left out)."""
        return model.parameters()

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch``, the weight of its metrics (a language model counts tokens)."""
        return len(batch[0])

    def pipeline_split(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, targets)`` of ``batch`` for ``--strategy pipeline``: the first stage feeds
        ``model(*inputs)`` (a tensor or a tuple of them, batch first), the last stage hands the
        output and ``targets`` (rows aligned with the inputs') to :meth:`pipeline_loss`.
        A task overrides both to be pipelined."""
        raise DivekitError(f"this task ({type(self).__name__}) cannot be pipelined")

    def pipeline_loss(self, output: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss and logs (means) of a microbatch's ``output`` against its
        ``targets``, as :meth:`training_step` gives them for a whole batch."""
        raise DivekitError(f"this task ({type(self).__name__}) cannot be pipelined")

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Before the first training step of ``epoch`` (1-based): reset carried state."""

    def on_validation_start(self, model: nn.Module) -> None:
        """Before the first validation batch (a language model resets its carried state)."""

    def summarize(self, row: dict[str, Any]) -> dict[str, Any]:
        """The epoch's log row with derived columns added (perplexity = exp(loss))."""
        return row

    def on_epoch_end(self, model: nn.Module, epoch: int, run: Run, metrics: dict[str, Any]) -> None:
        """After the epoch's checkpoint, on rank 0 of a run with a directory: the job's pictures
        and reports, from the validation results in ``metrics`` (:meth:`validation_end`)."""

    def on_evaluate(self, model: nn.Module, run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
        """After ``divekit evaluate``'s validation loop: write reports into ``run.dir`` and return
        extra entries for the result (a picture's path)."""
        return {}

    def checkpoint_state(self) -> Any:
        """State of the task's own that a resume needs (a carried hidden state): ``None``, or
        tensors, numbers and strings in dicts, lists and tuples. Saved once per rank."""
        return None

    def restore_checkpoint_state(self, model: nn.Module, state: Any) -> None:
        """Take back what :meth:`checkpoint_state` saved (on the CPU; move it to ``model``'s
        device), at the point it was saved."""

    def prepare(self) -> None:
        """Before a new run's record is written: settle options that depend on the data or the
        machine (``--batch-size auto``) by replacing ``self.config``."""

    def run_record(self) -> dict[str, Any]:
        """Facts of the data that rebuilding the model needs (classes, vocabulary size, input
        statistics), saved in ``config.json`` beside the config and given back as
        :attr:`record`."""
        return {}

    def save_extras(self, run_dir: Any) -> None:
        """Write the task's extra files into a new run directory (vocabularies, tokenizers)."""

    def load_extras(self, run_dir: Any) -> None:
        """Read back what :meth:`save_extras` wrote, when the task is rebuilt from a run."""

    def predict(self, model: nn.Module, inputs: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """The job's inference on user inputs (image files, sentences), one result per input.
        ``options`` are the fields of :attr:`PredictConfig` the user gave."""
        raise DivekitError(f"{type(self).__name__} runs do not support predict")

    # ------------------------------------------------------------------ how results read
    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """What ``divekit evaluate`` prints for :func:`~divekit.engine.run.evaluate`'s
        ``metrics``. Default: every float as ``name 0.1234``, comma-separated."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def format_prediction(self, item: dict[str, Any]) -> str:
        """The line ``divekit predict`` prints for one result of :meth:`predict`."""
        return str(item)


def _check_signature(cls: type, method: str) -> None:
    """A hook overridden with the wrong number of arguments fails at class creation."""
    if method not in vars(cls):
        return
    want = len(inspect.signature(getattr(Task, method)).parameters)
    params = inspect.signature(vars(cls)[method]).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return
    have = len([p for p in params if p.default is p.empty])
    if have != want:
        raise TypeError(f"{cls.__name__}.{method} takes {have} arguments; Task.{method} "
                        f"takes {want} ({', '.join(inspect.signature(getattr(Task, method)).parameters)})")


def task_class(name: str) -> type[Task]:
    """The Task registered as ``name``: classes register when defined, the built-in ones (and
    any package's) through the ``divekit.tasks`` entry points."""
    if name not in _TASKS:
        from importlib.metadata import entry_points

        for ep in entry_points(group="divekit.tasks"):
            if ep.name == name:
                ep.load()
                break
    if name not in _TASKS:
        known = sorted({*_TASKS, *(ep.name for ep in _entry_points())})
        raise DivekitError(f"no task {name!r}; known tasks: {', '.join(known)}")
    return _TASKS[name]


def task_for(model: str) -> type[Task]:
    """The Task class that trains ``model``: its registered task (a ``torchvision:ARCH``
    source of ``finetune`` is a classifier). A name the zoo does not know is looked up again
    after every entry point's task is loaded (:func:`load_tasks`): a package that adds a task
    registers its models in the task's module."""
    from divekit.errors import UnknownNameError
    from divekit.models import model_info

    if model.startswith("torchvision:"):
        return task_class("classify")
    try:
        name = model_info(model).task
    except UnknownNameError:
        load_tasks()
        name = model_info(model).task
    return task_class(name)


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group="divekit.tasks"))


def list_tasks() -> list[str]:
    return sorted({*_TASKS, *(ep.name for ep in _entry_points())})


def load_tasks() -> None:
    """Import every task the ``divekit.tasks`` entry points name. A task module registers its
    own models when imported (``register_model``), so a package that adds a task through an
    entry point adds its models too: a model name the zoo does not know is looked up again
    after this (:func:`task_for`)."""
    for name in list_tasks():
        task_class(name)


def predict_options() -> type:
    """One dataclass with the fields of every registered task's :attr:`Task.PredictConfig`:
    the options ``divekit predict`` offers before it knows the run's task (engine.run.predict
    then refuses those the run's task does not take). Each help text begins with the tasks
    that take the option; a field that several tasks declare appears once, with their flag
    aliases joined, each distinct help text after the names of its tasks, and a default only
    where all of them agree on it."""
    import dataclasses
    import typing

    found: dict[str, list[tuple[str, Any, Any]]] = {}
    for name in list_tasks():
        config = task_class(name).PredictConfig
        if config is None:
            continue
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            found.setdefault(f.name, []).append((name, f, hints[f.name]))
    specs = []
    for field_name, declared in found.items():
        _, first, hint = declared[0]
        by_help: dict[str, list[str]] = {}
        for task, f, _ in declared:
            by_help.setdefault(f.metadata.get("help", ""), []).append(task)
        shown = "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in by_help.items())
        aliases = list(dict.fromkeys(a for _, f, _ in declared for a in f.metadata.get("aliases", [])))
        metadata = {**first.metadata, "help": shown, **({"aliases": aliases} if aliases else {})}
        default = first.default if all(f.default == first.default for _, f, _ in declared) else None
        specs.append((field_name, hint, dataclasses.field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("PredictOptions", specs, frozen=True)


# ------------------------------------------------------------------ a run of a task
@dataclass
class Run:
    """An open run directory: its config, the task and (once built) the model.

    The Trainer makes one for the run it writes and hands it to :meth:`Task.on_epoch_end`;
    :func:`divekit.engine.run.load_run` makes one for ``evaluate``, ``predict`` and the other
    commands that read a run. It lives beside :class:`Task` (and not with the lifecycle in
    :mod:`divekit.engine.run`) so that the Trainer, below the lifecycle, can build it."""

    dir: Path
    config: Any
    record: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def checkpoints(self) -> CheckpointDir:
        return CheckpointDir(self.dir)

    def latest_weights(self) -> Path:
        ckpt = self.checkpoints.latest()
        if ckpt is None:
            raise DivekitError(f"{self.dir} holds no checkpoint yet (train it first)")
        return ckpt / "model.safetensors"


@dataclass
class TrainResult:
    """What :func:`divekit.engine.run.train` returns: where the run lives, its history, the
    trained model."""

    run_dir: Path
    history: list[dict[str, Any]]
    model: nn.Module = field(repr=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}
