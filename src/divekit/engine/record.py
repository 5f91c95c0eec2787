"""A run directory's record: choosing the directory, writing and reading ``config.json``
(checked before anything is built from it), and the resume guard that compares a resume's
options with the run's (:func:`resume_changes`). Part of the run lifecycle of
:mod:`divekit.engine.run`, which uses these names (import them from here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from divekit import __version__
from divekit.config import flag_name, known_values
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.task import Task, task_for
from divekit.errors import DivekitError
from divekit.io import atomic_write_json

CONFIG = "config.json"
# saved options a resume never takes over from config.json: it decides them anew each time
_NOT_CARRIED = ("force_resume",)
# saved options that name code to import (MODULE:CLASS): a run's files are data, never code, so
# a resume takes these only from what is typed now (saved_options)
_NAMES_CODE = ("callbacks",)

log = logging.getLogger("divekit")


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


def reopen_values(config_cls: type, record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config values a run is reopened with (``evaluate``, ``predict``): the saved
    options ``config_cls`` knows, as a fresh run that writes nowhere (no ``resume``, no
    ``out``), without the options decided anew each time and never with code named in the
    run's files. A saved value of the wrong type is refused in one line."""
    values = {**known_values(config_cls, record["config"]), "resume": False, "out": None}
    values.update({k: False for k in _NOT_CARRIED if k in values})
    values.update({k: None for k in _NAMES_CODE if k in values})  # code is never taken from a run
    wrong = _config_type_errors(config_cls, values)
    if wrong:
        raise DivekitError(f"{run_dir / CONFIG}: config {'; '.join(wrong[:3])}")
    return values


# config values that say where things were on the machine that trained the run (the folder of
# its data files, a word list read once): checked where they are read again, not on reopening;
# and a strategy's own options, which only training reads: a run recorded before these were
# refused with another strategy (--staleness with ddp) still opens
_PLACES = ("data_dir", "add_tokens", "staleness", "stages", "microbatches", "pipeline_schedule",
           "tp")
# a record's lists of output names, one per class or label the model predicts
_NAMES = ("classes", "labels")


def check_reopened(config: Any, task: type[Task], record: dict[str, Any], run_dir: Path) -> None:
    """Refuse a reopened run (``evaluate``, ``predict``, ...) whose ``config.json`` values the
    command line would refuse: the config's own ``checks()`` (its ranges, its dataset's kind;
    the places in :data:`_PLACES` aside), a ``model`` of the zoo that another task trains (a
    foreign model would be built and fed what it cannot read), and class or label names
    (``classes``, ``labels``) that are not distinct non-empty strings (a prediction would name
    two classes alike). One line naming the file, the key and the check's message; a tampered
    ``max_len -5`` was used as is before."""
    path = run_dir / CONFIG
    for key in _NAMES:
        names = record.get(key)
        if not isinstance(names, list):
            continue  # absent, or of a type check_record refuses for the task that needs it
        bad = next((n for n in names if not isinstance(n, str) or not n.strip()), None)
        if bad is not None:
            raise DivekitError(f"{path}: {key} must be non-empty strings, got {bad!r}")
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise DivekitError(f"{path}: {key} name {twice!r} twice")
    model = getattr(config, "model", None)
    if isinstance(model, str) and model:
        try:
            owner: type[Task] | None = task_for(model)
        except DivekitError:  # not a zoo model (BERT fine-tuning's "bert"): the task's to judge
            owner = None
        if owner is not None and not issubclass(task, owner) and not issubclass(owner, task):
            raise DivekitError(f"{path}: config 'model': model {model!r} is a {owner.name} "
                               f"model, not one a {task.name} run holds")
    wrong = _failed_checks(_without_places(config))
    if wrong:
        key = _key_of(config, wrong[0])
        raise DivekitError(f"{path}: config {key!r}: {wrong[0]}" if key else f"{path}: {wrong[0]}")


def _without_places(config: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: fields[k].default for k in _PLACES if k in fields
                                          and fields[k].default is not dataclasses.MISSING})


def _failed_checks(config: Any) -> list[str]:
    """The messages of ``config``'s failing checks (``validate()``'s first, when it has no
    ``checks()``); a check that raises on a tampered value fails with its message."""
    try:
        if hasattr(config, "checks"):
            return [message for ok, message in config.checks() if not ok]
        if hasattr(config, "validate"):
            config.validate()
        return []
    except DivekitError as e:
        return [str(e)]
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        return [f"a value its checks cannot read ({type(e).__name__}: {e})"]


def _key_of(config: Any, message: str) -> str | None:
    """The config key a failed check's ``message`` is about: the first field (those its
    ``--flags`` name first) whose default, in place of its value, makes the check pass; else
    the first field it names (``--mixup and --cutmix take α ≥ 0`` is about the one that is
    negative)."""
    import re

    fields = {f.name: f for f in dataclasses.fields(config)}
    named = [n for n in (flag[2:].replace("-", "_")
                         for flag in re.findall(r"--[a-z][a-z0-9-]*", message)) if n in fields]
    for name in dict.fromkeys([*named, *fields]):
        f = fields[name]
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if default is None and f.default is dataclasses.MISSING or getattr(config, name) == default:
            continue
        try:
            if message not in _failed_checks(dataclasses.replace(config, **{name: default})):
                return name
        except (TypeError, ValueError, DivekitError):
            continue
    return named[0] if named else None


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
    return {**saved_options(config_cls, saved, typed, run_dir), **typed, "out": str(run_dir),
            "resume": True}


def saved_options(config_cls: type, saved: dict[str, Any], typed: dict[str, Any],
                  run_dir: str | Path) -> dict[str, Any]:
    """The options a resume takes over from a run's ``config.json`` config (``saved``), to go
    under what was ``typed`` now: the fields of ``config_cls``, less those each resume decides
    anew (``--force-resume``) and those that name code (``--callbacks``). Every resume path
    (``train``, ``finetune``, ``finetune --task``, the Python API) goes through here.

    Nothing in a run directory is imported: a copied or downloaded run would otherwise run any
    importable module. A run saved with callbacks that are not typed again is refused in one
    line naming them (its training would otherwise go on without them unnoticed)."""
    for key in _NAMES_CODE:
        stored = saved.get(key)
        if stored not in (None, "", [], {}) and key not in typed:
            shown = repr(stored)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            flag = flag_name(key)
            raise DivekitError(
                f"{run_dir} was trained with {flag} {shown}, and a resume never imports code "
                f"named in a run's files: type {flag} again to use them (only code you trust), "
                f"or {flag} '' to continue without")
    skip = (*_NOT_CARRIED, *_NAMES_CODE)
    return {k: v for k, v in known_values(config_cls, saved).items() if k not in skip}


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


def check_resume(run_dir: Path, config: Any) -> list[dict[str, Any]]:
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
