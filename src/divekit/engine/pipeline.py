"""Pipeline model parallelism (``--strategy pipeline``) on ``torch.distributed.pipelining``.

A model too big for one device can be cut, layer by layer, into ``S`` *stages*, one per process:
rank ``s`` runs stage ``s`` and sends its activations to rank ``s+1``; in the backward pass the
gradients flow back the same way. Run naively, only one stage works at a time. GPipe (Huang et
al., 2019) splits each batch of ``N`` samples into ``M`` *microbatches*: while stage 1 works on
microbatch 1, stage 0 already runs microbatch 2. Every stage still waits while the pipeline
fills and drains, an idle share of the step (the *bubble*) of

    (S - 1) / (M + S - 1),

so more microbatches mean a smaller bubble (and smaller, less efficient matrix products).
``gpipe`` runs all ``M`` forwards, then all ``M`` backwards (it keeps ``M`` microbatches'
activations); ``1f1b`` (PipeDream-Flush) starts each microbatch's backward as soon as it can,
alternating one forward and one backward, so a stage holds at most ``S`` microbatches'
activations, with the same bubble.

How divekit uses PyTorch's pipelining here:

* **Cutting the model.** The model is read as a chain of *pieces* (:func:`model_pieces`): the
  zoo's :class:`~divekit.models.base.Classifier` is its ``features`` then ``head`` layers, an
  ``nn.Sequential`` its children, a Transformer or BERT encoder its embedding then one piece per
  block. The chain is cut at piece boundaries into ``S`` runs of about equal parameter count
  (:func:`balance`). Only the first piece takes several inputs (tokens and segments); after it
  one tensor flows from piece to piece.
* **Every rank holds the whole model** (built from the same seed, so the same initial weights)
  but runs, and updates, only its stage: its optimizer sees gradients on its stage's
  parameters only; the others keep ``grad = None`` and the optimizer skips them. Before
  validation and checkpoints each stage's parameters and buffers are broadcast from their
  owner, so every rank then holds the whole current model (``sharded``); the optimizer's state
  is gathered the same way.
* **Every rank reads the whole batch** (``shards_data = False``): the first stage feeds the
  inputs, the last compares the output with the targets (the task's
  :meth:`~divekit.engine.task.Task.pipeline_split` and
  :meth:`~divekit.engine.task.Task.pipeline_loss` say which is which).
* **Exactly the batch's mean loss.** The batch is cut into ``M`` equal microbatches of
  ``c = ⌈N/M⌉`` rows (fewer when ``N`` is small); a last microbatch short of rows is padded
  with copies of the first sample, and the loss skips the padding rows. Microbatch ``j`` with
  ``n_j`` real rows contributes ``mean_j · n_j / N``, so the summed gradients are the
  gradient of the mean over the ``N`` samples, as one process computes it (the schedule's own
  division by ``M`` is switched off). A model without BatchNorm therefore trains as on one
  process, up to float rounding. BatchNorm normalizes each microbatch by its own statistics
  (and the running averages take ``M`` updates per step), so a BatchNorm model trains
  differently, like data parallelism with ``M`` workers without SyncBatchNorm.

Validation runs the whole (gathered) model on every rank, unpipelined. A model that is not a
chain (the encoder–decoder Transformer, whose decoder reads the encoder's output in every
block; BERT with its two pretraining heads) is refused in one line, as is a weight tied across
two stages.

The stages' buffers are allocated for one microbatch shape; a batch of another size (the last
of an epoch) gets its own stages and schedule, kept for the next epoch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from divekit.engine.distributed import CommCounter, DistEnv
from divekit.engine.strategies import Strategy
from divekit.errors import DivekitError

SCHEDULES = ("gpipe", "1f1b")


# ------------------------------------------------------------------ cutting the model
class _Chain(nn.Module):
    """Pieces run one after the other: the first takes every input, the others one tensor.

    Activations travel between stages in the plain (contiguous) layout, which send and receive
    need; a stage of a channels_last model takes its 4-D input back to channels_last
    (``channels_last_in``), so its convolutions run as on one process."""

    def __init__(self, pieces: Sequence[nn.Module]):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.channels_last_in = False  # set for a stage after the first of a channels_last model
        self.contiguous_out = False  # set for every stage but the last

    def forward(self, *inputs: Tensor) -> Tensor:
        if self.channels_last_in:
            inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4
                           else x for x in inputs)
        x = self.pieces[0](*inputs)
        for piece in self.pieces[1:]:
            x = piece(x)
        return x.contiguous() if self.contiguous_out else x


class _TransformerEmbedding(nn.Module):
    """A :class:`~divekit.models.transformer.TransformerEncoder`'s input: embedding × √d plus
    the positional encoding (no padding mask: the blocks attend to every position)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.embedding, self.pos_encoding = encoder.embedding, encoder.pos_encoding
        self.scale = math.sqrt(encoder.num_hiddens)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.pos_encoding(self.embedding(tokens.long()) * self.scale)


