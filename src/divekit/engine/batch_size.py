"""``--batch-size auto``: the largest minibatch that fits, then the course's cap.

The search doubles the batch until a step no longer fits, then backs off by bisection between
the last size that fitted and the first that did not. "Fits" means:

* on CUDA: a real forward and backward pass at that size raises no out-of-memory error (and,
  with ``--memory-budget``, its peak allocation stays within the budget);
* on the CPU: the estimated memory of a training step stays within the RAM budget
  (``--memory-budget``, default a quarter of the available RAM). The estimate runs the model on
  the ``meta`` device, which computes shapes but no numbers, so even huge batches cost
  milliseconds: parameters + gradients + optimizer state + the activations autograd saves for
  the backward pass + the input batch, plus 20% headroom for temporaries.

Larger batches past a point mostly waste compute per update, so the result is then capped at
about 10 × the number of classes (the course's rule of thumb) unless ``--no-cap``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from divekit.errors import DivekitError

HEADROOM = 1.2
OPTIMIZER_STATES = {"sgd": 1, "adam": 2, "adamw": 2}  # tensors per parameter (momentum; m and v)
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "t": 2**40, "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class BatchSizeChoice:
    batch_size: int
    largest_fitting: int
    reason: str


def parse_memory(text: str | int) -> int:
    """``'2GB'``, ``'512MiB'``, ``'1.5g'`` or a number of bytes → bytes."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise DivekitError(f"--memory-budget must look like 512MB, 2GB or 1.5GiB, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise DivekitError(f"--memory-budget must be positive, got {text!r}")
    return size


def largest_fitting(fits: Callable[[int], bool], *, start: int = 1, limit: int = 1 << 16) -> int:
    """The largest ``b`` in ``[start, limit]`` with ``fits(b)``, for ``fits`` true up to a
    threshold: double until it fails, then bisect between the last success and that failure.
    Raises when even ``start`` does not fit."""
    if not fits(start):
        raise DivekitError(f"not even a batch of {start} fits in the memory available")
    good, bad = start, None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def available_ram() -> int:
    """Bytes of memory a new allocation can have: Linux's ``MemAvailable`` (free memory plus the
    page cache the kernel would drop for it), else the free pages, else 4 GiB. Free pages alone
    are a fraction of it on a machine that has read files: after a test suite, too little for a
    batch of 2."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _meta_step_bytes(model: nn.Module, run: Callable[[nn.Module], int], optimizer: str) -> int:
    """Bytes of one training step: ``run(meta_model)`` does the forward pass on the meta device
    and returns the bytes of its inputs and outputs; the tensors autograd saves for the backward
    pass are counted as they are saved, and weights, gradients and optimizer states added."""
    on_meta = next(model.parameters()).device.type == "meta"
    meta = (model if on_meta else copy.deepcopy(model).to("meta")).train()
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    trainable = sum(p.numel() * p.element_size() for p in meta.parameters() if p.requires_grad)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        io = run(meta)
    states = OPTIMIZER_STATES.get(optimizer, 2)
    return int(HEADROOM * (weights + trainable * (1 + states) + saved + io))


def step_memory(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int,
                optimizer: str = "sgd") -> int:
    """Estimated bytes of one training step at ``batch_size``, from a pass on the meta device."""
    def run(meta: nn.Module) -> int:
        x = torch.empty((batch_size, *sample_shape), device="meta")
        out = meta(x)
        return x.numel() * x.element_size() + out.numel() * out.element_size()

    return _meta_step_bytes(model, run, optimizer)


def _cuda_fits(model: nn.Module, loss_at: Callable[[int], torch.Tensor], device: torch.device,
               budget: int | None) -> Callable[[int], bool]:
    """``fits(b)``: the loss ``loss_at(b)`` of one real batch of ``b``, and its backward pass,
    on ``device`` without running out (and within ``budget`` bytes when given)."""

    def fits(b: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            loss_at(b).backward()
            peak = torch.cuda.max_memory_allocated(device) - base
            return budget is None or peak <= budget
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def choose_batch_size(model: nn.Module, sample_shape: tuple[int, ...], num_classes: int,
                      **options: Any) -> BatchSizeChoice:
    """The batch size for ``--batch-size auto`` of a classifier of ``num_classes`` classes on
    inputs shaped ``sample_shape``, and the sentence that explains it: :func:`choose_batch_size_for`
    with a batch of images and labels and the cross-entropy as its step, the CPU estimate
    counting the inputs and the logits (:func:`step_memory`). ``options`` are
    :func:`choose_batch_size_for`'s (``device``, ``memory_budget``, ``cap``, ``max_batch``,
    ``optimizer``)."""
    sample = (torch.zeros((1, *sample_shape)), torch.zeros(1, dtype=torch.long))

    def step(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]).float(), batch[1])

    def estimate(meta: nn.Module, b: int, optimizer: str) -> int:
        return step_memory(meta, sample_shape, b, optimizer)

    return choose_batch_size_for(model, sample, step, num_classes=num_classes,
                                 estimate=estimate, **options)


def _choice(fits: Callable[[int], bool], where: str, num_classes: int | None, cap: bool,
            max_batch: int) -> BatchSizeChoice:
    found = largest_fitting(fits, start=min(2, max_batch), limit=max_batch)  # BatchNorm needs 2
    reason = f"largest batch fitting {where}: {found}"
    limit = 10 * num_classes if num_classes else None
    if cap and limit is not None and found > limit:
        return BatchSizeChoice(limit, found, f"{reason}; capped at 10 × {num_classes} classes = {limit} (--no-cap to lift)")
    return BatchSizeChoice(found, found, reason)


# ---------------------------------------------------------------- any batch, any loss
Step = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def batch_of(sample: tuple[torch.Tensor, ...], b: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``b`` rows shaped (and typed) like ``sample``'s: empty on the meta device, else the first
    row repeated (real token ids and labels, so that embeddings and losses accept them)."""
    if torch.device(device).type == "meta":
        return tuple(torch.empty((b, *t.shape[1:]), dtype=t.dtype, device="meta") for t in sample)
    # the copies are made where they are used: a large batch of images never sits in host RAM
    return tuple(t[:1].to(device).expand(b, *t.shape[1:]).contiguous() for t in sample)


