"""Tensor model parallelism (``--strategy tensor --tp N``): each layer's matrices split over
the ranks, through PyTorch's DTensor (Megatron-LM's scheme, Shoeybi et al. 2019).

Every rank sees the whole batch (``shards_data = False``) and holds a slice of each split
layer. A pair of linear maps ``Y = act(X A) B`` splits without communication in between when
``A`` is cut by *columns* and ``B`` by *rows*: with ``A = [A₁ … A_N]`` and ``B = [B₁; …; B_N]``,

    act(X A) B = Σ_r act(X A_r) B_r,

so rank ``r`` computes ``act(X A_r) B_r`` from its own slices and one all-reduce sums the
``N`` partial results. The backward pass mirrors it: the gradient that reaches ``X`` is a sum
over the ranks, one more all-reduce. Multi-head attention is such a pair: the query, key and
value projections are cut by columns, which is by heads (rank ``r`` holds heads
``r·h/N … (r+1)·h/N - 1`` and attends with them alone), and the output projection ``W_o`` by
rows. The position-wise feed-forward network is the other pair (``dense1`` by columns,
``dense2`` by rows). Per block and step that is two all-reduces of the ``B·T·d`` activations
forward and two backward; a ring all-reduce sends ``2 (N-1)/N`` of them from each rank
(:func:`activation_bytes_per_step`).

What is split (:func:`tensor_parallel_plan`):

* every multi-head attention (the Transformer's and BERT's: a module with ``W_q``, ``W_k``,
  ``W_v``, ``W_o`` linear layers and ``num_heads``): ``ColwiseParallel`` for ``W_q/W_k/W_v``,
  ``RowwiseParallel`` for ``W_o``, and the module's ``num_heads`` becomes the local ``h/N``.
  The heads must divide by ``N`` (a one-line error otherwise). The queries, keys and values
  that are one tensor (self-attention) enter as one replicated DTensor, so that the gradients
  of the three projections are summed locally and all-reduced once;
* every position-wise FFN (``dense1``, ``dense2``): column-wise, then row-wise;
* in any ``nn.Sequential``, two linear layers with only element-wise layers between them
  (activations, dropout): the fully connected head of the CNN zoo (LeNet's 400→120→84,
  AlexNet's and VGG's 4096-wide classifier). Convolutions, embeddings, layer norms, BatchNorm
  and the layers left over stay *replicated*: every rank computes them on the whole batch, and
  since the inputs they see and the gradients that reach them are the same on every rank, so
  are their updates. For a convolutional network that is little saved (the convolutions hold
  the computation), which is why the CNN zoo is better served by data parallelism or FSDP.

Split parameters are DTensors (``Shard(0)`` for a column-wise weight and its bias,
``Shard(1)`` for a row-wise weight, ``Replicate()`` for its bias). Checkpoints are whole:
:meth:`TensorParallelStrategy.full_state_dict` gathers each DTensor (``full_tensor()``) and
:meth:`~TensorParallelStrategy.load_full_state_dict` cuts a whole one again
(``distribute_tensor``), and the optimizer state likewise, so a run saved with 2 ranks resumes
with 1 and the other way round. The optimizer runs its per-parameter implementation: torch's
fused and foreach kernels refuse a list mixing DTensors and plain tensors. Gradient clipping
takes the norm over all ranks: the squares of the sharded gradients are summed over the ranks,
the replicated ones counted once.
"""

from __future__ import annotations

import math
import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from divekit.engine.distributed import CommCounter, DistEnv
from divekit.engine.strategies import Strategy, ring_bytes
from divekit.errors import DivekitError

# layers that act on each element alone: a column-wise slice passes through them unchanged
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU,
               nn.Mish, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Identity)


