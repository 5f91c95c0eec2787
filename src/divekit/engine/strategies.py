"""How the workers of a data-parallel run agree on one update (``--strategy``).

Every strategy gives every worker the gradient of the *global* minibatch. Rank ``r`` holds
``n_r`` of the global batch's ``m`` samples and its task returns the mean loss over them,
``L_r = (1/n_r) Σ_{i∈r} ℓ_i``. The Trainer back-propagates ``L_r · n_r · W / m`` (``W`` workers),
so that the *average* over the workers of their gradients is

    (1/W) Σ_r (n_r W / m) ∇L_r = (1/m) Σ_i ∇ℓ_i,

the gradient of the global batch's mean loss, exactly as one process would compute it even
when the last batch splits unevenly. The strategies differ in how that average is formed:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` averages bucketed gradients during
  the backward pass, overlapping communication with computation;
* ``allreduce``: divekit's :func:`~divekit.engine.distributed.ring_allreduce` sums one flat
  gradient buffer after the backward pass, then divides by ``W``;
* ``ps``: a synchronous parameter server. Rank 0 holds the parameters and the optimizer;
  every worker pushes its gradient to it, the server sums and divides by ``W``, steps, and
  sends the new parameters back (the workers' pull). The server's parameters stay on the
  accelerator when there is one, so summing and updating happen next to the data.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from divekit.engine.distributed import CommCounter, DistEnv, ring_allreduce
from divekit.errors import DivekitError, UnknownNameError

# name -> "module:Class"; the strategies beyond data parallelism live in modules of their own
STRATEGY_CLASSES = {
    "ddp": "divekit.engine.strategies:DDPStrategy",
    "allreduce": "divekit.engine.strategies:AllReduceStrategy",
    "ps": "divekit.engine.strategies:ParameterServerStrategy",
    "async": "divekit.engine.async_ps:AsyncParameterServerStrategy",
    "pipeline": "divekit.engine.pipeline:PipelineStrategy",
    "tensor": "divekit.engine.tensor_parallel:TensorParallelStrategy",
    "fsdp": "divekit.engine.fsdp:FSDPStrategy",
}
STRATEGIES = tuple(STRATEGY_CLASSES)


def ring_bytes(nbytes: int, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: ``2 (W-1)/W · nbytes``."""
    return 2 * (world - 1) / world * nbytes


def bytes_per_step(strategy: str, param_bytes: int, world: int, rank: int = 1) -> float:
    """Gradient traffic one worker sends per step (the model behind ``--profile-comm``).

    ``ddp``/``allreduce``: a ring all-reduce of the gradients. ``ps`` and ``async``: a worker
    pushes its gradients (``P`` bytes); the server (rank 0) sends the parameters to ``W-1``
    workers. ``fsdp``: two all-gathers of the parameters (forward, backward) and a
    reduce-scatter of the gradients, each ``(W-1)/W · P`` over a ring. ``pipeline`` and
    ``tensor`` send activations, not gradients: their traffic depends on the batch
    (:func:`divekit.engine.tensor_parallel.activation_bytes_per_step`, the planner).
    """
    if strategy not in STRATEGIES:
        raise UnknownNameError("strategy", strategy, STRATEGIES)
    if world == 1:
        return 0.0
    if strategy in ("ddp", "allreduce"):
        return ring_bytes(param_bytes, world)
    if strategy in ("ps", "async"):
        return float((world - 1) * param_bytes if rank == 0 else param_bytes)
    if strategy == "fsdp":
        return 3 * (world - 1) / world * param_bytes
    raise DivekitError(f"--strategy {strategy} sends activations, not gradients: its bytes per "
                       "step depend on the batch (see divekit dist plan)")


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grads(params: list[nn.Parameter]) -> Tensor:
    """One 1-D buffer of every gradient (zeros for a parameter without one)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])


def set_flat_grads(params: list[nn.Parameter], flat: Tensor) -> None:
    """Each parameter's slice of ``flat`` (in logical order) as its gradient, laid out in memory
    as the parameter is: the fused optimizers walk a parameter and its gradient as one buffer,
    so a contiguous gradient beside a channels_last weight would be read in the wrong order."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = torch.empty_like(p).copy_(flat[offset : offset + n].view(p.shape))
        offset += n


