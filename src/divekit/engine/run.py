"""The run lifecycle, once for every task: a run directory is chosen, its config recorded,
trained into, and opened again by every command that uses it.

A run directory holds::

    config.json        {"task", "divekit_version", "command", "config", ...task.run_record()}
    metrics.csv        one row per epoch            (callbacks)
    curves.png                                      (callbacks)
    checkpoint/        epoch-NNNN/{model.safetensors, state.pt}, latest   (engine.checkpoint)
    ...                the task's extra files (vocabularies) and pictures

``train(task)`` creates one (also from a config or a dict of options: the one training
function, which :mod:`divekit.tasks` offers as ``divekit.tasks.train``), ``load_task(run_dir)``
rebuilds its task, ``load_run(run_dir)`` gives back the task (rebuilt from the record,
without loading training data) and the model with its newest weights, and ``evaluate(run_dir)``
runs the Trainer's validation loop on it. ``divekit evaluate``, ``predict``, ``generate``,
``translate``, ``finetune`` and ``--resume`` all go through here.

A run has one writer: ``train`` holds the run directory's lock (:mod:`divekit.engine.lock`) from
choosing the directory to its last checkpoint; readers take no lock. ``--resume`` continues the
run that config.json describes: an option that changes what the run learns (``--seed``,
``--lr``, ...) is refused with the list of differences unless ``--force-resume`` is given, and
then recorded in config.json as ``forced_changes``
(:func:`divekit.engine.record.resume_changes`).

Where the pieces live: the record (``config.json``: choosing the directory, reading, checking,
the resume guard) is :mod:`divekit.engine.record`'s; :class:`~divekit.engine.task.Run` and
:class:`~divekit.engine.task.TrainResult` sit beside :class:`~divekit.engine.task.Task`, so the
Trainer, below this module, builds its ``Run`` without importing it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from divekit.config import config_from_dict
from divekit.engine import distributed as D
from divekit.engine.checkpoint import load_weights
from divekit.engine.lock import LOCK_FILE, RunLock
from divekit.engine.record import (
    CONFIG,
    check_record,
    check_reopened,
    check_resume,
    choose_run_dir,
    read_record,
    reopen_values,
    resume_values,
    write_record,
)
from divekit.engine.task import Run, Task, TrainResult, task_class, task_for
from divekit.engine.trainer import Trainer, run_validation, scalar_metrics
from divekit.errors import DivekitError

if TYPE_CHECKING:
    from divekit.engine.callbacks import Callback


log = logging.getLogger("divekit")


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
def train(task: Task | Any, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train ``task`` in a run directory chosen from its config (``out``, ``resume``).

    ``task`` is a :class:`Task`, or the config dataclass of the model's task, or a dict of
    options (``model`` and ``data`` at least) that :func:`make_config` completes with the
    model's recipe (and, with ``resume``, the run's own options); the task that trains the
    model is then built from it (:func:`~divekit.engine.task.task_for`).

    The run directory is locked for the whole call (:class:`~divekit.engine.lock.RunLock`, on
    the process that writes: rank 0 under data parallelism): a second writer is refused in one
    line naming this process. Under the lock the choice is checked again (another writer may
    have finished a run there meanwhile), and a resume is checked against the run's options
    (:func:`~divekit.engine.record.resume_changes`)."""
    if not isinstance(task, Task):
        if isinstance(task, dict):
            task = make_config(task_for(task.get("model") or "").Config, task)
        task = task_for(task.model)(task)
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
    return check_resume(run_dir, cfg) if cfg.resume else []


