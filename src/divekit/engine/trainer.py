"""The training loop every task uses.

The Trainer owns devices, AMP, gradient clipping, the optimizer and schedule, checkpoints,
logging and curves; a :class:`Task` owns what a batch means.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from divekit.engine import distributed as D
from divekit.engine.callbacks import Callback, default_callbacks
from divekit.engine.checkpoint import (
    CheckpointDir,
    load_weights,
    plain_cpu,
    rng_state,
    set_rng_state,
)
from divekit.engine.compile import compile_model
from divekit.engine.compile import resolve as resolve_compile
from divekit.engine.config import TrainConfig
from divekit.engine.device import autocast, release_free_memory, to_device
from divekit.engine.launch import job_id
from divekit.engine.optim import build_optimizer, build_scheduler
from divekit.engine.strategies import make_strategy
from divekit.engine.task import Run, Task
from divekit.errors import DivekitError, TrainingDiverged
from divekit.io import atomic_write_json

log = logging.getLogger("divekit")

__all__ = ["Task", "TrainConfig", "Trainer", "run_validation", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """``Trainer(task, config, run_dir, callbacks=[...]).fit(resume=False)`` → the history.

    The Trainer owns the loop: devices, AMP, gradient clipping, the optimizer and schedule,
    distribution, the validation loop (:func:`run_validation`) and the callbacks
    (:mod:`divekit.engine.callbacks`: progress bar, checkpoints, metrics.csv, curves.png,
    TensorBoard). With a ``run_dir`` every epoch writes a checkpoint (and every
    ``checkpoint_every`` steps a mid-epoch one); ``fit(resume=True)`` continues from the newest
    checkpoint to ``config.epochs`` and gives bit-identical weights to an uninterrupted run on
    the CPU.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its shard of every global
    batch with ``config.strategy``; validation runs on each rank's shard of the validation data
    and the sums are added over the ranks (rank 0 validates alone when the data cannot be
    sharded); only rank 0 writes.
    """

    def __init__(self, task: Task, config: TrainConfig | None = None,
                 run_dir: str | Path | None = None, callbacks: list[Callback] | None = None):
        if not isinstance(task, Task):
            raise TypeError(f"Trainer needs a divekit.engine.task.Task, got {type(task).__name__}")
        config = config if config is not None else task.config
        config.validate()
        self.task, self.config = task, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run = Run(self.run_dir, config, task=task) if self.run_dir is not None else None
        self.callbacks = default_callbacks(config) + list(callbacks or [])
        self.device = D.worker_device(config.device, D.env_from_launcher())
        self.env, self._owns_group = D.init_process_group(self.device, config.dist_timeout)
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.model = self._build_model()
        if self.run is not None:
            self.run.model = self.model
        self.counter = D.CommCounter() if config.profile_comm else None
        self.strategy = make_strategy(config.strategy, self.model, self.env, self.counter, config)
        self.optimizer = self._build_optimizer()
        self.train_loader = task.train_data()
        self.val_loader = task.val_data()
        self.val_sharded = False
        if self.env.enabled and self.strategy.shards_data:
            self._shard(self.train_loader)
            if self.val_loader is not None and hasattr(self.val_loader, "shard"):
                self.val_loader.shard(self.env.rank, self.env.world_size)
                self.val_sharded = True
        self.steps_per_epoch = len(self.train_loader)  # type: ignore[arg-type]
        if self.steps_per_epoch == 0:
            raise DivekitError("the training data yields no batches (empty dataset?)")
        self.scheduler = build_scheduler(
            self.optimizer, config.scheduler,
            total_steps=config.epochs * self.steps_per_epoch,
            warmup_steps=round(config.warmup_epochs * self.steps_per_epoch),
        )
        self.strategy.attach(self)
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.epoch = 0  # completed epochs (the one running, inside an epoch)
        self.step_in_epoch = 0  # steps of the next epoch already done (mid-epoch resume)
        self.partial: dict[str, Any] | None = None
        self.task_resume: tuple[Any] | None = None  # (task state,) to restore mid-epoch
        self.checkpoints = CheckpointDir(self.run_dir) if self.run_dir else None
        # the running epoch's metric sums (weighted by batch size), samples and start time
        self.sums: dict[str, Tensor] = {}
        self.seen = 0
        self.t0 = 0.0

    def _build_model(self) -> nn.Module:
        cfg = self.config
        model = self.task.build_model()
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
        # --compile (engine/compile.py): in place, so self.model keeps its state_dict keys
        self.compiled = resolve_compile(cfg.compile, getattr(cfg, "model", ""), cfg.strategy)
        if self.compiled:
            compile_model(model, self.device)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        optimizer = build_optimizer(self.task.param_groups(self.model), cfg.optimizer, cfg.lr,
                                    weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        if cfg.scale_lr == "linear":  # Goyal et al.: k times the batch, k times the rate
            for group in optimizer.param_groups:
                group["lr"] *= self.env.world_size
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

    @property
    def writes(self) -> bool:
        """True on the process that writes the run directory's files (rank 0, with a run)."""
        return self.run_dir is not None and self.is_main

    # ---------------------------------------------------------------- resume
    def restore(self) -> bool:
        """Load the newest checkpoint of ``run_dir``; False when there is none."""
        if self.checkpoints is None or (path := self.checkpoints.latest()) is None:
            return False
        if self.strategy.sharded:  # every rank reads the whole model, then keeps its part
            from divekit.engine.checkpoint import read_weights

            self.strategy.load_full_state_dict(read_weights(path / "model.safetensors"))
        else:
            load_weights(self.model, path / "model.safetensors")
        state = self.checkpoints.load_state(path)
        fresh = [float(g.get("initial_lr", g["lr"])) for g in self.optimizer.param_groups]
        plan = getattr(self.scheduler, "plan", None)
        self.strategy.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._note_stretched_schedule(path.name, plan)
        self._apply_forced_lr(fresh, path.name)
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

    def _note_stretched_schedule(self, checkpoint: str, plan: dict[str, Any] | None) -> None:
        """A resume whose ``--epochs`` (or steps per epoch, or warm-up) differ from the plan of
        the schedule it loads: from here the schedule follows the new length (a cosine
        stretched, a step decay moved), so the run is not the one a straight run of --epochs
        would be. Said in one line naming the schedule and both lengths; ``none`` without
        warm-up has no plan to change. ``plan`` is the schedule built now (it is put back:
        the loaded state carries the checkpoint's)."""
        then = getattr(self.scheduler, "plan", None)
        if plan is None:
            return
        self.scheduler.plan = plan
        if not isinstance(then, dict) or then == plan:
            return  # an older checkpoint (no plan saved), or the same plan: nothing to say
        if plan["name"] == then.get("name") == "none" and not plan["warmup_steps"] \
                and not then.get("warmup_steps"):
            return
        log.warning("--resume from %s with --epochs %d: the %s learning-rate schedule was "
                    "planned over %s steps and is now planned over %d from step %d on, so this "
                    "run is not bit-identical to %d epochs run straight", checkpoint,
                    self.config.epochs, plan["name"], then.get("total_steps"),
                    plan["total_steps"], int(getattr(self.scheduler, "last_epoch", 0)),
                    self.config.epochs)

    def _apply_forced_lr(self, fresh: list[float], checkpoint: str) -> None:
        """``--resume --force-resume --lr X``: the loaded optimizer and scheduler state carry
        the run's old learning rates, which would otherwise win silently. Each param group's
        ``initial_lr`` and the scheduler's ``base_lrs`` become the ones built from the config
        now (``fresh``), and its ``lr`` keeps its place on the schedule (old lr × new base /
        old base); the change is logged (config.json's ``forced_changes`` holds the option).
        Without ``--force-resume`` the resume guard has already refused a different --lr."""
        groups = self.optimizer.param_groups
        if not getattr(self.config, "force_resume", False) or len(fresh) != len(groups):
            return
        old = [float(g.get("initial_lr", g["lr"])) for g in groups]
        if all(math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for a, b in zip(old, fresh)):
            return
        for group, base_then, base_now in zip(groups, old, fresh):
            group["lr"] = group["lr"] * base_now / base_then if base_then else base_now
            group["initial_lr"] = base_now
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = list(fresh)
            self.scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
        log.warning("--force-resume: learning rate %s -> %s from %s on (the schedule's place "
                    "kept)", _lrs(old), _lrs(fresh), checkpoint)

    def _restore_task(self, entries: Any) -> None:
        """Give the task its rank's entry back (see :class:`Task`): now at an epoch boundary,
        in :meth:`_train_epoch` after ``on_epoch_start`` when the checkpoint is mid-epoch."""
        self.task_resume = None
        if not isinstance(entries, list) or len(entries) != self.env.world_size:
            return
        if self.step_in_epoch:
            self.task_resume = (entries[self.env.rank],)
        else:
            self.task.restore_checkpoint_state(self.model, entries[self.env.rank])

    def save_checkpoint(self, step_in_epoch: int = 0) -> None:
        """Checkpoint now: at the end of epoch ``self.epoch``, or after ``step_in_epoch`` steps
        of it. Every rank calls it (each contributes its RNG and task state); rank 0 writes."""
        if self.checkpoints is None:
            return
        partial = None
        if step_in_epoch:
            total, count = self._global_sums(self.sums, self.seen)
            partial = {"sums": {k: v.detach().cpu() for k, v in total.items()}, "seen": count,
                       "seconds": time.perf_counter() - self.t0}
        what = f"{type(self.task).__name__}.checkpoint_state()"
        mine = plain_cpu(self.task.checkpoint_state(), what)
        rngs, task_states = None, [mine]
        if self.env.enabled:
            ranks = D.all_gather_object((rng_state(), mine))
            rngs, task_states = [r for r, _ in ranks], [t for _, t in ranks]
        weights = self.strategy.full_state_dict() if self.strategy.sharded else self.model
        optimizer_state = self.strategy.optimizer_state_dict(self.optimizer)
        if not self.is_main:
            return
        done = self.epoch - 1 if step_in_epoch else self.epoch
        state = {
            "epoch": done,
            "global_step": self.global_step,
            "step_in_epoch": step_in_epoch,
            "world_size": self.env.world_size,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "task_state": task_states,
        }
        if rngs is not None:
            state["rng_ranks"] = rngs
        if partial is not None:
            state["partial"] = partial
        name = f"epoch-{done:04d}" + (f"-step-{step_in_epoch:06d}" if step_in_epoch else "")
        self.checkpoints.save(weights, state, name=name)

    def _record_scaling(self) -> None:
        """World size, per-worker and global batch and the learning rate, into config.json."""
        assert self.run_dir is not None
        per_worker = getattr(self.train_loader, "batch_size", getattr(self.config, "batch_size", None))
        info = {
            "world_size": self.env.world_size,
            "job_id": job_id(),  # torchrun's --rdzv-id: a restarted node knows its run by it
            "strategy": self.config.strategy if self.env.enabled else "none",
            "backend": D.backend_for(self.device) if self.env.enabled else None,
            "batch_size_per_worker": per_worker,
            "global_batch_size": (per_worker * (self.env.world_size if self.strategy.shards_data
                                                else 1)) if per_worker else None,
            "lr": self.config.lr,
            "effective_lr": float(self.optimizer.param_groups[0].get("initial_lr",
                                  self.optimizer.param_groups[0]["lr"])),
        }
        path = self.run_dir / "config.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        record["distributed"] = info
        record["compiled"] = self.compiled  # --compile as this run used it (auto resolved)
        atomic_write_json(path, record)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    # ---------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        cfg = self.config
        if resume and not self.restore():
            raise DivekitError(f"nothing to resume: no checkpoint in {self.run_dir}")
        if self.writes:
            self._record_scaling()
        try:
            self._call("on_fit_start")
            while self.epoch < cfg.epochs:
                self.epoch += 1
                row = self._train_epoch()
                metrics = self.validate()
                self._call("on_validation_end", metrics)
                row.update(scalar_metrics(metrics, prefix="val_"))
                row = self.task.summarize(row)
                row["lr"] = float(self.optimizer.param_groups[0]["lr"])
                row["samples_per_s"] = row.pop("samples_per_s")  # column order of metrics.csv
                row["seconds"] = time.perf_counter() - self.t0
                row.update(row.pop("_comm", {}))
                bad = _non_finite_losses(row)
                if bad:  # before on_epoch_end: this epoch is neither checkpointed nor logged
                    raise self._diverged_at_epoch_end(bad)
                self.history.append(row)
                self._call("on_epoch_end", row)
                model = self._whole_model() if self.strategy.sharded else self.model
                if self.writes:
                    assert self.run is not None
                    self.task.on_epoch_end(model, self.epoch, self.run, metrics)
        finally:
            self._call("on_fit_end")
            if self._owns_group:
                D.destroy_process_group()
                self._owns_group = False
        return self.history

    def _whole_model(self) -> nn.Module | None:
        """The whole model as one plain module on rank 0 (None elsewhere), gathered from a
        sharded strategy's ranks: what the task's end-of-epoch files are written from."""
        state = self.strategy.full_state_dict()
        if not self.is_main:
            return None
        model = self.task.build_model()
        model.load_state_dict(state)
        return model.to(self.device)

    def validate(self) -> dict[str, Any]:
        """The task's validation metrics on the whole validation set ({} without one)."""
        if self.val_loader is None:
            return {}
        # the training steps' freed activations go back to the kernel first, so that the
        # validation batches' memory does not come on top of them (device.release_free_memory)
        release_free_memory()
        self.strategy.before_validation()
        if self.env.enabled and not self.strategy.shards_data:
            # model parallel: every rank holds part of the model and sees the whole batch, so
            # every rank runs the whole validation set together (and gets the same metrics)
            return run_validation(self.task, self.strategy.eval_model, self.val_loader,
                                  self.device, amp=self.config.amp,
                                  channels_last=self.channels_last)
        if self.val_sharded or not self.env.enabled:
            return run_validation(self.task, self.strategy.eval_model, self.val_loader, self.device,
                                  amp=self.config.amp, channels_last=self.channels_last,
                                  reduce=self.val_sharded)
        metrics: dict[str, Any] = {}
        if self.is_main:  # data that cannot be sharded: rank 0 validates, the others wait
            metrics = run_validation(self.task, self.strategy.eval_model, self.val_loader,
                                     self.device, amp=self.config.amp,
                                     channels_last=self.channels_last)
        return D.broadcast_object(metrics)

    def running_metrics(self) -> dict[str, float]:
        """The running epoch's mean training metrics so far, and samples per second."""
        seen = max(self.seen, 1)
        shown = {k: (s / seen).item() for k, s in self.sums.items()}
        rate = self.seen * self.env.world_size / max(time.perf_counter() - self.t0, 1e-9)
        return {**shown, "samples/s": round(rate)}

    def _train_epoch(self) -> dict[str, Any]:
        task, loader = self.task, self.train_loader
        start, partial = self.step_in_epoch, self.partial or {}
        self.partial = None
        self.t0 = time.perf_counter() - float(partial.get("seconds", 0.0))
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
        task.on_epoch_start(self.model, self.epoch)
        if self.task_resume is not None:  # a mid-epoch checkpoint's task state, where it was taken
            task.restore_checkpoint_state(self.model, self.task_resume[0])
            self.task_resume = None
        self.sums, self.seen = self._partial_sums(partial)
        if self.counter is not None:
            self.counter.reset()
        self._call("on_epoch_start", self.epoch)
        self.step_in_epoch = 0
        for i, batch in enumerate(batches, start=start):
            n, logs = self._step(batch, i)
            self.seen += n
            for k, v in logs.items():
                if n:
                    v = v.detach().float() * n
                    self.sums[k] = self.sums[k] + v if k in self.sums else v
            self._call("on_train_batch_end", i, logs)
        return self._epoch_row(self.sums, self.seen, self.t0)

    def _step(self, batch: Any, index: int) -> tuple[int, dict[str, Tensor]]:
        """One optimizer step on this rank's share of global batch ``index``."""
        cfg, task = self.config, self.task
        batch = to_device(batch, self.device, self.channels_last)
        n = task.batch_size(batch)
        self.strategy.before_forward()
        scale = 1.0
        if self.env.enabled and self.strategy.shards_data:
            # L_r · n_r · W / m: the workers' average gradient is the global batch's (strategies.py)
            m = self.train_loader.global_batch_size(index)  # type: ignore[attr-defined]
            scale = n * self.env.world_size / m
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.strategy.forward_backward(task, batch, scale,
                                                    autocast(self.device, cfg.amp))
        if n and not torch.isfinite(loss.detach()):
            raise self._diverged(loss, index)
        self.strategy.reduce_gradients()
        if self.strategy.updates_here:
            if cfg.grad_clip:
                self.strategy.clip_grad_norm_(cfg.grad_clip)
            self.optimizer.step()
        self.strategy.after_update()
        with warnings.catch_warnings():  # a ps worker never calls optimizer.step() itself
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.global_step += 1
        if self.counter is not None:
            self.counter.steps += 1
        return n, logs

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
        reduced = {k: total[j + 1].float() for j, k in enumerate(keys)}
        # packed in sorted order (the same on every rank), returned in the task's order, so
        # metrics.csv has one column order whatever the world size
        return {k: reduced[k] for k in sums}, int(round(total[0].item()))

    def _epoch_row(self, sums: dict[str, Tensor], seen: int, t0: float) -> dict[str, Any]:
        train_seconds = time.perf_counter() - t0
        sums, seen = self._global_sums(sums, seen)
        row: dict[str, Any] = {"epoch": self.epoch}
        row.update({f"train_{k}": (s / seen).item() for k, s in sums.items()})
        row["samples_per_s"] = seen / max(train_seconds, 1e-9)
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

    def _diverged_at_epoch_end(self, bad: dict[str, float]) -> TrainingDiverged:
        """A loss of the epoch's row (the training mean or the validation loss) is NaN or
        infinite: finite weights can still give non-finite outputs (a huge --lr). The epoch's
        checkpoint is not written; the last good one stays, and the mid-epoch checkpoints of
        this epoch (``--checkpoint-every``), which nothing validated, are removed."""
        dropped = self.checkpoints.discard_epoch(self.epoch) if self.writes and self.checkpoints \
            else 0
        latest = self.checkpoints.latest() if self.checkpoints else None
        kept = (
            f"the last good checkpoint ({latest.name}) is kept in {self.checkpoints.root}"
            if self.checkpoints and latest is not None
            else "no checkpoint was written yet"
        )
        shown = ", ".join(f"{k} {'NaN' if math.isnan(v) else v}" for k, v in bad.items())
        removed = (f" ({dropped} mid-epoch checkpoint(s) of epoch {self.epoch} removed: their "
                   "weights were never validated)" if dropped else "")
        return TrainingDiverged(
            f"{shown} at the end of epoch {self.epoch}; stopping without checkpointing it: "
            f"{kept}{removed}. Try a lower --lr or --grad-clip."
        )