def dtensor_api() -> dict[str, Any]:
    """DTensor's names on this torch (public ``torch.distributed.tensor`` from 2.5,
    ``torch.distributed._tensor`` in 2.4); a one-line error where they are missing."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )
        try:
            from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
        except ImportError:  # torch 2.4
            from torch.distributed._tensor import (  # type: ignore[no-redef]
                DTensor,
                Replicate,
                Shard,
                distribute_tensor,
            )
    except ImportError as e:
        raise DivekitError(f"--strategy tensor needs DTensor (torch >= 2.4): {e}") from None
    return {"init_device_mesh": init_device_mesh, "ColwiseParallel": ColwiseParallel,
            "RowwiseParallel": RowwiseParallel, "parallelize_module": parallelize_module,
            "DTensor": DTensor, "Replicate": Replicate, "Shard": Shard,
            "distribute_tensor": distribute_tensor}


def _is_linear(m: Any) -> bool:
    return (isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear)
            and not isinstance(m.weight, nn.parameter.UninitializedParameter))


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "num_heads", None), int)
            and all(_is_linear(getattr(m, w, None)) for w in ("W_q", "W_k", "W_v", "W_o"))]


def tensor_parallel_plan(model: nn.Module, tp: int) -> dict[str, str]:
    """``{submodule name: "colwise" | "rowwise"}``: the linear layers split over ``tp`` ranks
    (see the module's docstring). Raises a one-line error when attention heads or a
    feed-forward width do not divide by ``tp``, or when nothing in ``model`` can be split."""
    plan: dict[str, str] = {}

    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    for name, m in _attention_modules(model):
        if m.num_heads % tp:
            raise DivekitError(f"--tp {tp} must divide the attention heads: {name or 'the model'} "
                               f"has {m.num_heads}")
        plan.update({join(name, w): "colwise" for w in ("W_q", "W_k", "W_v")})
        plan[join(name, "W_o")] = "rowwise"
    for name, m in model.named_modules():
        first, second = getattr(m, "dense1", None), getattr(m, "dense2", None)
        if _is_linear(first) and _is_linear(second) and first.out_features == second.in_features:
            if first.out_features % tp:
                raise DivekitError(f"--tp {tp} must divide the feed-forward width: "
                                   f"{join(name, 'dense1')} has {first.out_features} outputs")
            plan[join(name, "dense1")], plan[join(name, "dense2")] = "colwise", "rowwise"
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            plan.update(_sequential_pairs(name, m, tp, plan))
    if not plan:
        raise DivekitError(f"--strategy tensor finds nothing to split in {type(model).__name__}: "
                           "it splits multi-head attention, feed-forward blocks and pairs of "
                           "linear layers (use a data-parallel strategy)")
    return plan


def _sequential_pairs(prefix: str, seq: nn.Sequential, tp: int,
                      taken: dict[str, str]) -> dict[str, str]:
    """Linear, element-wise layers, linear: the first column-wise, the second row-wise (pairs
    whose middle width does not divide by ``tp`` stay replicated)."""
    found: dict[str, str] = {}
    children = list(seq.named_children())
    i = 0
    while i < len(children):
        name, m = children[i]
        full = f"{prefix}.{name}" if prefix else name
        j = i + 1
        while j < len(children) and isinstance(children[j][1], ELEMENTWISE):
            j += 1
        if (_is_linear(m) and full not in taken and j < len(children) and _is_linear(children[j][1])
                and m.out_features == children[j][1].in_features and m.out_features % tp == 0):
            other = f"{prefix}.{children[j][0]}" if prefix else children[j][0]
            if other not in taken:
                found[full], found[other] = "colwise", "rowwise"
                i = j + 1
                continue
        i += 1
    return found


def activation_bytes_per_step(batch: int, steps: int, width: int, blocks: int, world: int,
                              element_size: int = 4) -> float:
    """The model of the bytes one rank sends per training step of a Transformer encoder split
    over ``world`` ranks: per block two all-reduces of the ``(B, T, d)`` activations forward
    (after ``W_o`` and ``dense2``) and two backward (the gradients at the inputs of the
    attention and of the FFN), each a ring all-reduce sending ``2 (N-1)/N`` of its bytes."""
    return 4 * blocks * ring_bytes(batch * steps * width * element_size, world)


class _CountCollectives(AbstractContextManager):
    """Counts the bytes this rank sends in the collectives issued inside it (DTensor's
    functional collectives and plain ``torch.distributed`` calls alike), by the ring model:
    an all-reduce sends ``2 (N-1)/N`` of its tensor, an all-gather or reduce-scatter
    ``(N-1)/N`` of the whole, a broadcast ``(N-1)·size`` from the source. A dispatch mode sees
    every operator, also those autograd runs in the backward pass."""

    def __init__(self, counter: CommCounter, world: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                outer._count(str(func.overloadpacket), args)
                return func(*args, **(kwargs or {}))

        self.counter, self.world, self.mode = counter, world, Mode()
        self.calls: dict[str, int] = {}

    def _count(self, op: str, args: tuple) -> None:
        name = op.rsplit(".", 1)[-1].rstrip("_")
        kinds = {"all_reduce": 2.0, "allreduce": 2.0, "all_gather_into_tensor": 1.0,
                 "reduce_scatter_tensor": 1.0, "broadcast": 0.0}
        if name not in kinds or "c10d" not in op:
            return
        tensors = args[0] if isinstance(args[0], list | tuple) else [args[0]]
        nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
        n = self.world
        if name in ("all_gather_into_tensor",):
            nbytes *= n  # the input is one rank's part of the gathered whole
        sent = (kinds[name] * (n - 1) / n * nbytes) if kinds[name] else (n - 1) * nbytes
        self.counter.add(round(sent))
        self.calls[name] = self.calls.get(name, 0) + 1

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


_LIVE: weakref.WeakSet[TensorParallelStrategy] = weakref.WeakSet()
_GUARD_INSTALLED = False


def _per_parameter_steps(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A step pre-hook: the groups holding a live tensor-parallel model's DTensors step one
    parameter at a time (``fused`` and ``foreach`` off)."""
    ids = set().union(*(s._dtensor_ids for s in list(_LIVE)))
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            group["fused"], group["foreach"] = False, False


class TensorParallelStrategy(Strategy):
    """Attention and feed-forward layers split over ``--tp`` ranks (see the module docstring);
    every rank trains on the whole batch and holds ``1/N`` of the split layers' weights."""

    name = "tensor"
    shards_data = False  # every rank trains on the whole batch
    sharded = True  # each rank holds 1/tp of the split layers' weights

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        api = self.api = dtensor_api()
        tp = getattr(config, "tp", None) or env.world_size
        if tp != env.world_size:
            raise DivekitError(f"--tp {tp} must equal the number of processes "
                               f"({env.world_size}): tensor parallelism here spans every rank")
        self.tp = tp
        plan = tensor_parallel_plan(model, tp)
        self.plan = plan
        device = next(model.parameters()).device
        # every rank starts from rank 0's replica, before it keeps its slices of it
        self._broadcast([p for p in model.parameters()] + [b for b in model.buffers()])
        self.mesh = api["init_device_mesh"](device.type, (tp,))
        styles = {"colwise": api["ColwiseParallel"], "rowwise": api["RowwiseParallel"]}
        api["parallelize_module"](model, self.mesh, {k: styles[v]() for k, v in plan.items()})
        for _, m in _attention_modules(model):
            m.num_heads //= tp  # the heads of this rank: the projections' outputs are local
            m.register_forward_pre_hook(self._replicate_inputs)
        self._install_optimizer_guard()

    # ------------------------------------------------------------ forward and backward
    def _replicate_inputs(self, module: nn.Module, args: tuple) -> tuple:
        """Queries, keys and values as replicated DTensors, one per distinct tensor: in
        self-attention the three projections then share one input, whose gradient (a partial
        sum on each rank) is all-reduced once instead of three times."""
        DTensor, Replicate = self.api["DTensor"], self.api["Replicate"]
        made: dict[int, Any] = {}
        out = list(args)
        for i, x in enumerate(args[:3]):
            if isinstance(x, Tensor) and not isinstance(x, DTensor):
                if id(x) not in made:
                    made[id(x)] = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False)
                out[i] = made[id(x)]
        return tuple(out)

    def _counting(self) -> AbstractContextManager:
        if self.counter is None:
            return nullcontext()
        return _CountCollectives(self.counter, self.env.world_size)

    def forward_backward(self, task: Any, batch: Any, scale: float,
                         autocast: AbstractContextManager) -> tuple[Tensor, dict[str, Tensor]]:
        with self._counting():
            return super().forward_backward(task, batch, scale, autocast)

    def _is_dtensor(self, t: Any) -> bool:
        return isinstance(t, self.api["DTensor"])

    def _is_sharded(self, t: Any) -> bool:
        return self._is_dtensor(t) and any(p.is_shard() for p in t.placements)

    def clip_grad_norm_(self, max_norm: float) -> None:
        """The whole model's gradient norm: ``Σ`` of the sharded gradients' local squares,
        summed over the ranks, plus the replicated gradients' squares once; every gradient is
        then scaled by ``min(1, max_norm / (norm + 1e-6))``, as torch's own clipping does."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        local = [g.to_local() if self._is_dtensor(g) else g for g in grads]
        sharded = [x for g, x in zip(grads, local) if self._is_sharded(g)]
        replicated = [x for g, x in zip(grads, local) if not self._is_sharded(g)]
        device = local[0].device

        def squares(ts: list[Tensor]) -> Tensor:
            total = torch.zeros((), device=device, dtype=torch.float64)
            for t in ts:
                total += t.detach().double().pow(2).sum()
            return total

        shard_sq = squares(sharded)
        with self._counting():
            dist.all_reduce(shard_sq)
        norm = math.sqrt(float(shard_sq + squares(replicated)))
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for x in local:
                x.detach().mul_(coef)

    # ------------------------------------------------------------ the optimizer
    def _install_optimizer_guard(self) -> None:
        """Turn the fused and foreach implementations off in the optimizer of this model (the
        Trainer builds it after the strategy): they refuse DTensors beside plain tensors. One
        process-wide step pre-hook does it before each step, for the live strategies' models."""
        global _GUARD_INSTALLED
        _LIVE.add(self)
        self._dtensor_ids = {id(p) for p in self.model.parameters() if self._is_dtensor(p)}
        if not _GUARD_INSTALLED:
            from torch.optim.optimizer import register_optimizer_step_pre_hook

            register_optimizer_step_pre_hook(_per_parameter_steps)
            _GUARD_INSTALLED = True

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state with every DTensor gathered whole (collective): the state one
        process would hold, so any number of ranks can resume it."""
        state = optimizer.state_dict()
        full: dict[Any, dict[str, Any]] = {}
        for index in sorted(state["state"]):
            full[index] = {k: (v.full_tensor() if self._is_dtensor(v) else v)
                           for k, v in sorted(state["state"][index].items())}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """A whole optimizer state (from any number of ranks) cut to this rank's slices: each
        tensor shaped like its DTensor parameter is distributed with the parameter's
        placements."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        mine: dict[Any, dict[str, Any]] = {}
        for index, entry in state["state"].items():
            p = params[int(index)]
            mine[index] = {k: self._distribute_like(v, p) for k, v in entry.items()}
        optimizer.load_state_dict({"state": mine, "param_groups": state["param_groups"]})

    def _distribute_like(self, value: Any, param: Tensor) -> Any:
        if (not self._is_dtensor(param) or not isinstance(value, Tensor)
                or self._is_dtensor(value) or tuple(value.shape) != tuple(param.shape)):
            return value
        local = param.to_local()
        return self.api["distribute_tensor"](value.to(local.device, local.dtype), self.mesh,
                                             list(param.placements))

    # ------------------------------------------------------------ whole-model state
    def full_state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the model whole (``full_tensor()`` gathers a DTensor: collective),
        as plain tensors on every rank, under the names of the unsplit model."""
        return {k: (v.full_tensor() if self._is_dtensor(v) else v)
                for k, v in self.model.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a whole model's state: each split tensor is cut again (``distribute_tensor``
        with its placements), the replicated ones copied."""
        own = self.model.state_dict(keep_vars=True)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise DivekitError(f"the checkpoint does not fit this model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            for k, mine in own.items():
                if self._is_dtensor(mine):
                    mine.to_local().copy_(self._distribute_like(state[k], mine).to_local())
                else:
                    mine.copy_(state[k])