class _BertEmbedding(nn.Module):
    """A :class:`~divekit.models.bert.BertEncoder`'s input: token + segment + position
    embeddings, normalized, then dropout (the encoder's own modules and parameter, shared)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.token_embedding = encoder.token_embedding
        self.segment_embedding = encoder.segment_embedding
        self.pos_embedding = encoder.pos_embedding  # the same Parameter, registered here too
        self.embed_norm, self.dropout = encoder.embed_norm, encoder.dropout

    def forward(self, tokens: Tensor, segments: Tensor | None = None) -> Tensor:
        if segments is None:
            segments = torch.zeros_like(tokens)
        x = self.token_embedding(tokens) + self.segment_embedding(segments)
        return self.dropout(self.embed_norm(x + self.pos_embedding[: tokens.shape[1]]))


class _Block(nn.Module):
    """An encoder block called on the hidden states alone (no padding mask)."""

    def __init__(self, block: nn.Module, extra_none: int):
        super().__init__()
        self.block, self.extra_none = block, extra_none

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, *([None] * self.extra_none))


def model_pieces(model: nn.Module) -> list[nn.Module]:
    """``model`` as a chain of pieces whose composition is ``model``'s forward.

    Known shapes: a module with its own ``pipeline_pieces()``, the zoo's ``Classifier``
    (``features`` then ``head``), ``nn.Sequential`` (children, expanded), the Transformer and
    BERT encoders (embedding, then one piece per block). Anything else is one piece."""
    from divekit.models.base import Classifier
    from divekit.models.bert import BertEncoder
    from divekit.models.transformer import TransformerEncoder

    if hasattr(model, "pipeline_pieces"):
        return list(model.pipeline_pieces())
    if isinstance(model, Classifier):
        return [*model_pieces(model.features), *model_pieces(model.head)]
    if isinstance(model, nn.Sequential):
        return [p for child in model for p in model_pieces(child)]
    if isinstance(model, TransformerEncoder):
        return [_TransformerEmbedding(model), *(_Block(b, 1) for b in model.blks)]
    if isinstance(model, BertEncoder):
        return [_BertEmbedding(model), *(_Block(b, 2) for b in model.blks)]
    return [model]


def balance(costs: Sequence[float], stages: int) -> list[tuple[int, int]]:
    """Cut ``costs`` (one per piece, in order) into ``stages`` non-empty runs ``[a, b)`` whose
    largest total is as small as possible (dynamic programming over the cut points: the
    slowest stage sets the pipeline's pace)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise DivekitError(f"cannot cut {n} pieces into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-run over cutting the first i pieces into k runs
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    runs, i = [], n
    for k in range(stages, 0, -1):
        runs.append((cut[k][i], i))
        i = cut[k][i]
    return runs[::-1]


@torch.no_grad()
def piece_flops(pieces: Sequence[nn.Module], example: tuple[Tensor, ...]) -> list[float] | None:
    """The forward FLOPs of each piece on ``example`` (one microbatch), counted by
    ``torch.utils.flop_counter`` in eval mode (no statistic moves); None where it is missing.
    A convolution's cost grows with its feature map, which its parameter count ignores: the
    early layers of a CNN have few parameters and most of the work."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    flops, x = [], example
    for piece in pieces:
        was = piece.training
        piece.eval()
        try:
            with FlopCounterMode(display=False) as counter:
                out = piece(*x)
        finally:
            piece.train(was)
        flops.append(float(counter.get_total_flops()))
        x = (out,)
    return flops


def split_model(model: nn.Module, stages: int,
                example: tuple[Tensor, ...] | None = None) -> list[_Chain]:
    """``model`` cut into ``stages`` modules of about equal cost, in order; they share their
    parameters with ``model``. A piece costs its forward FLOPs on ``example`` when given (and
    countable), else its parameter count; plus one (a layer with neither still takes time)."""
    pieces = model_pieces(model)
    if len(pieces) == 1 and stages > 1:
        raise DivekitError(
            f"--strategy pipeline cannot cut {type(model).__name__}: it is not a chain of layers "
            "(a zoo classifier, an nn.Sequential, a Transformer or BERT encoder stack)")
    if len(pieces) < stages:
        raise DivekitError(
            f"--strategy pipeline: {type(model).__name__} has {len(pieces)} layer(s) to cut at, "
            f"fewer than the {stages} stages asked for"
        )
    flops = piece_flops(pieces, example) if example is not None else None
    costs = [1 + (flops[i] if flops is not None
                  else sum(p.numel() for p in piece.parameters()))
             for i, piece in enumerate(pieces)]
    chains = [_Chain(pieces[a:b]) for a, b in balance(costs, stages)]
    owners: dict[int, int] = {}
    for s, chain in enumerate(chains):
        for name, p in chain.named_parameters():
            if owners.setdefault(id(p), s) != s:
                raise DivekitError(
                    f"--strategy pipeline cannot cut {type(model).__name__} into {stages} "
                    f"stages: a parameter is shared by stages {owners[id(p)]} and {s} "
                    f"(tied weights, {name}); use fewer stages or untie it")
    covered = set(owners)
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise DivekitError(
            f"--strategy pipeline cannot cut {type(model).__name__}: it is not a chain of "
            f"layers (parameters outside the chain: {', '.join(missed[:3])})"
        )
    return chains


# ------------------------------------------------------------------ the strategy
def _kwargs_accepted(fn: Callable, **options: Any) -> dict[str, Any]:
    """The ``options`` that ``fn`` takes (a keyword added in a later torch is left out)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in names}