def _lrs(values: list[float]) -> str:
    shown = sorted({f"{v:g}" for v in values})
    return shown[0] if len(shown) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _non_finite_losses(row: dict[str, Any]) -> dict[str, float]:
    """The losses of an epoch's row (``train_loss``, ``val_loss``, ``val_loss_box``...) that
    are NaN or infinite. Other metrics may be NaN by definition (a mean IoU with no class
    present) and are not judged."""
    return {k: float(v) for k, v in row.items()
            if k.startswith(("train_", "val_")) and "loss" in k
            and isinstance(v, int | float) and not math.isfinite(v)}


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers among validation ``metrics`` (plain numbers and one-element tensors) as
    floats, each name with ``prefix`` before it: what a log row and ``divekit evaluate`` show.
    Other values (predictions, confusion matrices) are left to the task's hooks."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, int | float) or (isinstance(v, Tensor) and v.numel() == 1)}


def _accumulate(sums: dict[str, Any], out: dict[str, Any]) -> None:
    """Tensors and numbers add up; lists join."""
    for k, v in out.items():
        if isinstance(v, list):
            sums.setdefault(k, []).extend(v)
        elif isinstance(v, Tensor):
            v = v.detach()
            sums[k] = sums[k] + v if k in sums else v.clone()
        else:
            sums[k] = sums.get(k, 0) + v


