"""Sharded data parallelism (``--strategy fsdp``) with PyTorch's FSDP2 ``fully_shard``.

Under ``ddp`` every rank keeps the whole model, its whole gradient and the whole optimizer state:
``W`` copies of the same numbers. Fully sharded data parallelism (ZeRO stage 3) keeps one copy,
cut into ``W`` pieces. Each parameter is split along its first dimension into ``W`` row
blocks, and rank ``r`` holds block ``r`` of every parameter, of its gradient and of the
optimizer's state for it (Adam's two moments). A step then runs, one *block* of the model
(a Transformer encoder block, a ResNet stage, a convolution) at a time:

* forward: an **all-gather** rebuilds the block's whole parameters on every rank, the block
  runs on the rank's share of the batch, and the gathered copy is freed again;
* backward: the block's parameters are gathered once more, its gradients computed, and a
  **reduce-scatter** leaves on rank ``r`` only the *average over the ranks* of block ``r`` of
  the gradient (FSDP divides by ``W`` as it reduces);
* the optimizer steps on the local shards alone: no rank ever holds the whole optimizer state.

Since the Trainer back-propagates ``L_r · n_r · W / m`` (see :mod:`divekit.engine.strategies`),
that average is the gradient of the global batch's mean loss, as one process computes it, so
``fsdp`` on ``W`` ranks gives one process's weights. Per rank, parameters, gradients and
optimizer state take about ``1/W`` of one process's bytes (:func:`local_bytes` counts them); only
the block being computed is whole, for a moment (with the root's own parameters, which stay
gathered from the forward pass to the backward pass), which is why the model is sharded block by
block (:func:`shard_units`) and not as one piece.

What differs from one process:

* BatchNorm normalizes over each rank's own share of the batch (its running statistics are
  buffers, which FSDP neither shards nor averages), as under ``ddp`` without ``--sync-bn``;
  a model with BatchNorm is close to, not equal to, one process.
* Validation runs on a whole copy of the weights, gathered on every rank when it starts and
  dropped when training goes on (:meth:`FSDPStrategy.before_validation` says why); training
  itself holds one block (and the root's own parameters) whole at a time.
* FSDP2 shards a parameter as rows of a contiguous tensor and refuses channels_last
  (non-contiguous) parameters, so the weights are made contiguous before sharding; the
  activations stay channels_last (``--channels-last``), and a convolution takes its weight in
  either layout.

Checkpoints go through ``torch.distributed.checkpoint.state_dict``: the sharded model and
optimizer are gathered into one full, CPU-resident state on rank 0 (the same layout as one
process's ``state_dict()``), and a full state is loaded back by broadcasting rank 0's copy
and keeping each rank's shard, so a run saved with ``W`` ranks resumes with any number.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from divekit.engine.distributed import CommCounter, DistEnv
from divekit.engine.strategies import Strategy
from divekit.errors import DivekitError


def fully_shard_fn() -> Any:
    """FSDP2's ``fully_shard``: ``torch.distributed.fsdp`` from torch 2.6, the ``_composable``
    package in 2.4-2.5; a one-line error before that."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4-2.5
        except ImportError:
            raise DivekitError(
                f"--strategy fsdp needs FSDP2's fully_shard (torch >= 2.4); this is torch "
                f"{torch.__version__}: use --strategy ddp"
            ) from None
    return fully_shard


def _state_dict_api() -> Any:
    """``torch.distributed.checkpoint.state_dict`` (torch >= 2.2), or a one-line error."""
    try:
        import torch.distributed.checkpoint.state_dict as api
    except ImportError:
        raise DivekitError(f"--strategy fsdp needs torch.distributed.checkpoint.state_dict, "
                           f"missing from torch {torch.__version__}") from None
    return api