class Strategy:
    """One process, no communication: the base every strategy extends.

    The Trainer drives a strategy through these hooks, once per step::

        optimizer.zero_grad(); loss, logs = strategy.forward_backward(task, batch, scale, amp)
        strategy.reduce_gradients(); if strategy.updates_here: optimizer.step()
        strategy.after_update()

    A data-parallel strategy (``shards_data``) gives each rank its share of every global batch;
    a model-parallel one (pipeline, tensor) gives every rank the whole batch and splits the
    model instead. A strategy whose ranks do not each hold the whole model (``sharded``) gathers
    it for checkpoints and for the task's end-of-epoch files (:meth:`full_state_dict`, which
    every rank calls) and loads a full one back (:meth:`load_full_state_dict`), so a run saved
    with N ranks resumes with any number.
    """

    name = "none"
    shards_data = True  # each rank trains on its share of every global batch
    sharded = False  # the ranks' modules hold parts of the model, not all of it

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        self.model, self.env, self.counter, self.config = model, env, counter, config

    def forward_backward(self, task: Any, batch: Any, scale: float,
                         autocast: AbstractContextManager) -> tuple[Tensor, dict[str, Tensor]]:
        """The task's loss on this rank's batch, back-propagated times ``scale``. Every rank
        runs its backward pass (whose collectives the others wait on) even when its loss is not
        finite; the Trainer then stops before the optimizer steps."""
        with autocast:
            loss, logs = task.training_step(self.train_model, batch)
        (loss * scale if scale != 1 else loss).backward()
        return loss, logs

    def clip_grad_norm_(self, max_norm: float) -> None:
        """Scale the gradients so that the whole model's gradient norm is at most ``max_norm``
        (a strategy holding parts of the model on each rank takes the norm over all of them)."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def attach(self, trainer: Any) -> None:
        """Called once by the Trainer when its optimizer, scheduler and data are built (a
        strategy that updates the weights itself, as async's server does, keeps what it
        needs: the optimizer to mirror, ``steps_per_epoch``, the live ``global_step``)."""

    def before_validation(self) -> None:
        """Make :attr:`eval_model` ready to validate (e.g. the stages' weights on every rank)."""

    @property
    def eval_model(self) -> nn.Module:
        """The module validation calls on every rank."""
        return self.model

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's state (plain tensors), complete on rank 0 at least. Collective:
        every rank calls it."""
        return self.model.state_dict()

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a whole model's state (as :meth:`full_state_dict` gives it) on every rank."""
        self.model.load_state_dict(state)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state to checkpoint (rank 0's is written). Collective."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    @property
    def train_model(self) -> nn.Module:
        """The module the task's ``step`` calls (DDP's wrapper for ``ddp``)."""
        return self.model

    @property
    def updates_here(self) -> bool:
        """Whether this process runs ``optimizer.step()`` (only the server under ``ps``)."""
        return True

    def before_forward(self) -> None: ...
    def reduce_gradients(self) -> None: ...
    def after_update(self) -> None: ...

    def _broadcast(self, tensors: list[Tensor]) -> None:
        """Rank 0's values of ``tensors`` on every rank (one flat message)."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        if self.counter is not None and self.env.is_main:
            self.counter.add(flat.numel() * flat.element_size() * (self.env.world_size - 1))
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def _sync_buffers(self) -> None:
        """BatchNorm statistics follow rank 0, as DDP's ``broadcast_buffers`` does."""
        self._broadcast([b for b in self.model.buffers() if b.is_floating_point()])


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        self.ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        if counter is not None:
            self.ddp.register_comm_hook(counter, _counting_allreduce_hook)

    @property
    def train_model(self) -> nn.Module:
        return self.ddp


def _counting_allreduce_hook(counter: CommCounter, bucket: dist.GradBucket):
    """DDP's default all-reduce (sum, then divide by W), counting the ring model's bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    counter.add(round(ring_bytes(buffer.numel() * buffer.element_size(), dist.get_world_size())))
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]


# DDP inspects the hook's annotations, which `from __future__ import annotations` made strings
_counting_allreduce_hook.__annotations__ = {
    "counter": CommCounter, "bucket": dist.GradBucket, "return": torch.futures.Future[Tensor],
}


class _ReplicatedStrategy(Strategy):
    """Every rank holds the whole model, starting from rank 0's replica, and its BatchNorm
    statistics follow rank 0's before each forward pass; the strategies built on it differ in
    how the gradients (and the parameters) travel."""

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        self.params = _params(model)
        self._broadcast(self.params + list(model.buffers()))  # start from rank 0's replica

    def before_forward(self) -> None:
        self._sync_buffers()


class AllReduceStrategy(_ReplicatedStrategy):
    """Replicated parameters and optimizers; gradients summed by divekit's ring all-reduce."""

    name = "allreduce"

    def reduce_gradients(self) -> None:
        flat = flat_grads(self.params)
        ring_allreduce(flat, counter=self.counter)
        set_flat_grads(self.params, flat / self.env.world_size)


class ParameterServerStrategy(_ReplicatedStrategy):
    """Synchronous parameter server on rank 0; every rank also computes gradients."""

    name = "ps"

    @property
    def updates_here(self) -> bool:
        return self.env.is_main

    def reduce_gradients(self) -> None:
        """Workers push their gradients; the server sums them (in rank order) and averages."""
        mine = flat_grads(self.params)
        if not self.env.is_main:
            dist.send(mine, dst=0)
            self._sent(mine)
            return
        received = [torch.empty_like(mine) for _ in range(1, self.env.world_size)]
        for req in [dist.irecv(buf, src=r) for r, buf in enumerate(received, start=1)]:
            req.wait()
        total = mine.clone()
        for buf in received:
            total += buf
        set_flat_grads(self.params, total / self.env.world_size)

    def after_update(self) -> None:
        """The server sends the updated parameters back; the workers pull them."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        if self.env.is_main:
            for req in [dist.isend(flat, dst=r) for r in range(1, self.env.world_size)]:
                req.wait()
            self._sent(flat, copies=self.env.world_size - 1)
            return
        dist.recv(flat, src=0)
        offset = 0
        for p in self.params:
            p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def _sent(self, t: Tensor, copies: int = 1) -> None:
        if self.counter is not None:
            self.counter.add(t.numel() * t.element_size() * copies)


def make_strategy(name: str, model: nn.Module, env: DistEnv,
                  counter: CommCounter | None = None, config: Any = None) -> Strategy:
    """The strategy ``name`` for ``model`` (plain one-process training when ``W = 1``);
    ``config`` is the run's TrainConfig (``--stages``, ``--tp``, ``--staleness``...)."""
    import importlib

    if name not in STRATEGIES:
        raise UnknownNameError("strategy", name, STRATEGIES)
    if not env.enabled:
        return Strategy(model, env, counter, config)
    module, _, cls = STRATEGY_CLASSES[name].partition(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise DivekitError(f"--strategy {name} is not available here ({e})") from None
    return found(model, env, counter, config)
