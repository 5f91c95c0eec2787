"""The training loop every task uses.

The Trainer owns devices, AMP, gradient clipping, the optimizer and schedule, checkpoints,
logging and curves; a :class:`Task` owns what a batch means.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from divekit.engine.callbacks import ProgressBar, TensorBoardLogger, write_csv
from divekit.engine.checkpoint import CheckpointDir, load_weights, rng_state, set_rng_state
from divekit.engine.device import autocast, resolve_device, to_device
from divekit.engine.optim import build_optimizer, build_scheduler
from divekit.errors import DivekitError, TrainingDiverged


@runtime_checkable
class Task(Protocol):
    """The seam between a job (classification, detection, ...) and the loop.

    Optional methods the Trainer calls when a task has them:
    ``param_groups(model)`` (per-group learning rates), ``batch_size(batch)`` (samples in a
    batch, default ``len(batch[0])``), ``on_epoch_start(model, epoch)`` (e.g. reset a hidden
    state), ``summarize(row)`` (derived metrics such as perplexity = exp(loss), added to the
    epoch's row), ``on_epoch_end(model, epoch, run_dir)`` (pictures of the job).
    """

    def train_data(self) -> Iterable: ...
    def val_data(self) -> Iterable | None: ...
    def model(self) -> nn.Module: ...
    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]: ...
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]: ...


def option(default: Any, help: str, **extra: Any) -> Any:
    """A config field with the help text the CLI shows (``choices=``, ``metavar=``, ``cli=False``)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """What the loop needs; a task's config extends it with data and model options.

    Every field becomes a ``divekit train`` option (``grad_clip`` → ``--grad-clip``).
    """

    epochs: int = option(10, "total epochs (with --resume: the total to reach)")
    lr: float = option(0.05, "learning rate")
    optimizer: str = option("sgd", "optimizer", choices=["sgd", "adam", "adamw"])
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(0.0, "L2 weight decay")
    scheduler: str = option(
        "none", "learning-rate schedule", choices=["none", "cosine", "step", "onecycle"]
    )
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs")
    grad_clip: float | None = option(None, "clip the gradients' global norm to this value")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: bool = option(False, "bfloat16 mixed precision (autocast)")
    channels_last: bool = option(False, "channels_last memory format for convolutions")
    seed: int = option(0, "random seed (data split, shuffling, initialisation)")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    quiet: bool = option(False, "no progress bars")
    tensorboard: bool = option(False, "also write TensorBoard event files")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(task, config, run_dir).fit(resume=False)`` → the per-epoch history.

    With a ``run_dir`` every epoch writes ``metrics.csv``, ``curves.png`` and a checkpoint;
    ``fit(resume=True)`` continues from the newest checkpoint to ``config.epochs`` and gives
    bit-identical weights to an uninterrupted run on the CPU.
    """

    def __init__(self, task: Task, config: TrainConfig, run_dir: str | Path | None = None):
        self.task, self.config = task, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        model = task.model().to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        groups = task.param_groups(model) if hasattr(task, "param_groups") else model.parameters()
        self.optimizer = build_optimizer(
            groups, config.optimizer, config.lr,
            weight_decay=config.weight_decay, momentum=config.momentum,
        )
        self.train_loader = task.train_data()
        self.val_loader = task.val_data()
        self.steps_per_epoch = len(self.train_loader)  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise DivekitError("the training data yields no batches (empty dataset?)")
        self.scheduler = build_scheduler(
            self.optimizer, config.scheduler,
            total_steps=config.epochs * self.steps_per_epoch,
            warmup_steps=round(config.warmup_epochs * self.steps_per_epoch),
        )
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.epoch = 0
        self.checkpoints = CheckpointDir(self.run_dir) if self.run_dir else None

    # ---------------------------------------------------------------- resume
    def restore(self) -> bool:
        """Load the newest checkpoint of ``run_dir``; False when there is none."""
        if self.checkpoints is None or (path := self.checkpoints.latest()) is None:
            return False
        load_weights(self.model, path / "model.safetensors")
        state = self.checkpoints.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = [dict(row) for row in state["history"]]
        return True

    def _save(self) -> None:
        assert self.checkpoints is not None
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
        }
        self.checkpoints.save(self.model, state, name=f"epoch-{self.epoch:04d}")

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        cfg = self.config
        if resume and not self.restore():
            raise DivekitError(f"nothing to resume: no checkpoint in {self.run_dir}")
        if self.epoch >= cfg.epochs and not cfg.quiet:
            print(f"already trained for {self.epoch} epochs (--epochs {cfg.epochs}); nothing to do")
        tb = TensorBoardLogger(self.run_dir / "tensorboard") if cfg.tensorboard and self.run_dir else None
        progress = ProgressBar(enabled=not cfg.quiet)
        try:
            while self.epoch < cfg.epochs:
                self.epoch += 1
                row = self._train_epoch(progress)
                if self.val_loader is not None:
                    with autocast(self.device, cfg.amp):
                        val = self.task.evaluate(self.model, self.val_loader)
                    row.update({f"val_{k}": float(v) for k, v in val.items()})
                if hasattr(self.task, "summarize"):
                    row = self.task.summarize(row)
                row["lr"] = float(self.optimizer.param_groups[0]["lr"])
                row["samples_per_s"] = row.pop("samples_per_s")  # column order of metrics.csv
                row["seconds"] = time.perf_counter() - row.pop("_t0")
                self.history.append(row)
                progress.end_epoch(row)
                if self.run_dir is not None:
                    self._save()
                    write_csv(self.run_dir / "metrics.csv", self.history)
                    from divekit.viz import plot_curves

                    plot_curves(self.history, self.run_dir / "curves.png")
                    if hasattr(self.task, "on_epoch_end"):
                        self.task.on_epoch_end(self.model, self.epoch, self.run_dir)
                if tb is not None:
                    tb.log(row)
        finally:
            if tb is not None:
                tb.close()
        return self.history

    def _train_epoch(self, progress: ProgressBar) -> dict[str, Any]:
        cfg, model, task = self.config, self.model, self.task
        t0 = time.perf_counter()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(self.epoch)
        model.train()
        if hasattr(task, "on_epoch_start"):
            task.on_epoch_start(model, self.epoch)
        sums: dict[str, Tensor] = {}
        seen = 0
        progress.start_epoch(self.epoch, cfg.epochs, self.steps_per_epoch)
        last_shown = 0
        for i, batch in enumerate(self.train_loader):
            batch = to_device(batch, self.device, cfg.channels_last)
            with autocast(self.device, cfg.amp):
                loss, metrics = task.step(model, batch)
            if not torch.isfinite(loss.detach()):
                raise self._diverged(loss, i)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            n = task.batch_size(batch) if hasattr(task, "batch_size") else len(batch[0])
            seen += n
            for k, v in metrics.items():
                v = v.detach().float() * n
                sums[k] = sums[k] + v if k in sums else v
            if progress.enabled and (i + 1 - last_shown >= 10 or i + 1 == self.steps_per_epoch):
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                shown = {k: (s / seen).item() for k, s in sums.items()}
                progress.update(i + 1 - last_shown, {**shown, "samples/s": round(rate)})
                last_shown = i + 1
        train_seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"train_{k}": (s / seen).item() for k, s in sums.items()})
        row["samples_per_s"] = seen / max(train_seconds, 1e-9)
        row["_t0"] = t0
        return row

    def _diverged(self, loss: Tensor, index: int) -> TrainingDiverged:
        value = loss.detach().float().item()
        kept = (
            f"the last good checkpoint (epoch {self.epoch - 1}) is kept in {self.checkpoints.root}"
            if self.checkpoints and self.epoch > 1
            else "no checkpoint was written yet"
        )
        what = "NaN" if math.isnan(value) else str(value)
        return TrainingDiverged(
            f"loss became {what} at epoch {self.epoch}, step {index + 1} "
            f"(global step {self.global_step + 1}); stopping: {kept}. "
            "Try a lower --lr or --grad-clip."
        )

