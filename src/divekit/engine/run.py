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

A run has one writer: ``train`` holds the run directory's lock (:mod:`divekit.engine.lock`) from
choosing the directory to its last checkpoint; readers take no lock. ``--resume`` continues the
run that config.json describes: an option that changes what the run learns (``--seed``,
``--lr``, ...) is refused with the list of differences unless ``--force-resume`` is given, and
then recorded in config.json as ``forced_changes`` (:func:`resume_changes`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from divekit import __version__
from divekit.config import config_from_dict, flag_name, known_values
from divekit.engine.checkpoint import CheckpointDir, load_weights
from divekit.engine.lock import LOCK_FILE, RunLock
from divekit.errors import DivekitError
from divekit.io import atomic_write_json

if TYPE_CHECKING:
    from divekit.engine.callbacks import Callback
    from divekit.engine.task import Task

CONFIG = "config.json"
# saved options a resume never takes over from config.json: it decides them anew each time
_NOT_CARRIED = ("force_resume",)

log = logging.getLogger("divekit")


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


def write_record(run_dir: Path, task: Task, forced: list[dict[str, Any]] | None = None) -> None:
    """``config.json`` (the task's name, divekit's version, the command, the config and the
    task's :meth:`~divekit.engine.task.Task.run_record`; ``forced_changes``, every option a
    ``--force-resume`` changed, when there are any) and the task's extra files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task.name,
        "divekit_version": __version__,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
        # --force-resume is decided anew by each resume, never carried over from the record
        "config": {**dataclasses.asdict(task.config),
                   **{k: False for k in _NOT_CARRIED if hasattr(task.config, k)}},
        **task.run_record(),
    }
    if forced:
        record["forced_changes"] = forced
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
    """``--resume``: the saved run's options, with what was typed now on top (``train`` then
    refuses typed values that change the run, :func:`resume_changes`)."""
    run_dir = choose_run_dir(typed.get("out"), run_name, resume=True)
    saved = read_record(run_dir)["config"]
    if typed.get("model") is not None and saved.get("model") != typed["model"]:
        raise DivekitError(f"{run_dir} trained {saved.get('model')!r}, not {typed['model']!r}")
    saved = {k: v for k, v in known_values(config_cls, saved).items() if k not in _NOT_CARRIED}
    return {**saved, **typed, "out": str(run_dir), "resume": True}


def resume_changes(saved: dict[str, Any], config: Any) -> list[tuple[str, Any, Any]]:
    """``(flag, value in the run, value now)`` for each option of ``config`` that changes what
    the run learns and differs from ``saved`` (the run's ``config.json`` config). Options in
    the config class's ``RESUME_FREE`` (``--epochs``, ``--device``, ``--quiet``, ...) and options
    the saved record does not know (an older divekit's) are not compared; a model family's
    options (``model_options``) are compared one by one."""
    free: frozenset[str] = getattr(type(config), "RESUME_FREE", frozenset())
    changes = []
    for key, now in dataclasses.asdict(config).items():
        if key in free or key not in saved:
            continue
        old = saved[key]
        if key == "model_options" and isinstance(old, dict) and isinstance(now, dict):
            changes += [(flag_name(k), old.get(k, "default"), now.get(k, "default"))
                        for k in sorted(set(old) | set(now))
                        if k not in old or k not in now or _plain(old[k]) != _plain(now[k])]
        elif _plain(old) != _plain(now):
            changes.append((flag_name(key), old, now))
    return changes


def _plain(value: Any) -> Any:
    """``value`` as config.json keeps it (tuples become lists), for comparing."""
    return json.loads(json.dumps(value, default=str))


def _check_resume(run_dir: Path, config: Any) -> list[dict[str, Any]]:
    """Refuse to resume ``run_dir`` with options that change what it learns (one line listing
    each difference), unless ``config.force_resume``; then the run's ``forced_changes``, the
    earlier ones and these (where each happened: the checkpoint resumed from)."""
    from divekit.engine import distributed as D

    record = read_record(run_dir)
    changes = resume_changes(record["config"], config)
    world = (record.get("distributed") or {}).get("world_size")
    now_world = D.current_env().world_size
    if isinstance(world, int) and world != now_world:  # the global batch: --nproc × per worker
        changes.append(("--nproc", world, now_world))
    earlier = record.get("forced_changes")
    forced = list(earlier) if isinstance(earlier, list) else []
    if not changes:
        return forced
    shown = "; ".join(f"{flag}: {old!r} in the run, {new!r} now" for flag, old, new in changes)
    if not getattr(config, "force_resume", False):
        raise DivekitError(
            f"--resume of {run_dir} with options that change what it learns ({shown}); leave "
            "them out to continue the run as it was, or pass --force-resume to continue anyway "
            f"(recorded in {CONFIG})")
    latest = CheckpointDir(run_dir).latest()
    log.warning("--force-resume: %s continues with %s (recorded in %s)", run_dir, shown, CONFIG)
    return forced + [{"option": flag, "run": old, "now": new,
                      "from_checkpoint": latest.name if latest else None}
                     for flag, old, new in changes]


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
    if values.get("resume"):  # the run's own options under what was given (as the CLI does)
        name = config_cls(model=values["model"], **({"data": values["data"]}
                                                     if values.get("data") else {})).run_name
        values = resume_values(config_cls, values, name)
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
    """Train ``task`` in a run directory chosen from its config (``out``, ``resume``).

    The run directory is locked for the whole call (:class:`~divekit.engine.lock.RunLock`, on
    the process that writes: rank 0 under data parallelism): a second writer is refused in one
    line naming this process. Under the lock the choice is checked again (another writer may
    have finished a run there meanwhile), and a resume is checked against the run's options
    (:func:`resume_changes`)."""
    from divekit.engine import distributed as D
    from divekit.engine.trainer import Trainer

    cfg = task.config
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, cfg.run_name, cfg.resume)
    created = not run_dir.exists()
    lock = RunLock(run_dir) if D.current_env().is_main else None
    try:
        forced = _on_main(lambda: _open_for_writing(lock, run_dir, cfg))
        task.prepare()
        if lock is not None:
            write_record(run_dir, task, forced)
        trainer = Trainer(task, task.config, run_dir, callbacks)
        history = trainer.fit(resume=cfg.resume)
    finally:
        if lock is not None:
            lock.release()
            _remove_if_unused(run_dir, created)
    return TrainResult(run_dir, history, trainer.model)


def _remove_if_unused(run_dir: Path, created: bool) -> None:
    """A run directory this call made and that holds nothing but its lock (the data could not
    be read, say) is removed again: a failed start leaves no run behind."""
    try:
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:  # another process wrote there meanwhile: keep it
        pass


def _open_for_writing(lock: RunLock | None, run_dir: Path, cfg: Any) -> list[dict[str, Any]]:
    assert lock is not None
    lock.acquire()
    choose_run_dir(str(run_dir), cfg.run_name, cfg.resume)  # again, now that no one else writes
    return _check_resume(run_dir, cfg) if cfg.resume else []


def _on_main(fn: Any) -> Any:
    """``fn()`` on rank 0 (the writer); its :class:`DivekitError` stops every rank (the others
    with an empty message: rank 0 says why), instead of leaving them waiting in a collective."""
    from divekit.engine import distributed as D

    env = D.current_env()
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except DivekitError as e:
            error = e
    failed = D.broadcast_object(error is not None) if env.enabled else error is not None
    if error is not None:
        raise error
    if failed:
        from divekit.engine.launch import WorkersFailed

        raise WorkersFailed("")
    return result


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
    values.update({k: False for k in _NOT_CARRIED if k in values})
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
        for attempt in (1, 2):  # a writer may prune the checkpoint just named: read again
            path = run.latest_weights()
            try:
                load_weights(model, path, what=f"the model built from {run_dir / CONFIG}")
                break
            except DivekitError:
                if attempt == 2 or path.is_file():
                    raise
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
    """The run's task's inference on ``inputs`` (image files, sentences). An option the task's
    ``predict`` does not take is refused in one line before anything is loaded (``threshold``
    for a classifier), as on the command line."""
    import inspect

    from divekit.config import refuse_unused
    from divekit.engine.task import task_class

    task = str(read_record(run_dir).get("task", "classify"))
    takes = [name for name, p in inspect.signature(task_class(task).predict).parameters.items()
             if p.kind is p.KEYWORD_ONLY]
    refuse_unused(options, task_class(task).predict, f"a {task} run", takes)
    run = load_run(run_dir, device)
    assert run.task is not None and run.model is not None
    return run.task.predict(run.model, inputs, **options)
