"""Asynchronous SGD: a parameter server without a barrier, bounded by ``--staleness K``.

Under ``ps`` every step ends in a barrier: no worker starts step ``c+1`` before the server has
averaged all ``W`` gradients of step ``c``, so the slowest worker sets everyone's pace. Under
``async`` the workers push gradients to the server and pull weights from it *without* waiting
for each other, within the bound of *stale-synchronous parallel* (SSP, Ho et al. 2013):

    a worker that has finished step ``c`` (its clock) may start step ``c+1`` only when the
    slowest worker has finished step ``c - K``.

``K = 0`` is the barrier again (exactly ``ps``); ``K = None`` (the default) is unbounded.
A fast worker thus runs up to ``K`` steps ahead, computing its gradients on weights that lack
the slow workers' most recent contributions; a short hiccup of one worker (a page fault, a
busy core, a slow disk read) no longer stalls the others. A worker that is slow *every* step
still sets the pace in the long run: nobody may get more than ``K`` steps ahead of it.

**What an update is.** The server keeps one gradient slot per worker for every clock ``c``.
When the ``W`` gradients of clock ``c`` have all arrived, it sums them in rank order, divides by
``W`` (the global batch's gradient, see :mod:`divekit.engine.strategies`), clips, and takes
*one* optimizer step; clocks are applied in order. Staleness changes only the weights each
gradient was computed on, never what one update means: the number of updates per epoch, the
learning-rate schedule, momentum, Adam's moments and weight decay keep exactly the meaning they
have in the synchronous run. (Applying each worker's gradient as it arrives, scaled by ``1/W``,
would take ``W`` optimizer steps per global batch: weight decay and momentum would act ``W``
times, and Adam, which normalizes the gradient's scale away, would take ``W`` full-size steps.)
With ``K = 0`` the gradients of clock ``c`` are all applied before anyone pulls, which is
``ps`` step for step, to the last bit.

**Who does what.** Rank 0 hosts the server next to its own worker: the master weights, an
optimizer of the Trainer's class and parameter groups over them (whose learning rate follows
the Trainer's scheduler on rank 0, itself at most ``K`` steps off any update), and one thread
per other rank that receives that rank's messages over a gloo process group of the strategy's
own (point to point, CPU tensors, whatever the device: the training's default group stays
free for the Trainer's collectives). Every rank's training loop, rank 0's included, is a
worker with its own copy of the model. The server enforces the bound by holding back a
worker's pull until the bound allows it.

**Consistent points.** The end of an epoch, validation, checkpoints and the end-of-epoch
files need one model: there (after a rank's last step of the epoch, ``before_validation``,
``full_state_dict``) every worker sends a *sync*; the server waits for all of them, applies
whatever is still pending, and every rank takes the master weights (and rank 0's BatchNorm
statistics, which are otherwise each worker's own). A worker waiting at a sync has no more
steps to push: the clocks the others complete without it count its gradient as zero (as an
empty share's), and the bound counts it as infinitely far ahead, so unequal step counts cannot
deadlock. The last sync of the run ends the server's threads. The optimizer's state lives on
the server; checkpoints carry it in the layout of the Trainer's optimizer, so a run resumes
under any strategy and any number of workers.

**Staleness is momentum.** A gradient computed on weights ``s`` updates old acts much like
extra momentum (Mitliagkas et al., "Asynchrony begets momentum", 2016): on top of SGD's
momentum of 0.9 it made LeNet on digits diverge at ``K = 1`` already (lr 0.1), while plain SGD
trained as well as ``K = 0``. With ``K > 0``, lower ``--momentum`` (or ``--lr``).
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from divekit.engine.distributed import CommCounter, DistEnv
from divekit.engine.strategies import Strategy, _params, flat_grads, set_flat_grads
from divekit.errors import DivekitError

PUSH, SYNC, STOP = 0, 1, 2  # the kinds of a worker's message (its header's first entry)


def _flat(tensors: list[Tensor]) -> Tensor:
    """One 1-D copy of ``tensors`` in logical (not memory) order, whatever their layout."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(flat: Tensor, tensors: list[Tensor]) -> None:
    """Copy ``flat`` (logical order) into ``tensors``, each keeping its own memory layout."""
    offset = 0
    for t in tensors:
        t.data.copy_(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()


class ParameterServer:
    """The master weights, their optimizer and the SSP clocks (rank 0 only; thread-safe).

    ``push(rank, clock, grad)`` files a gradient; ``pull(rank, clock)`` waits until the bound
    lets ``rank`` start step ``clock + 1`` and returns the weights; ``sync(rank)`` waits for
    every worker to arrive, applies what is pending and returns weights and buffers. Clocks
    count the pushes since the last sync. ``leads`` counts, per ``(rank, lead)``, how far ahead
    of the slowest worker each pull let a worker run (what the tests and benchmark read).
    """

    def __init__(self, params: list[nn.Parameter], buffers: list[Tensor], world: int,
                 staleness: int | None, grad_clip: float | None, timeout_s: float):
        self.master = [nn.Parameter(p.detach().clone()) for p in params]
        self.buffers = buffers  # rank 0's worker's floating buffers (read at syncs only)
        self.world, self.staleness, self.grad_clip = world, staleness, grad_clip
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.optimizer: torch.optim.Optimizer | None = None
        self.mirrored: torch.optim.Optimizer | None = None  # the Trainer's, on rank 0
        self.leads: Counter[tuple[int, int]] = Counter()
        self.updates = 0
        self.error: BaseException | None = None
        self._reset_clocks()
        self._round = 0  # completed syncs
        self._snapshot: tuple[Tensor, Tensor] | None = None

    def _reset_clocks(self) -> None:
        self.pushed = [0] * self.world
        self.waiting = [False] * self.world  # at a sync
        self.pending: dict[int, dict[int, Tensor]] = {}
        self.applied = 0

    # ------------------------------------------------------------ the optimizer
    def mirror(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """An optimizer of ``optimizer``'s class and parameter groups over the master weights
        (``params[i]`` is the worker's parameter whose master is ``self.master[i]``)."""
        index = {id(p): i for i, p in enumerate(params)}
        groups = []
        for group in optimizer.param_groups:
            missing = [p for p in group["params"] if id(p) not in index]
            if missing:
                raise DivekitError("--strategy async: the optimizer holds a parameter that does "
                                   "not require a gradient; it cannot be served")
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [self.master[index[id(p)]] for p in group["params"]]})
        self.optimizer = type(optimizer)(groups, **optimizer.defaults)
        self.mirrored = optimizer

    def state_dict(self) -> dict[str, Any]:
        with self.cond:
            assert self.optimizer is not None
            return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.cond:
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state)

    def load_weights(self, params: list[Tensor]) -> None:
        with self.cond:
            for m, p in zip(self.master, params):
                m.data.copy_(p.detach())

    def _update(self, grads: dict[int, Tensor]) -> None:
        """One optimizer step on the mean of one clock's gradients (a missing worker's
        gradient counts as zero, as an empty share's does). Called with the lock held."""
        if self.optimizer is None or self.mirrored is None:
            raise DivekitError("--strategy async needs the Trainer (its optimizer)")
        total: Tensor | None = None
        for rank in sorted(grads):  # rank order, as ps sums
            total = grads[rank].clone() if total is None else total.add_(grads[rank])
        if total is None:  # nobody pushed this clock (possible only with unequal step counts)
            return
        set_flat_grads(self.master, total / self.world)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.master, self.grad_clip)
        for mine, theirs in zip(self.optimizer.param_groups, self.mirrored.param_groups):
            mine.update({k: v for k, v in theirs.items() if k != "params"})  # the schedule's lr
        self.optimizer.step()
        for m in self.master:
            m.grad = None
        self.updates += 1

    def _apply_ready(self) -> None:
        """Apply, in order, every clock that is complete: pushed by every worker, or by every
        worker still training (one waiting at a sync has no more steps in this epoch: its
        missing gradient counts as zero, as an empty share's does)."""
        active = [c for w, c in zip(self.waiting, self.pushed) if not w]
        while active and self.applied < min(active):
            self.applied += 1
            self._update(self.pending.pop(self.applied, {}))

    # ------------------------------------------------------------ the protocol
    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if self.error is not None:
                raise DivekitError(f"--strategy async: the server failed: {self.error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DivekitError(f"--strategy async: {what} within {self.timeout_s:g} s "
                                   "(--dist-timeout); a worker stopped?")
            self.cond.wait(min(left, 1.0))

    def _slowest(self) -> float:
        return min(math.inf if w else c for w, c in zip(self.waiting, self.pushed))

    def push(self, rank: int, clock: int, grad: Tensor) -> None:
        with self.cond:
            self.pending.setdefault(clock, {})[rank] = grad
            self.pushed[rank] = clock
            self._apply_ready()
            self.cond.notify_all()

    def pull(self, rank: int, clock: int) -> Tensor:
        """The master weights once the slowest worker has finished step ``clock - K``."""
        with self.cond:
            if self.staleness is not None:
                bound = clock - self.staleness
                self._wait(lambda: self._slowest() >= bound,
                           f"worker {rank} waited for the others to finish step {bound}")
            others = [c for r, c in enumerate(self.pushed) if r != rank and not self.waiting[r]]
            self.leads[(rank, clock - min(others, default=clock))] += 1
            return _flat(self.master)

    def sync(self, rank: int) -> tuple[Tensor, Tensor]:
        """Wait for every worker; apply what is pending; (weights, rank 0's buffers)."""
        with self.cond:
            round_ = self._round
            self.waiting[rank] = True
            self._apply_ready()
            if all(self.waiting):
                for clock in sorted(self.pending):  # only unequal step counts leave any
                    self._update(self.pending[clock])
                self._reset_clocks()
                self._snapshot = (_flat(self.master), _flat(self.buffers))
                self._round += 1
                self.cond.notify_all()
            else:
                self.cond.notify_all()  # a pull waiting on this worker may go now
                self._wait(lambda: self._round != round_, f"worker {rank} waited at a sync")
            assert self._snapshot is not None
            return self._snapshot

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = error
            self.cond.notify_all()