def _reduce_over_ranks(sums: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Add every rank's totals (tensors and numbers in one all-reduce) and join their lists."""
    keys = sorted(k for k, v in sums.items() if not isinstance(v, list))
    if keys:
        flat = [torch.as_tensor(sums[k], device=device, dtype=torch.float64).reshape(-1) for k in keys]
        total = D.all_reduce_sum(torch.cat(flat))
        offset = 0
        for k, part in zip(keys, flat):
            value = total[offset: offset + part.numel()]
            offset += part.numel()
            old = sums[k]
            sums[k] = (value.reshape(old.shape).to(old.dtype) if isinstance(old, Tensor)
                       else type(old)(value.item()))
    lists = sorted(k for k, v in sums.items() if isinstance(v, list))
    if lists:
        gathered = D.all_gather_object({k: sums[k] for k in lists})
        for k in lists:
            sums[k] = [item for part in gathered for item in part[k]]
    return sums


def run_validation(task: Task, model: nn.Module, loader: Iterable, device: torch.device, *,
                   amp: bool = False, channels_last: bool = False,
                   reduce: bool = False) -> dict[str, Any]:
    """The validation loop every task shares: eval mode, ``inference_mode``, AMP, device moves,
    the batches' sums (over the ranks too with ``reduce``), then ``task.validation_end``."""
    was_training = model.training
    model.eval()
    task.on_validation_start(model)
    sums: dict[str, Any] = {}
    try:
        with torch.inference_mode(), autocast(device, amp):
            for batch in loader:
                _accumulate(sums, task.validation_step(model, to_device(batch, device, channels_last)))
    finally:
        model.train(was_training)
    if reduce:
        sums = _reduce_over_ranks(sums, device)
    return task.validation_end(sums)
