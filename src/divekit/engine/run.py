"""The run lifecycle, once for every task: a run directory is chosen, its config recorded,
trained into, and opened again by every command that uses it.

A run directory holds::

    config.json        {"task", "divekit_version", "command", "config", ...task.run_record()}
    metrics.csv        one row per epoch            (callbacks)
    curves.png                                      (callbacks)
    checkpoint/        epoch-NNNN/{model.safetensors, state.pt}, latest   (engine.checkpoint)
    ...                the task's extra files (vocabularies) and pictures

``train(task)`` creates one, ``load_run(run_dir)`` gives back the task (rebuilt from the record,
without loading training data) and the model with its newest weights, and ``evaluate(run_dir)``
runs the Trainer's validation loop on it. ``divekit evaluate``, ``predict``, ``generate``,
``translate``, ``finetune`` and ``--resume`` all go through here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from divekit import __version__
from divekit.config import config_from_dict, known_values
from divekit.engine.checkpoint import CheckpointDir, load_weights
from divekit.errors import DivekitError
from divekit.io import atomic_write_json

if TYPE_CHECKING:
    from divekit.engine.callbacks import Callback
    from divekit.engine.task import Task

CONFIG = "config.json"


@dataclass
class Run:
    """An open run directory: its config, the task and (once built) the model."""

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
    """What ``train`` returns: where the run lives, its history, the trained model."""

    run_dir: Path
    history: list[dict[str, Any]]
    model: nn.Module = field(repr=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ------------------------------------------------------------------------ choosing and recording
def choose_run_dir(out: str | None, default_name: str, resume: bool) -> Path:
    """The run directory: ``--out`` as given, else ``runs/<model>-<data>[-N]``.

    A fresh run never overwrites another run's checkpoints; ``resume`` needs one to exist.
    Without ``--out``, a fresh run takes the first free ``-N`` suffix and ``resume`` takes the
    newest run of that name.
    """
    if out is not None:
        path = Path(out)
        has_ckpt = CheckpointDir(path).latest() is not None
        if resume and not has_ckpt:
            raise DivekitError(f"nothing to resume: {path} holds no checkpoint")
        if not resume and has_ckpt:
            raise DivekitError(
                f"{path} already holds a run; pass --resume to continue it or choose another --out"
            )
        return path
    base = Path("runs") / default_name
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    if resume:
        existing = [p for p in candidates if CheckpointDir(p).latest() is not None]
        if not existing:
            raise DivekitError(f"nothing to resume: no run with a checkpoint under {base}*")
        return existing[-1]
    for path in candidates:
        if not path.exists():
            return path
    raise DivekitError(f"too many runs named {base}; pass --out")


def write_record(run_dir: Path, task: Task) -> None:
    """``config.json`` (the task's name, divekit's version, the command, the config and the
    task's :meth:`~divekit.engine.task.Task.run_record`) and the task's extra files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task.name,
        "divekit_version": __version__,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
        "config": dataclasses.asdict(task.config),
        **task.run_record(),
    }
    atomic_write_json(run_dir / CONFIG, record)
    task.save_extras(run_dir)


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.json``, checked to be a divekit record: a JSON object whose ``config``
    is an object and whose ``task``, ``divekit_version`` and ``command`` (when present) are
    strings. Every failure is one line naming the file."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DivekitError(f"{run_dir} is not a divekit run directory (no {CONFIG})")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DivekitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise DivekitError(f"{path} is not a divekit run record: a JSON {_json_type(record)}, "
                           "not an object")
    if not isinstance(record.get("config"), dict):
        got = "lacks 'config'" if "config" not in record else \
            f"has a {_json_type(record['config'])} as 'config'"
        raise DivekitError(f"{path} is not a divekit run record: it {got} (an object expected)")
    check_record(record, {"task": str, "divekit_version": str, "command": str}, path,
                 required=False)
    return record


def check_record(record: dict[str, Any], keys: dict[str, Any], path: str | Path,
                 required: bool = True) -> None:
    """Refuse a record whose ``keys`` (name → type, as for ``isinstance``; ``float`` takes ints
    too, ``int`` never takes a bool) are missing (when ``required``) or of another type: one
    line naming the file, the key, the type found and the one expected."""
    for key, types in keys.items():
        if key not in record:
            if required:
                raise DivekitError(f"{path} lacks {key!r}, which a {record.get('task')} run needs")
            continue
        if not _is_a(record[key], types):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise DivekitError(f"{path}: {key!r} is a {_json_type(record[key])}, not a {names}")


def _is_a(value: Any, types: Any) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _config_type_errors(config_cls: type, values: dict[str, Any]) -> list[str]:
    """``key (found, expected)`` for each saved config value whose type its field refuses."""
    import typing

    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: judge nothing
        return []
    return [f"{k} is {v!r}, not {getattr(hints[k], '__name__', hints[k])}"
            for k, v in values.items() if k in hints and not _fits_hint(v, hints[k])]


def _fits_hint(value: Any, hint: Any) -> bool:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits_hint(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint in (bool, int, float, str):
        return _is_a(value, hint)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list | tuple)  # JSON keeps tuples as lists
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # Any, callables and the rest: not judged here