def _on_main(fn: Any) -> Any:
    """``fn()`` on rank 0 (the writer); its :class:`DivekitError` stops every rank (the others
    with an empty message: rank 0 says why), instead of leaving them waiting in a collective."""
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
def load_task(run_dir: str | Path, **overrides: Any) -> Task:
    """The task of a run, rebuilt from its record (config fields in ``overrides`` replaced),
    without its extra files, data or model: what the commands need to read the run's results
    (:meth:`~divekit.engine.task.Task.format_metrics`)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    cls = task_class(str(record.get("task", "classify")))
    # a task's facts in the record (classes, vocabulary sizes): class attribute record_keys,
    # name → type, checked here so a bad record is one line and not a KeyError later
    check_record(record, getattr(cls, "record_keys", None) or {}, run_dir / CONFIG)
    values = reopen_values(cls.Config, record, run_dir)
    try:
        config = config_from_dict(cls.Config, {**values, **overrides})
    except TypeError as e:
        raise DivekitError(f"{run_dir / CONFIG} does not fit {cls.__name__}: {e}") from None
    check_reopened(config, cls, record, run_dir)  # ranges, model, names: as the CLI's
    try:
        return cls(config, record=record)
    except DivekitError as e:  # built from the record alone: say which file (a bogus model)
        if str(run_dir / CONFIG) not in str(e):
            e.args = (f"{run_dir / CONFIG}: {e}", *e.args[1:])  # the same class, its message
        raise


def load_run(run_dir: str | Path, device: str = "cpu", *, weights: bool = True,
             **overrides: Any) -> Run:
    """Open a run: its record, the task rebuilt from it (config fields in ``overrides``
    replaced, such as ``data_dir``), its extra files, and the model with the newest weights
    (``weights=False``: freshly initialised) in eval mode on ``device``."""
    from divekit.engine.device import resolve_device

    run_dir = Path(run_dir)
    task = load_task(run_dir, **overrides)
    task.load_extras(run_dir)
    run = Run(run_dir, task.config, task.record, task)
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


def _quantized(run: Run, quantize: str) -> None:
    """Replace ``run.model`` by its dynamic int8 form (``--quantize int8``)."""
    if quantize in (None, "none"):
        return
    from divekit.engine.quantize import QUANTIZE_CHOICES, quantize_dynamic_int8

    if quantize not in QUANTIZE_CHOICES:
        raise DivekitError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, "
                           f"got {quantize!r}")
    assert run.model is not None
    run.model = quantize_dynamic_int8(run.model, str(run.record.get("task", "classify")))


def _refuse_compile_quantize(compile: bool | None, quantize: str) -> None:
    if compile and quantize not in (None, "none"):
        raise DivekitError(f"--compile does not go with --quantize {quantize}: the dynamically "
                           "quantized layers run their own int8 kernels; drop one of them")


def _compiled(run: Run, compile: bool | None, quantize: str, default: bool) -> None:
    """``--compile``: compile ``run.model`` in place (:mod:`divekit.engine.compile`); ``None``
    (neither --compile nor --no-compile typed) is ``default``."""
    _refuse_compile_quantize(compile, quantize)
    if not (default if compile is None else compile) or quantize not in (None, "none"):
        return  # (the family's default gives way to --quantize)
    from divekit.engine.compile import compile_model

    assert run.model is not None
    compile_model(run.model)


def evaluate(run_dir: str | Path, *, device: str = "auto", quantize: str = "none",
             compile: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """The validation metrics of a run's newest checkpoint, through the Trainer's validation
    loop, plus what the task's ``on_evaluate`` adds (reports written into the run);
    ``quantize="int8"``: of its dynamic int8 form (CPU); ``compile=True``: through
    ``torch.compile`` (None: the model family's default, as ``train``'s)."""
    from divekit.engine.compile import family_default
    from divekit.engine.device import module_device

    _refuse_compile_quantize(compile, quantize)
    if quantize == "int8" and device == "auto":
        device = "cpu"  # the int8 kernels are the CPU's
    run = load_run(run_dir, device, **overrides)
    _quantized(run, quantize)
    assert run.task is not None
    _compiled(run, compile, quantize, family_default(str(getattr(run.task.config, "model", ""))))
    assert run.task is not None and run.model is not None
    loader = run.task.val_data()
    if loader is None:
        raise DivekitError(f"{run_dir}: this run's data has no validation split")
    model_device = module_device(run.model)  # (an int8 one-hot RNN LM has no parameters left)
    metrics = run_validation(run.task, run.model, loader, model_device)
    extra = run.task.on_evaluate(run.model, run, metrics)
    return {**scalar_metrics(metrics), **extra}


def predict(run_dir: str | Path, inputs: list[Any], *, device: str = "auto",
            quantize: str = "none", compile: bool = False,
            **options: Any) -> list[dict[str, Any]]:
    """The run's task's inference on ``inputs`` (image files, sentences). An option the task's
    ``predict`` does not take is refused in one line before anything is loaded (``threshold``
    for a classifier), naming the options it takes (its :attr:`Task.PredictConfig`'s, those
    of the command line), as on the command line. ``compile=True`` runs the model through
    ``torch.compile`` (off by default: for a few inputs compiling costs more than it saves)."""
    import inspect

    from divekit.config import refuse_unused

    task = str(read_record(run_dir).get("task", "classify"))
    cls = task_class(task)
    takes = ([f.name for f in dataclasses.fields(cls.PredictConfig)] if cls.PredictConfig else
             [name for name, p in inspect.signature(cls.predict).parameters.items()
              if p.kind is p.KEYWORD_ONLY])
    refuse_unused(options, cls.predict, f"a {task} run", takes)
    _refuse_compile_quantize(compile, quantize)
    if quantize == "int8" and device == "auto":
        device = "cpu"  # the int8 kernels are the CPU's
    run = load_run(run_dir, device)
    _quantized(run, quantize)
    _compiled(run, compile, quantize, False)  # a few inputs: compiling would cost more
    assert run.task is not None and run.model is not None
    return run.task.predict(run.model, inputs, **options)
