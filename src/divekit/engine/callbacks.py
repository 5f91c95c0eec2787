"""Callbacks: everything the Trainer does besides the loop, as Lightning's ``Callback``.

A callback overrides any of the hooks below (each a no-op here); the Trainer calls them in list
order, on every rank (a callback that writes files checks ``trainer.writes``). The defaults,
:func:`default_callbacks`, are the progress bar, checkpoints, ``metrics.csv``, ``curves.png``
and TensorBoard; ``Trainer(callbacks=[...])`` (or ``--callbacks MODULE:CLASS``) appends more.

Order of the calls::

    on_fit_start(trainer)
    per epoch:  on_epoch_start(trainer, epoch)
                on_train_batch_end(trainer, index, logs)   after each optimizer step
                on_validation_end(trainer, metrics)        after the validation loop
                on_epoch_end(trainer, row)                 row: the epoch's metrics.csv row
    on_fit_end(trainer)                                    also after a failure
"""

from __future__ import annotations

import csv
import importlib
import io
import sys
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

# tqdm.auto draws a widget in Jupyter, but without ipywidgets it warns ("IProgress not found")
# on every import: then the plain text bar, which a notebook shows as well
if find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

from divekit.errors import DivekitError
from divekit.io import atomic_write_text

if TYPE_CHECKING:
    from pathlib import Path

    from divekit.engine.trainer import Trainer


class Callback:
    """Base class: override the hooks you need."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resume has restored the Trainer's state)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first training step of ``epoch`` (1-based)."""

    def on_train_batch_end(self, trainer: Trainer, index: int, logs: dict[str, Any]) -> None:
        """After the optimizer step on batch ``index`` (0-based within the epoch);
        ``trainer.global_step`` counts the steps so far. ``logs`` are the step's tensors."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After the validation loop, with the task's ``validation_end`` result."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After the epoch, with its log row (``trainer.history[-1]``)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """When ``fit`` returns or raises."""


class ProgressBar(Callback):
    """One tqdm bar per epoch on rank 0: running training metrics and samples per second."""

    def __init__(self, every: int = 10):
        self.every, self.bar, self.shown = every, None, 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if trainer.config.quiet or not trainer.is_main:
            return
        self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {epoch}/{trainer.config.epochs}",
                        unit="step", leave=True, dynamic_ncols=True, file=sys.stderr)
        self.shown = trainer.step_in_epoch
        self.bar.update(self.shown)

    def on_train_batch_end(self, trainer: Trainer, index: int, logs: dict[str, Any]) -> None:
        done = index + 1
        if self.bar is None or (done - self.shown < self.every and done != trainer.steps_per_epoch):
            return
        self.bar.update(done - self.shown)
        self.bar.set_postfix({k: _fmt(v) for k, v in trainer.running_metrics().items()},
                             refresh=False)
        self.shown = done

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in row.items()
                                  if k.startswith(("train_", "val_"))})
            self.bar.close()
            self.bar = None

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Checkpointer(Callback):
    """A checkpoint at the end of every epoch and, with ``every``, every K optimizer steps
    within one (not at its last step, which the epoch's own checkpoint covers)."""

    def __init__(self, every: int | None = None):
        self.every = every

    def on_train_batch_end(self, trainer: Trainer, index: int, logs: dict[str, Any]) -> None:
        if (self.every and trainer.global_step % self.every == 0
                and index + 1 < trainer.steps_per_epoch):
            trainer.save_checkpoint(step_in_epoch=index + 1)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        trainer.save_checkpoint()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole log atomically from the history (which the checkpoint also holds)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


class CSVLogger(Callback):
    """``metrics.csv``: one row per epoch, rewritten whole (so a resumed run's file is exact)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.writes:
            write_csv(trainer.run_dir / "metrics.csv", trainer.history)


class CurvePlotter(Callback):
    """``curves.png``: training and validation curves against the epoch."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.writes:
            from divekit.viz import plot_curves

            plot_curves(trainer.history, trainer.run_dir / "curves.png")


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard event files (``--tensorboard``) under ``RUN/tensorboard``."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.writes:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: --tensorboard needs the tensorboard package (pip install tensorboard);"
                  " continuing without it", file=sys.stderr)
            return
        self.writer = SummaryWriter(log_dir=str(trainer.run_dir / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(config: Any) -> list[Callback]:
    """Progress bar, checkpoints, metrics.csv, curves.png (and TensorBoard with
    ``config.tensorboard``), then the ``config.callbacks`` classes."""
    callbacks: list[Callback] = [ProgressBar(), Checkpointer(getattr(config, "checkpoint_every", None)),
                                 CSVLogger(), CurvePlotter()]
    if getattr(config, "tensorboard", False):
        callbacks.append(TensorBoardLogger())
    return callbacks + load_callbacks(getattr(config, "callbacks", None))


def load_callbacks(spec: str | None) -> list[Callback]:
    """``"pkg.mod:Class,other:Class"`` → instances (the user names code to run, as a plugin)."""
    out: list[Callback] = []
    for item in (s.strip() for s in (spec or "").split(",") if s.strip()):
        module, _, name = item.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise DivekitError(f"--callbacks: cannot load {item!r} (MODULE:CLASS): {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise DivekitError(f"--callbacks: {item!r} is not a divekit Callback class")
        out.append(cls())
    return out