def step_memory_of(model: nn.Module, sample: tuple[torch.Tensor, ...], step: Step, batch_size: int,
                   optimizer: str = "sgd") -> int:
    """:func:`step_memory` for a model that takes several tensors (token ids, segments,
    lengths, labels): ``step(model, batch)`` gives the loss, run on the meta device."""
    def run(meta: nn.Module) -> int:
        batch = batch_of(sample, batch_size, "meta")
        step(meta, batch)
        return sum(t.numel() * t.element_size() for t in batch)

    return _meta_step_bytes(model, run, optimizer)


def choose_batch_size_for(
    model: nn.Module,
    sample: tuple[torch.Tensor, ...],
    step: Step,
    *,
    num_classes: int | None,
    device: torch.device | str = "cpu",
    memory_budget: str | int | None = None,
    cap: bool = True,
    max_batch: int = 1 << 16,
    optimizer: str = "sgd",
    estimate: Callable[[nn.Module, int, str], int] | None = None,
) -> BatchSizeChoice:
    """The batch size for ``--batch-size auto`` of any task, and the sentence that explains it:
    ``sample`` is a batch of one or more rows of the task's tensors and ``step(model, batch)``
    its training loss. The cap (10 × classes) applies where the task has classes
    (``num_classes``). On CUDA a real step of ``b`` rows (the first row repeated) must fit the
    memory (and ``memory_budget``); on the CPU the estimate of a step on the meta device must fit
    the RAM budget (``memory_budget``, default a quarter of the free RAM). ``estimate(meta_model,
    b, optimizer)`` replaces that estimate (default :func:`step_memory_of`)."""
    device = torch.device(device)
    budget = parse_memory(memory_budget) if memory_budget is not None else None
    if device.type == "cuda":
        model = model.to(device).train()
        fits = _cuda_fits(model, lambda b: step(model, batch_of(sample, b, device)), device,
                          budget)
        where = f"CUDA memory{f' within {budget / 2**20:.0f} MiB' if budget else ''}"
    else:
        ram = budget if budget is not None else available_ram() // 4
        meta = copy.deepcopy(model).to("meta")
        bytes_at = estimate or (lambda m, b, opt: step_memory_of(m, sample, step, b, opt))
        fits = lambda b: bytes_at(meta, b, optimizer) <= ram  # noqa: E731
        where = f"a CPU RAM budget of {ram / 2**20:.0f} MiB" + ("" if budget else " (a quarter of free RAM)")
    return _choice(fits, where, num_classes, cap, max_batch)