def resume_values(config_cls: type, typed: dict[str, Any], run_name: str) -> dict[str, Any]:
    """``--resume``: the saved run's options, with what was typed now on top."""
    run_dir = choose_run_dir(typed.get("out"), run_name, resume=True)
    saved = read_record(run_dir)["config"]
    if typed.get("model") is not None and saved.get("model") != typed["model"]:
        raise DivekitError(f"{run_dir} trained {saved.get('model')!r}, not {typed['model']!r}")
    return {**known_values(config_cls, saved), **typed, "out": str(run_dir), "resume": True}


# ------------------------------------------------------------------------ configs
def make_config(config_cls: type, values: dict[str, Any]) -> Any:
    """A task config from what the user gave, with the model's recommended recipe for the
    dataset under it (:meth:`divekit.models.ModelInfo.recipe`): a value given always wins.
    Options of the model family's config (``num_hiddens``, ...) go into ``model_options``."""
    from divekit.config import field_names
    from divekit.models import model_info

    values = dict(values)
    if not values.get("model"):
        raise DivekitError("no model given")
    info = model_info(values["model"])
    family = field_names(info.config) if info.config is not None else set()
    given = {k: values.pop(k) for k in list(values) if k in family}
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    data = values.get("data") or defaults.get("data")
    merged = {**info.recipe(data), **values}
    merged["model_options"] = {**merged.get("model_options", {}), **given}
    try:
        info.model_options(merged["model_options"])
    except TypeError as e:
        raise DivekitError(f"model {info.name!r}: {e}") from None
    config = config_from_dict(config_cls, merged)
    config.validate()
    return config


# ------------------------------------------------------------------------ training
def train(task: Task, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train ``task`` in a run directory chosen from its config (``out``, ``resume``)."""
    from divekit.engine import distributed as D
    from divekit.engine.trainer import Trainer

    cfg = task.config
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, cfg.run_name, cfg.resume)
    task.prepare()
    if D.current_env().is_main:
        write_record(run_dir, task)
    trainer = Trainer(task, task.config, run_dir, callbacks)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


# ------------------------------------------------------------------------ opening a run
def load_run(run_dir: str | Path, device: str = "cpu", *, weights: bool = True,
             **overrides: Any) -> Run:
    """Open a run: its record, the task rebuilt from it (config fields in ``overrides``
    replaced, such as ``data_dir``), its extra files, and the model with the newest weights
    (``weights=False``: freshly initialised) in eval mode on ``device``."""
    from divekit.engine.device import resolve_device
    from divekit.engine.task import task_class

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    cls = task_class(str(record.get("task", "classify")))
    # a task's facts in the record (classes, vocabulary sizes): class attribute record_keys,
    # name → type, checked here so a bad record is one line and not a KeyError later
    check_record(record, getattr(cls, "record_keys", None) or {}, run_dir / CONFIG)
    values = {**known_values(cls.Config, record["config"]), "resume": False, "out": None}
    wrong = _config_type_errors(cls.Config, values)
    if wrong:
        raise DivekitError(f"{run_dir / CONFIG}: config {'; '.join(wrong[:3])}")
    try:
        config = config_from_dict(cls.Config, {**values, **overrides})
    except TypeError as e:
        raise DivekitError(f"{run_dir / CONFIG} does not fit {cls.__name__}: {e}") from None
    task = cls(config, record=record)
    task.load_extras(run_dir)
    run = Run(run_dir, config, record, task)
    model = task.build_model()
    if weights:
        # a class list or vocabulary that does not fit the weights: one line naming the key
        # and both shapes (engine.checkpoint.load_weights)
        load_weights(model, run.latest_weights(), what=f"the model built from {run_dir / CONFIG}")
    run.model = model.to(resolve_device(device)).eval()
    return run


def evaluate(run_dir: str | Path, *, device: str = "auto", **overrides: Any) -> dict[str, Any]:
    """The validation metrics of a run's newest checkpoint, through the Trainer's validation
    loop, plus what the task's ``on_evaluate`` adds (reports written into the run)."""
    from divekit.engine.trainer import run_validation

    run = load_run(run_dir, device, **overrides)
    assert run.task is not None and run.model is not None
    loader = run.task.val_data()
    if loader is None:
        raise DivekitError(f"{run_dir}: this run's data has no validation split")
    model_device = next(run.model.parameters()).device
    metrics = run_validation(run.task, run.model, loader, model_device)
    extra = run.task.on_evaluate(run.model, run, metrics)
    scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
    return {**scalars, **extra}


def _is_scalar(v: Any) -> bool:
    from torch import Tensor

    return isinstance(v, int | float) or (isinstance(v, Tensor) and v.numel() == 1)


def predict(run_dir: str | Path, inputs: list[Any], *, device: str = "auto",
            **options: Any) -> list[dict[str, Any]]:
    """The run's task's inference on ``inputs`` (image files, sentences)."""
    run = load_run(run_dir, device)
    assert run.task is not None and run.model is not None
    return run.task.predict(run.model, inputs, **options)