# (the strategy's weak reference, its optimizer step pre-hook's handle)
_HOOKS: list[tuple[weakref.ref, Any]] = []


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP gathers one at a time, outermost first, besides the root.

    * every element of an ``nn.ModuleList`` (the Transformer's and BERT's ``blks``);
    * every child with parameters of an ``nn.Sequential`` that is the model or one of its
      children: the zoo's ``Classifier(features, head)`` gives ResNet's stages, VGG's blocks,
      LeNet's convolutions and dense layers.

    A candidate inside one already chosen stays in its block. What no block holds (embeddings,
    a head's small layers) goes with the root's group. The root's group is gathered for the
    whole forward pass, so the model's peak is one block plus the root's parameters.
    """
    candidates: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def add(name: str, module: nn.Module) -> None:
        if id(module) not in seen and _has_params(module) and module is not model:
            seen.add(id(module))
            candidates.append((name, module))

    tops = [("", model)] + [(n, c) for n, c in model.named_children()]
    for name, parent in model.named_modules():
        if isinstance(parent, nn.ModuleList) or (
            isinstance(parent, nn.Sequential) and any(parent is t for _, t in tops)
        ):
            for child_name, child in parent.named_children():
                add(f"{name}.{child_name}" if name else child_name, child)
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in candidates:  # named_modules is pre-order: parents come first
        if not any(name.startswith(outer + ".") for outer, _ in chosen):
            chosen.append((name, module))
    return [m for _, m in chosen]


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (shapes and
    dtypes, no storage): ``copy.deepcopy`` with every tensor of the model swapped for an empty
    one, so the copy costs no memory until ``to_empty`` gives it some."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _local(t: Tensor) -> Tensor:
    """The rank's own part of a DTensor (FSDP's sharded parameters), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this process holds.

    For FSDP's sharded parameters (DTensors) only the local shard's storage counts (padding
    included: a dim-0 that does not split evenly is padded to a multiple of ``W``); every
    storage is counted once. Call it after an optimizer step (gradients and state exist)."""
    def storage_bytes(tensors: list[Tensor]) -> int:
        storages: dict[int, int] = {}
        for t in tensors:
            local = _local(t)
            s = local.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())

    params = list(model.parameters())
    out = {"params": storage_bytes(params),
           "grads": storage_bytes([p.grad for p in params if p.grad is not None])}
    if optimizer is not None:
        out["optimizer"] = storage_bytes([v for state in optimizer.state.values()
                                          for v in state.values() if isinstance(v, Tensor)])
    return out


class FSDPStrategy(Strategy):
    """Each block, then the root, wrapped by ``fully_shard`` on a 1-D DeviceMesh of the ranks.

    The Trainer builds the optimizer after this constructor, so it holds the sharded
    parameters (DTensors) and steps on the local shards only.
    """

    name = "fsdp"
    sharded = True  # each rank holds 1/W of every parameter: gathered for checkpoints

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        fully_shard = fully_shard_fn()
        from torch.distributed.device_mesh import init_device_mesh

        device = next(model.parameters()).device
        if device.type != "cuda":
            self._check_gloo_collectives(device)
        for p in model.parameters():  # FSDP2 shards rows of contiguous tensors (module doc)
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        # start from rank 0's replica, as every divekit strategy does
        self._broadcast(list(model.parameters()) + list(model.buffers()))
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._template = _meta_copy(model)  # validation's whole replica, without storage
        self._replica: nn.Module | None = None
        self.mesh = init_device_mesh(device.type, (env.world_size,))
        self.units = shard_units(model)
        for unit in self.units:
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        self._unfuse_optimizer()

    def _unfuse_optimizer(self) -> None:
        """Run the optimizer built next (by the Trainer) without its fused kernel, which DTensor
        lacks for SGD (``aten._fused_sgd_`` has no sharding rule); the foreach kernel steps the
        local shards with the same update rule. A global step pre-hook turns ``fused`` off in
        the groups holding this model's parameters before every step (a loaded optimizer
        state may turn it on again). Once the strategy is gone its hook does nothing, and the
        next strategy removes it (a hook cannot be removed while the hooks run)."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        for owner_ref, old in list(_HOOKS):
            if owner_ref() is None:
                old.remove()
                _HOOKS.remove((owner_ref, old))
        owner = weakref.ref(self)
        ids = {id(p) for p in self.model.parameters()}

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if owner() is None:
                return
            for group in optimizer.param_groups:
                if group.get("fused") and any(id(p) in ids for p in group["params"]):
                    group["fused"] = False

        _HOOKS.append((owner, register_optimizer_step_pre_hook(hook)))

    @staticmethod
    def _check_gloo_collectives(device: torch.device) -> None:
        """FSDP2 on the CPU needs gloo's reduce-scatter and all-gather of flat tensors (with
        the average, ``ReduceOp.AVG``, that FSDP asks for in fp32); older gloo lacks them."""
        world = dist.get_world_size()
        try:
            out = torch.zeros(1, device=device)
            dist.reduce_scatter_tensor(out, torch.ones(world, device=device),
                                       op=dist.ReduceOp.AVG)
            gathered = torch.zeros(world, device=device)
            dist.all_gather_into_tensor(gathered, out)
        except (RuntimeError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DivekitError(
                f"--strategy fsdp on the CPU needs gloo's reduce_scatter/all_gather, which torch "
                f"{torch.__version__} lacks ({first}); use --strategy ddp or a newer torch"
            ) from None
        if not torch.allclose(gathered, torch.ones(world)):
            raise DivekitError(f"gloo's reduce-scatter average is wrong in torch "
                               f"{torch.__version__}; use --strategy ddp")

    def reduce_gradients(self) -> None:
        """Nothing to do (FSDP reduce-scattered every block's gradients during the backward
        pass); with ``--profile-comm`` the step's traffic is counted by the ring model, as for
        ``ddp``: an all-gather of the parameters for the forward pass, another for the backward
        pass and a reduce-scatter of the gradients, each sending ``(W-1)/W`` of their bytes."""
        if self.counter is not None:
            world = self.env.world_size
            self.counter.add(round(3 * (world - 1) / world * self.param_bytes))

    # ------------------------------------------------------------ validation
    def before_validation(self) -> None:
        """Gather the whole weights on every rank into a plain replica of the model.

        FSDP's forward pass is collective (each block's all-gather waits for every rank), but
        validation need not be: a task's held-out data may split into a different number of
        batches per rank, or not split at all (rank 0 then validates alone while the others
        wait), and either would deadlock. The replica holds the parameters and buffers only (no
        gradients, no optimizer state) and is dropped when training resumes."""
        api = _state_dict_api()
        state = api.get_model_state_dict(self.model, options=self._options())  # all ranks
        device = next(iter(state.values())).device if state else torch.device("cpu")
        replica = copy.deepcopy(self._template).to_empty(device=device)
        replica.load_state_dict(state)
        del state
        live = dict(self.model.named_buffers())  # buffers are not sharded: BatchNorm's stats,
        with torch.no_grad():  # and the non-persistent ones a state dict leaves out
            for name, buffer in replica.named_buffers():
                buffer.copy_(live[name])
        self._replica = replica

    @property
    def eval_model(self) -> nn.Module:
        return self._replica if self._replica is not None else self.model

    def before_forward(self) -> None:
        self._replica = None

    # ------------------------------------------------------------ gradient clipping
    def clip_grad_norm_(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: each rank adds the squares
        of its gradient shards, an all-reduce sums them, and every rank scales its shards by
        the same ``max_norm / (‖g‖ + 1e-6)`` (at most 1)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        device = _local(grads[0]).device
        sharded = torch.zeros((), device=device, dtype=torch.float32)
        replicated = torch.zeros((), device=device, dtype=torch.float32)
        for g in grads:
            sq = _local(g).detach().float().pow(2).sum()
            if hasattr(g, "to_local"):
                sharded += sq
            else:  # a parameter left whole on every rank counts once
                replicated += sq
        total = sharded + replicated / self.env.world_size
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        coef = torch.clamp(max_norm / (total.sqrt() + 1e-6), max=1.0)
        for g in grads:
            _local(g).detach().mul_(coef.to(_local(g).dtype))

    # ------------------------------------------------------------ checkpoints
    def _options(self, **kw: Any) -> Any:
        return _state_dict_api().StateDictOptions(full_state_dict=True, **kw)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model gathered on rank 0, on the CPU (``{}`` on the other ranks), keyed as
        one process's ``state_dict()``. Collective."""
        api = _state_dict_api()
        state = api.get_model_state_dict(self.model, options=self._options(cpu_offload=True))
        return state if self.env.is_main else {}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Rank 0's full state broadcast to every rank, each keeping its shard. Collective."""
        api = _state_dict_api()
        state = {k: v.contiguous() for k, v in state.items()} if self.env.is_main else {}
        api.set_model_state_dict(self.model, state,
                                 options=self._options(broadcast_from_rank0=True))

    def _param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The parameters' names in the optimizer's order: the order behind the integer ids of
        one process's ``optimizer.state_dict()``."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        names = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in name_of:
                    raise DivekitError("--strategy fsdp: the optimizer holds a parameter that is "
                                       "not the model's")
                names.append(name_of[id(p)])
        return names

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole optimizer state on rank 0 (``{}`` elsewhere) in one process's layout
        (parameters numbered in the optimizer's order), so that a plain
        ``optimizer.load_state_dict`` resumes it with one process. Collective."""
        api = _state_dict_api()
        full = api.get_optimizer_state_dict(self.model, optimizer,
                                            options=self._options(cpu_offload=True))
        if not self.env.is_main:
            return {}
        index = {name: i for i, name in enumerate(self._param_names(optimizer))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        state = {index[n]: s for n, s in full["state"].items()}
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """A whole optimizer state (one process's layout, from any number of ranks) loaded into
        the sharded optimizer: rank 0's copy is broadcast, each rank keeps its shards."""
        api = _state_dict_api()
        full: dict[str, Any] = {}
        if self.env.is_main:
            names = self._param_names(optimizer)
            if len(state["param_groups"]) != len(optimizer.param_groups) or sum(
                    len(g["params"]) for g in state["param_groups"]) != len(names):
                raise DivekitError("the checkpoint's optimizer state does not fit this model's "
                                   "parameter groups")
            # contiguous: a channels_last moment (one process's, saved as it was laid out) would
            # otherwise be broadcast and cut into shards in its memory order, not its logical one
            full = {
                "state": {names[int(i)]: {k: v.contiguous() if isinstance(v, Tensor) else v
                                          for k, v in s.items()}
                          for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                 for g in state["param_groups"]],
            }
        api.set_optimizer_state_dict(self.model, optimizer, full,
                                     options=self._options(broadcast_from_rank0=True))