class AsyncParameterServerStrategy(Strategy):
    """Asynchronous SGD on a parameter server at rank 0, with the SSP bound ``--staleness``."""

    name = "async"
    sharded = True  # the current model lives on the server: gathered (synced) for checkpoints

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        self.params = _params(model)
        self._broadcast(self.params + list(model.buffers()))  # start from rank 0's replica
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.staleness: int | None = getattr(config, "staleness", None)
        timeout_s = float(getattr(config, "dist_timeout", 300.0) or 300.0)
        # every rank creates the group (a collective); the server's traffic is CPU tensors. Its
        # timeout is long: a worker may validate or checkpoint for a while between two messages
        # (a dead peer still ends a receive at once: its connection closes)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=max(timeout_s, 86400.0)))
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = flat_grads(self.params).dtype if self.params else torch.float32
        self.clock = 0
        self.stopped = False
        self.trainer: Any = None
        self.server: ParameterServer | None = None
        self.threads: list[threading.Thread] = []
        if env.is_main:
            self.server = ParameterServer(self.params, self.buffers, env.world_size,
                                          self.staleness, getattr(config, "grad_clip", None),
                                          timeout_s)

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer
        if self.server is not None:
            self.server.mirror(trainer.optimizer, self.params)

    @property
    def updates_here(self) -> bool:
        return False  # the server steps its own optimizer, in its own time

    @property
    def leads(self) -> Counter[tuple[int, int]]:
        """``(rank, lead) -> pulls``: how far ahead of the slowest each pull let a worker run
        (rank 0 only; empty elsewhere)."""
        return self.server.leads if self.server is not None else Counter()

    # ------------------------------------------------------------ the worker's step
    def reduce_gradients(self) -> None:
        """Push this worker's gradient (its share of the global batch's) to the server."""
        self.clock += 1
        grad = flat_grads(self.params)
        if self.server is not None:
            self._serve()
            self.server.push(0, self.clock, grad)
            return
        self._send_header(PUSH)
        dist.send(grad.cpu(), dst=0, group=self.group)
        self._count(grad)

    def after_update(self) -> None:
        """Pull the weights: returns once the bound lets this worker start its next step. After
        this rank's last step of an epoch, a sync: every worker then holds the epoch's final
        weights before the Trainer's end-of-epoch collectives, and a rank with fewer steps than
        the others waits there without holding them back."""
        if self.server is not None:
            flat = self.server.pull(0, self.clock)
        else:
            flat = torch.empty(self.numel, dtype=self.dtype)
            dist.recv(flat, src=0, group=self.group)
        _unflat(flat.to(self.device), self.params)
        t = self.trainer
        if t is not None and (t.global_step + 1) % t.steps_per_epoch == 0:
            self._sync(last=t.global_step + 1 >= t.config.epochs * t.steps_per_epoch)

    def _send_header(self, kind: int) -> None:
        dist.send(torch.tensor([kind, self.clock], dtype=torch.int64), dst=0, group=self.group)

    def _count(self, t: Tensor, copies: int = 1) -> None:
        if self.counter is not None:
            self.counter.add(t.numel() * t.element_size() * copies)

    # ------------------------------------------------------------ the server's threads
    def _serve(self) -> None:
        """Start one thread per other rank (once; the first time rank 0 meets the server)."""
        if self.threads or self.env.world_size == 1:
            return
        for rank in range(1, self.env.world_size):
            thread = threading.Thread(target=self._serve_rank, args=(rank,), daemon=True,
                                      name=f"divekit-async-ps-{rank}")
            thread.start()
            self.threads.append(thread)

    def _serve_rank(self, rank: int) -> None:
        """Answer ``rank``'s messages: a push gets the weights the bound allows, a sync the
        synced weights; a stop ends the thread."""
        assert self.server is not None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        header = torch.zeros(2, dtype=torch.int64)
        try:
            while True:
                dist.recv(header, src=rank, group=self.group)
                kind, clock = (int(v) for v in header)
                if kind == PUSH:
                    grad = torch.empty(self.numel, dtype=self.dtype)
                    dist.recv(grad, src=rank, group=self.group)
                    self.server.push(rank, clock, grad.to(self.device))
                    reply = self.server.pull(rank, clock)
                else:
                    reply = torch.cat(self.server.sync(rank))
                reply = reply.cpu()
                dist.send(reply, dst=rank, group=self.group)
                self._count(reply)
                if kind == STOP:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the waiting training loop
            self.server.fail(e)

    # ------------------------------------------------------------ consistent points
    def _sync(self, last: bool | None = None) -> None:
        """Every rank: wait for all workers, then hold the server's weights (collective).
        The last sync of the run (``last``; default: every step done) also ends the server's
        threads; after it there is nothing left to sync."""
        if self.stopped:
            return
        t = self.trainer
        if last is None:
            last = t is not None and t.global_step >= t.config.epochs * t.steps_per_epoch
        if self.server is not None:
            self._serve()
            params, buffers = self.server.sync(0)
            if last:
                for thread in self.threads:
                    thread.join(self.server.timeout_s)
                if self.server.error is not None:
                    raise DivekitError(f"--strategy async: the server failed: "
                                       f"{self.server.error}")
        else:
            self._send_header(STOP if last else SYNC)
            n_buf = sum(b.numel() for b in self.buffers)
            reply = torch.empty(self.numel + n_buf, dtype=self.dtype)
            dist.recv(reply, src=0, group=self.group)
            params, buffers = reply[: self.numel], reply[self.numel :]
            _unflat(buffers.to(self.device), self.buffers)
        _unflat(params.to(self.device), self.params)
        self.clock = 0
        self.stopped = last

    def before_validation(self) -> None:
        self._sync()

    def full_state_dict(self) -> dict[str, Tensor]:
        self._sync()
        return self.model.state_dict()

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
        if self.server is not None:
            self.server.load_weights(self.params)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The server's optimizer state (rank 0), in the Trainer's optimizer's layout."""
        return self.server.state_dict() if self.server is not None else optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)  # the hyperparameters the scheduler reads and writes
        if self.server is not None:
            self.server.load_state_dict(state)