def _take(targets: Any, rows: Tensor) -> Any:
    """``targets`` (a tensor, or a tuple/list/dict of them) at ``rows``."""
    if isinstance(targets, Tensor):
        return targets[rows]
    if isinstance(targets, (tuple, list)):
        return type(targets)(_take(t, rows) for t in targets)
    if isinstance(targets, dict):
        return {k: _take(v, rows) for k, v in targets.items()}
    return targets


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with ``rows`` copies of its first row appended, in ``x``'s memory format."""
    if rows == 0:
        return x
    padded = torch.cat([x, x[:1].expand(rows, *x.shape[1:])])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


class PipelineStrategy(Strategy):
    """Rank ``s`` runs stage ``s`` of ``S`` under ``ScheduleGPipe`` or ``Schedule1F1B``."""

    name = "pipeline"
    shards_data = False  # every rank reads the whole batch: inputs first, targets last
    sharded = True  # each rank's copy is current for its own stage only

    def __init__(self, model: nn.Module, env: DistEnv, counter: CommCounter | None = None,
                 config: Any = None):
        super().__init__(model, env, counter, config)
        try:
            from torch.distributed import pipelining
        except ImportError:
            raise DivekitError("--strategy pipeline needs torch.distributed.pipelining "
                               f"(torch >= 2.4), not torch {torch.__version__}") from None
        self._pipelining = pipelining
        stages = getattr(config, "stages", None) or env.world_size
        if stages != env.world_size:
            raise DivekitError(f"--stages {stages}: the pipeline runs one stage per process; "
                               f"use --stages {env.world_size} (or leave it out) with "
                               f"{env.world_size} processes")
        self.microbatches = int(getattr(config, "microbatches", 4) or 4)
        self.schedule_name = getattr(config, "pipeline_schedule", "gpipe") or "gpipe"
        if self.schedule_name not in SCHEDULES:
            raise DivekitError(f"--pipeline-schedule must be gpipe or 1f1b, "
                               f"got {self.schedule_name!r}")
        self.num_stages = stages
        self.stage_index = env.rank
        self.is_first, self.is_last = env.rank == 0, env.rank == stages - 1
        self.device = next(model.parameters()).device
        # cut by parameter count now (a model that cannot be cut fails here, in one line),
        # then again by FLOPs once the first batch shows the input's shape
        self._cut(split_model(model, stages))
        self._cut_by_flops = True
        self._step: dict[str, Any] = {}

    def _cut(self, chains: list[_Chain]) -> None:
        channels_last = any(m.weight.dim() == 4 and not m.weight.is_contiguous()
                            and m.weight.is_contiguous(memory_format=torch.channels_last)
                            for m in self.model.modules() if isinstance(m, nn.Conv2d))
        for s, chain in enumerate(chains):
            chain.channels_last_in = channels_last and s > 0
            chain.contiguous_out = s < len(chains) - 1
        self.chains = chains
        self._owned = [self._owned_tensors(chain) for chain in chains]
        self._schedules: dict[Any, Any] = {}

    def _owned_tensors(self, chain: nn.Module) -> list[Tensor]:
        """A stage's parameters and buffers (a shared one counted once, in model order)."""
        mine = {id(p) for piece in chain.pieces for p in piece.parameters()}
        mine |= {id(b) for b in chain.buffers()}
        seen: set[int] = set()
        out = []
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) in mine and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    # -------------------------------------------------------------- one step
    def forward_backward(self, task: Any, batch: Any, scale: float,
                         autocast: AbstractContextManager) -> tuple[Tensor, dict[str, Tensor]]:
        self._agree_on_randomness()
        inputs, targets = task.pipeline_split(batch)
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        n = len(inputs[0])
        if n == 0:
            raise DivekitError("--strategy pipeline got an empty batch")
        rows = math.ceil(n / self.microbatches)  # per microbatch
        chunks = math.ceil(n / rows)  # ≤ M: no microbatch of padding alone
        padded = tuple(_pad_rows(x, rows * chunks - n) for x in inputs)
        index = torch.arange(rows * chunks, device=self.device)
        self._step = {"task": task, "targets": targets, "n": n, "loss": None, "logs": {},
                      "scale": scale}
        with autocast:
            schedule = self._schedule_for(padded, rows, chunks)
            losses: list[Tensor] = []
            if self.is_first:
                schedule.step(*padded, **self._step_options(index, losses))
            else:
                schedule.step(**self._step_options(index, losses))
        return self._share_logs(task)

    def _agree_on_randomness(self) -> None:
        """Rank 0's random number generator state on every rank, before the task splits the
        batch: a random augmentation or mixup must draw the same on the first stage (which
        uses the inputs) and the last (the targets), though the stages' dropout layers have
        drawn differently. Without dropout every rank is already at rank 0's state and so is
        one process, which the equality with one process relies on."""
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        flat = torch.cat(states).to(self.device)
        dist.broadcast(flat, src=0)
        flat = flat.cpu()
        torch.set_rng_state(flat[: len(states[0])].clone())
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(flat[len(states[0]):].clone(), self.device)

    def _step_options(self, index: Tensor, losses: list[Tensor]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.is_last:
            options.update(target=index, losses=losses)
        step = self._pipelining.ScheduleGPipe.step
        return {**options, **_kwargs_accepted(step, return_outputs=False)}

    def _loss(self, output: Tensor, index: Tensor) -> Tensor:
        """Microbatch ``index``'s share of the batch's mean loss: its mean over the real rows
        times ``n_j / N`` (padding rows, ``index ≥ N``, left out)."""
        step = self._step
        n = step["n"]
        keep = index < n
        real = int(keep.sum())
        if real == 0:  # never with chunks = ⌈N / rows⌉, kept for safety
            return output.sum() * 0.0
        out = output if real == len(index) else output[keep]
        loss, logs = step["task"].pipeline_loss(out, _take(step["targets"], index[keep]))
        share = real / n
        total = step["loss"]
        step["loss"] = loss.detach().float() * share + (0 if total is None else total)
        for k, v in logs.items():
            v = v.detach().float() * share
            step["logs"][k] = step["logs"][k] + v if k in step["logs"] else v
        scaled = loss * share
        return scaled * step["scale"] if step["scale"] != 1 else scaled

    def _share_logs(self, task: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The last stage's loss and logs, on every rank (the Trainer logs from each)."""
        step = self._step
        box: list[Any] = [None]
        if self.is_last:
            box = [(float(step["loss"]), {k: v.tolist() for k, v in step["logs"].items()})]
        dist.broadcast_object_list(box, src=self.num_stages - 1)
        loss, logs = box[0]
        self._step = {}
        return (torch.tensor(loss, device=self.device),
                {k: torch.tensor(v, device=self.device) for k, v in logs.items()})

    def _schedule_for(self, padded: tuple[Tensor, ...], rows: int, chunks: int) -> Any:
        """This rank's stage and schedule for microbatches shaped as ``padded``'s ``rows``
        (built once per shape: the stage's receive buffers are sized for it)."""
        example = tuple(x[:rows] for x in padded)
        if self._cut_by_flops:  # the same shapes on every rank: the same cut
            self._cut_by_flops = False
            self._cut(split_model(self.model, self.num_stages, example))
        key = (chunks, tuple((tuple(x.shape), x.dtype, x.stride()) for x in example))
        if key not in self._schedules:
            stage_in, stage_out = self._probe(example)
            stage = self._pipelining.PipelineStage(
                self.chains[self.stage_index], self.stage_index, self.num_stages, self.device,
                input_args=stage_in, output_args=stage_out)
            kind = self.schedule_name
            if kind == "1f1b" and chunks < self.num_stages:
                kind = "gpipe"  # 1F1B needs M ≥ S; a small batch runs as GPipe (same result)
            cls = (self._pipelining.Schedule1F1B if kind == "1f1b"
                   else self._pipelining.ScheduleGPipe)
            self._schedules[key] = cls(stage, chunks, loss_fn=self._loss,
                                       **_kwargs_accepted(cls.__init__, scale_grads=False))
        return self._schedules[key]

    @torch.no_grad()
    def _probe(self, example: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor]:
        """This stage's input and output for one microbatch, by running the stages up to this
        one locally (every rank holds the whole model) in eval mode: shapes and dtypes only,
        so no BatchNorm statistic moves and no random number is drawn."""
        was = self.model.training
        self.model.eval()
        try:
            x: tuple[Tensor, ...] = example
            for chain in self.chains[: self.stage_index + 1]:
                stage_in, out = x, chain(*x)
                x = (out,)
        finally:
            self.model.train(was)
        # the activations that travel between stages carry gradients (the probe ran without)
        def carries(t: Tensor, travels: bool) -> Tensor:
            return t.detach().requires_grad_(travels and t.is_floating_point())

        first, last = self.stage_index == 0, self.stage_index == self.num_stages - 1
        return tuple(carries(t, not first) for t in stage_in), carries(out, not last)

    # -------------------------------------------------------------- the whole model
    def clip_grad_norm_(self, max_norm: float) -> None:
        """The norm over every stage's gradients (each rank holds its stage's), then every
        stage scales its own by ``max_norm / (norm + 1e-6)`` when that is below 1, as
        ``torch.nn.utils.clip_grad_norm_`` does on one process."""
        grads = [p.grad for p in self._owned[self.stage_index]
                 if isinstance(p, nn.Parameter) and p.grad is not None]
        local = (torch.stack([g.detach().float().norm() for g in grads]).square().sum()
                 if grads else torch.zeros((), device=self.device))
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        coef = torch.clamp(max_norm / (local.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))

    def _gather_model(self) -> None:
        """Every stage's parameters and buffers from their owner: the whole current model on
        every rank."""
        for s, tensors in enumerate(self._owned):
            for dtype in sorted({t.dtype for t in tensors}, key=str):  # one message per dtype
                group = [t for t in tensors if t.dtype == dtype]
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                dist.broadcast(flat, src=s)
                if self.counter is not None and self.env.rank == s:
                    self.counter.add(flat.numel() * flat.element_size()
                                     * (self.env.world_size - 1))
                offset = 0
                for t in group:
                    t.data.copy_(flat[offset: offset + t.numel()].view(t.shape))
                    offset += t.numel()

    def before_validation(self) -> None:
        self._gather_model()

    def full_state_dict(self) -> dict[str, Tensor]:
        self._gather_model()
        return self.model.state_dict()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state of every stage's parameters, merged: each rank holds the
        state (momentum, Adam's moments) of its own stage's parameters only."""
        state = optimizer.state_dict()
        mine = {k: {n: (v.cpu() if isinstance(v, Tensor) else v) for n, v in entry.items()}
                for k, entry in state["state"].items()}
        merged: dict[Any, Any] = {}
        for part in _all_gather_object(mine):
            merged.update(part)
        return {"state": dict(sorted(merged.items())), "param_groups": state["param_groups"]}


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
