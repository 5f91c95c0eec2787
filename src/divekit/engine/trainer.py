"""The training loop every task uses.

The Trainer owns devices, AMP, gradient clipping, the optimizer and schedule, checkpoints,
logging and curves; a :class:`Task` owns what a batch means.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from divekit.engine import distributed as D
from divekit.engine.callbacks import ProgressBar, TensorBoardLogger, write_csv
from divekit.engine.checkpoint import (
    CheckpointDir,
    load_weights,
    plain_cpu,
    rng_state,
    set_rng_state,
)
from divekit.engine.device import autocast, to_device
from divekit.engine.optim import build_optimizer, build_scheduler
from divekit.engine.strategies import STRATEGIES, make_strategy
from divekit.errors import DivekitError, TrainingDiverged
from divekit.io import atomic_write_json


@runtime_checkable
class Task(Protocol):
    """The seam between a job (classification, detection, ...) and the loop.

    Optional methods the Trainer calls when a task has them:
    ``param_groups(model)`` (per-group learning rates), ``batch_size(batch)`` (samples in a
    batch, default ``len(batch[0])``), ``on_epoch_start(model, epoch)`` (e.g. reset a hidden
    state), ``summarize(row)`` (derived metrics such as perplexity = exp(loss), added to the
    epoch's row), ``on_epoch_end(model, epoch, run_dir)`` (pictures of the job).

    A task that keeps state of its own between steps (a carried hidden state) makes resume
    exact with ``checkpoint_state()`` and ``restore_checkpoint_state(model, state)``. Every
    checkpoint stores what ``checkpoint_state()`` returns — ``None``, or tensors, numbers and
    strings in dicts, lists and tuples (copied to the CPU; the file loads with
    ``weights_only=True``) — once per rank, in rank order. Resuming gives each rank its own
    entry back (on the CPU: move it to ``model``'s device) at the point it was taken: after
    ``on_epoch_start`` and the loader's skip for a mid-epoch checkpoint, before the next epoch's
    ``on_epoch_start`` for an epoch-end one. It is not called when the checkpoint has no entry
    (written before the task had the methods) or was written by another number of workers.

    ``step`` returns the *mean* loss over its batch: under data parallelism the Trainer weights
    it by the batch's share of the global batch (see :mod:`divekit.engine.strategies`), and
    ``train_data()`` must then be shardable (``shard(rank, world_size)``, as
    :class:`~divekit.data.loader.TensorBatchLoader`). Only rank 0 runs ``evaluate`` and
    ``on_epoch_end``.
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
    channels_last: bool | None = option(
        None, "channels_last (NHWC) memory format; default: on for models with 2-D convolutions, "
        "where oneDNN and cuDNN run faster in it")
    seed: int = option(0, "random seed (data split, shuffling, initialisation)")
    threads: int | None = option(None, "CPU threads for PyTorch (default: PyTorch's choice)")
    quiet: bool = option(False, "no progress bars")
    tensorboard: bool = option(False, "also write TensorBoard event files")
    checkpoint_every: int | None = option(
        None, "also checkpoint every K optimizer steps (mid-epoch; resumes exactly)", metavar="K"
    )
    # data parallelism (see divekit.engine.strategies and the README)
    nproc: int = option(
        1, "worker processes on this machine; N > 1 launches them through torch.distributed.run "
        "(like `torchrun --nproc-per-node N`); --batch-size stays per worker", metavar="N",
    )
    strategy: str = option(
        "ddp", "how workers combine gradients: ddp (DistributedDataParallel), allreduce "
        "(divekit's ring all-reduce) or ps (parameter server on rank 0)", choices=list(STRATEGIES),
    )
    scale_lr: str = option(
        "none", "linear: multiply --lr by the number of workers (pair it with --warmup-epochs)",
        choices=["none", "linear"],
    )
    sync_bn: bool = option(False, "BatchNorm statistics over the global batch (SyncBatchNorm; CUDA)")
    profile_comm: bool = option(False, "log the bytes each worker sends per step (metrics.csv)")
    max_restarts: int = option(
        0, "with --nproc: restart the workers up to N times after a failure, from the last "
        "checkpoint", metavar="N",
    )
    port: int | None = option(
        None, "with --nproc: rendezvous port on 127.0.0.1 (default: a free one)", metavar="PORT"
    )
    dist_timeout: float = option(
        300.0, "seconds to wait for the other processes (rendezvous, collectives) before failing",
        metavar="S",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(task, config, run_dir).fit(resume=False)`` → the per-epoch history.

    With a ``run_dir`` every epoch writes ``metrics.csv``, ``curves.png`` and a checkpoint
    (and every ``checkpoint_every`` steps a mid-epoch one); ``fit(resume=True)`` continues from
    the newest checkpoint to ``config.epochs`` and gives bit-identical weights to an
    uninterrupted run on the CPU.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its shard of every global
    batch with ``config.strategy``; only rank 0 evaluates and writes, and the logged training
    metrics are reduced over all ranks.
    """

    def __init__(self, task: Task, config: TrainConfig, run_dir: str | Path | None = None):
        self.task, self.config = task, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = D.worker_device(config.device, D.env_from_launcher())
        self.env, self._owns_group = D.init_process_group(self.device, config.dist_timeout)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.model = self._build_model()
        self.counter = D.CommCounter() if config.profile_comm else None
        self.strategy = make_strategy(config.strategy, self.model, self.env, self.counter)
        self.optimizer = self._build_optimizer()
        self.train_loader = task.train_data()
        self.val_loader = task.val_data()
        if self.env.enabled:
            self._shard(self.train_loader)
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
        self.epoch = 0  # completed epochs (the one running, inside an epoch)
        self.step_in_epoch = 0  # steps of the next epoch already done (mid-epoch resume)
        self.partial: dict[str, Any] | None = None
        self.task_resume: tuple[Any] | None = None  # (task state,) to restore mid-epoch
        self.checkpoints = CheckpointDir(self.run_dir) if self.run_dir else None

    def _build_model(self) -> nn.Module:
        cfg = self.config
        model = self.task.model()
        if cfg.sync_bn and self.env.enabled:
            if self.device.type != "cuda":
                raise DivekitError(
                    "--sync-bn needs CUDA: SyncBatchNorm has no CPU kernel (on the CPU each "
                    "worker normalizes over its own shard; drop --sync-bn)"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else any(isinstance(m, nn.Conv2d) for m in model.modules()))
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = (self.task.param_groups(self.model) if hasattr(self.task, "param_groups")
                  else self.model.parameters())
        optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr,
                                    weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        if cfg.scale_lr == "linear":  # Goyal et al.: k times the batch, k times the rate
            for group in optimizer.param_groups:
                group["lr"] *= self.env.world_size
        elif cfg.scale_lr != "none":
            raise DivekitError(f"--scale-lr must be none or linear, got {cfg.scale_lr!r}")
        return optimizer

    def _shard(self, loader: Any) -> None:
        if not hasattr(loader, "shard"):
            raise DivekitError(
                f"this task's training data ({type(loader).__name__}) cannot be sharded across "
                "processes; data parallelism needs a loader with shard(rank, world_size)"
            )
        loader.shard(self.env.rank, self.env.world_size)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    # ---------------------------------------------------------------- resume
    def restore(self) -> bool:
        """Load the newest checkpoint of ``run_dir``; False when there is none."""
        if self.checkpoints is None or (path := self.checkpoints.latest()) is None:
            return False
        load_weights(self.model, path / "model.safetensors")
        state = self.checkpoints.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng_ranks")
        set_rng_state(rngs[self.env.rank] if rngs and len(rngs) == self.env.world_size
                      else state["rng"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.partial = state.get("partial")
        saved_world = int(state.get("world_size", 1))
        if self.step_in_epoch and saved_world != self.env.world_size:
            raise DivekitError(
                f"{path.name} stopped mid-epoch with {saved_world} worker(s); resume it with "
                f"the same number, not {self.env.world_size}"
            )
        self.history = [dict(row) for row in state["history"]]
        self._restore_task(state.get("task_state"))
        return True

    def _restore_task(self, entries: Any) -> None:
        """Give the task its rank's entry back (see :class:`Task`): now at an epoch boundary,
        in :meth:`_train_epoch` after ``on_epoch_start`` when the checkpoint is mid-epoch."""
        self.task_resume = None
        if (not hasattr(self.task, "restore_checkpoint_state") or not isinstance(entries, list)
                or len(entries) != self.env.world_size):
            return
        if self.step_in_epoch:
            self.task_resume = (entries[self.env.rank],)
        else:
            self.task.restore_checkpoint_state(self.model, entries[self.env.rank])

    def _save(self, step_in_epoch: int = 0, partial: dict[str, Any] | None = None) -> None:
        """Checkpoint (rank 0 writes; every rank contributes its RNG and task state)."""
        if self.checkpoints is None:
            return
        has_task_state = hasattr(self.task, "checkpoint_state")
        mine = None
        if has_task_state:
            what = f"{type(self.task).__name__}.checkpoint_state()"
            mine = plain_cpu(self.task.checkpoint_state(), what)
        rngs, task_states = None, [mine]
        if self.env.enabled:
            ranks = D.all_gather_object((rng_state(), mine))
            rngs, task_states = [r for r, _ in ranks], [t for _, t in ranks]
        if not self.is_main:
            return
        done = self.epoch - 1 if step_in_epoch else self.epoch
        state = {
            "epoch": done,
            "global_step": self.global_step,
            "step_in_epoch": step_in_epoch,
            "world_size": self.env.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
        }
        if rngs is not None:
            state["rng_ranks"] = rngs
        if has_task_state:
            state["task_state"] = task_states
        if partial is not None:
            state["partial"] = partial
        name = f"epoch-{done:04d}" + (f"-step-{step_in_epoch:06d}" if step_in_epoch else "")
        self.checkpoints.save(self.model, state, name=name)

    def _record_scaling(self) -> None:
        """World size, per-worker and global batch and the learning rate, into config.json."""
        assert self.run_dir is not None
        per_worker = getattr(self.train_loader, "batch_size", getattr(self.config, "batch_size", None))
        info = {
            "world_size": self.env.world_size,
            "strategy": self.config.strategy if self.env.enabled else "none",
            "backend": D.backend_for(self.device) if self.env.enabled else None,
            "batch_size_per_worker": per_worker,
            "global_batch_size": per_worker * self.env.world_size if per_worker else None,
            "lr": self.config.lr,
            "effective_lr": float(self.optimizer.param_groups[0].get("initial_lr",
                                  self.optimizer.param_groups[0]["lr"])),
        }
        path = self.run_dir / "config.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record["distributed"] = info
        atomic_write_json(path, record)

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        cfg = self.config
        if resume and not self.restore():
            raise DivekitError(f"nothing to resume: no checkpoint in {self.run_dir}")
        if self.epoch >= cfg.epochs and not self.step_in_epoch and not cfg.quiet and self.is_main:
            print(f"already trained for {self.epoch} epochs (--epochs {cfg.epochs}); nothing to do")
        writes = self.run_dir is not None and self.is_main
        if writes:
            self._record_scaling()
        tb = TensorBoardLogger(self.run_dir / "tensorboard") if cfg.tensorboard and writes else None
        progress = ProgressBar(enabled=not cfg.quiet and self.is_main)
        try:
            while self.epoch < cfg.epochs:
                self.epoch += 1
                row = self._train_epoch(progress)
                row.update(self._validate())
                if hasattr(self.task, "summarize"):
                    row = self.task.summarize(row)
                row["lr"] = float(self.optimizer.param_groups[0]["lr"])
                row["samples_per_s"] = row.pop("samples_per_s")  # column order of metrics.csv
                row["seconds"] = time.perf_counter() - row.pop("_t0")
                row.update(row.pop("_comm", {}))
                self.history.append(row)
                progress.end_epoch(row)
                self._save()
                if writes:
                    self._write_logs()
                if tb is not None:
                    tb.log(row)
        finally:
            if tb is not None:
                tb.close()
            if self._owns_group:
                D.destroy_process_group()
                self._owns_group = False
        return self.history

    def _write_logs(self) -> None:
        assert self.run_dir is not None
        write_csv(self.run_dir / "metrics.csv", self.history)
        from divekit.viz import plot_curves

        plot_curves(self.history, self.run_dir / "curves.png")
        if hasattr(self.task, "on_epoch_end"):
            self.task.on_epoch_end(self.model, self.epoch, self.run_dir)

    def _validate(self) -> dict[str, float]:
        """Rank 0 evaluates the whole validation set (any metric stays exact); others wait."""
        if self.val_loader is None:
            return {}
        val: dict[str, float] = {}
        if self.is_main:
            with autocast(self.device, self.config.amp):
                val = {f"val_{k}": float(v) for k, v in
                       self.task.evaluate(self.model, self.val_loader).items()}
        return D.broadcast_object(val) if self.env.enabled else val

    def _train_epoch(self, progress: ProgressBar) -> dict[str, Any]:
        cfg, task, loader = self.config, self.task, self.train_loader
        start, partial = self.step_in_epoch, self.partial or {}
        self.step_in_epoch, self.partial = 0, None
        t0 = time.perf_counter() - float(partial.get("seconds", 0.0))
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        batches: Iterable = loader
        if start:
            if hasattr(loader, "skip_batches"):
                loader.skip_batches(start)
            else:  # a plain deterministic loader: consume the batches already trained on
                import itertools

                batches = itertools.islice(iter(loader), start, None)
        self.strategy.train_model.train()
        if hasattr(task, "on_epoch_start"):
            task.on_epoch_start(self.model, self.epoch)
        if self.task_resume is not None:  # a mid-epoch checkpoint's task state, where it was taken
            task.restore_checkpoint_state(self.model, self.task_resume[0])  # type: ignore[attr-defined]
            self.task_resume = None
        sums, seen = self._partial_sums(partial)
        if self.counter is not None:
            self.counter.reset()
        progress.start_epoch(self.epoch, cfg.epochs, self.steps_per_epoch)
        progress.update(start, {})
        last_shown = start
        for i, batch in enumerate(batches, start=start):
            n, metrics = self._step(batch, i)
            seen += n
            for k, v in metrics.items():
                if n:
                    v = v.detach().float() * n
                    sums[k] = sums[k] + v if k in sums else v
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                    and i + 1 < self.steps_per_epoch:
                self._save_mid_epoch(i + 1, sums, seen, t0)
            _maybe_crash(self.global_step, self.env)
            if progress.enabled and (i + 1 - last_shown >= 10 or i + 1 == self.steps_per_epoch):
                rate = seen * self.env.world_size / max(time.perf_counter() - t0, 1e-9)
                shown = {k: (s / max(seen, 1)).item() for k, s in sums.items()}
                progress.update(i + 1 - last_shown, {**shown, "samples/s": round(rate)})
                last_shown = i + 1
        return self._epoch_row(sums, seen, t0)

    def _step(self, batch: Any, index: int) -> tuple[int, dict[str, Tensor]]:
        """One optimizer step on this rank's share of global batch ``index``."""
        cfg, task = self.config, self.task
        batch = to_device(batch, self.device, self.channels_last)
        n = task.batch_size(batch) if hasattr(task, "batch_size") else len(batch[0])
        self.strategy.before_forward()
        with autocast(self.device, cfg.amp):
            loss, metrics = task.step(self.strategy.train_model, batch)
        if n and not torch.isfinite(loss.detach()):
            raise self._diverged(loss, index)
        if self.env.enabled:
            # L_r · n_r · W / m: the workers' average gradient is the global batch's (strategies.py)
            m = self.train_loader.global_batch_size(index)  # type: ignore[attr-defined]
            loss = loss * (n * self.env.world_size / m)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.reduce_gradients()
        if self.strategy.updates_here:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        self.strategy.after_update()
        with warnings.catch_warnings():  # a ps worker never calls optimizer.step() itself
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.global_step += 1
        if self.counter is not None:
            self.counter.steps += 1
        return n, metrics

    def _partial_sums(self, partial: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
        """The metric sums of a resumed epoch: rank 0 carries the saved global sums."""
        saved = partial.get("sums", {})
        keep = self.is_main
        sums = {k: (v if keep else torch.zeros_like(v)).to(self.device) for k, v in saved.items()}
        return sums, int(partial.get("seen", 0)) if keep else 0

    def _global_sums(self, sums: dict[str, Tensor], seen: int) -> tuple[dict[str, Tensor], int]:
        if not self.env.enabled:
            return sums, seen
        keys = sorted(sums)
        packed = torch.stack([torch.tensor(float(seen), device=self.device, dtype=torch.float64)]
                             + [sums[k].double() for k in keys])
        total = D.all_reduce_sum(packed)
        return {k: total[j + 1].float() for j, k in enumerate(keys)}, int(round(total[0].item()))

    def _save_mid_epoch(self, step_in_epoch: int, sums: dict[str, Tensor], seen: int,
                        t0: float) -> None:
        if self.checkpoints is None:
            return
        total, count = self._global_sums(sums, seen)
        partial = {"sums": {k: v.detach().cpu() for k, v in total.items()}, "seen": count,
                   "seconds": time.perf_counter() - t0}
        self._save(step_in_epoch, partial)

    def _epoch_row(self, sums: dict[str, Tensor], seen: int, t0: float) -> dict[str, Any]:
        train_seconds = time.perf_counter() - t0
        sums, seen = self._global_sums(sums, seen)
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"train_{k}": (s / seen).item() for k, s in sums.items()})
        row["samples_per_s"] = seen / max(train_seconds, 1e-9)
        row["_t0"] = t0
        if self.counter is not None:
            row["_comm"] = self._comm_columns()
        return row

    def _comm_columns(self) -> dict[str, float]:
        """Mean and largest bytes sent per step over the workers, in MB (``--profile-comm``)."""
        assert self.counter is not None
        per_rank = D.all_gather_object(self.counter.per_step())
        return {"comm_MB_per_step": sum(per_rank) / len(per_rank) / 1e6,
                "comm_MB_per_step_max": max(per_rank) / 1e6}

    def _diverged(self, loss: Tensor, index: int) -> TrainingDiverged:
        value = loss.detach().float().item()
        latest = self.checkpoints.latest() if self.checkpoints else None
        kept = (
            f"the last good checkpoint ({latest.name}) is kept in {self.checkpoints.root}"
            if self.checkpoints and latest is not None
            else "no checkpoint was written yet"
        )
        what = "NaN" if math.isnan(value) else str(value)
        return TrainingDiverged(
            f"loss became {what} at epoch {self.epoch}, step {index + 1} "
            f"(global step {self.global_step + 1}); stopping: {kept}. "
            "Try a lower --lr or --grad-clip."
        )


def _maybe_crash(global_step: int, env: D.DistEnv) -> None:
    """Test hook for fault tolerance: ``DIVEKIT_CRASH_AT_STEP=K`` kills one worker after
    global step K, under torch.distributed's elastic agent and in its first attempt only
    (``TORCHELASTIC_RESTART_COUNT`` is 0), like a machine failure. ``DIVEKIT_CRASH_RANK`` picks
    the rank (default: the last)."""
    at = os.environ.get("DIVEKIT_CRASH_AT_STEP")
    if not at or global_step != int(at) or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
        return
    if env.rank == int(os.environ.get("DIVEKIT_CRASH_RANK", env.world_size - 1)):
        os.kill(os.getpid(), signal.SIGKILL)
