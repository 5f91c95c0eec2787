"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from divekit.errors import UnknownNameError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step", "onecycle")


def build_optimizer(
    params: Iterable, name: str, lr: float, *, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``params`` may be parameters or parameter groups (fine-tuning gives the head its own lr).

    The optimizer runs its fused implementation (one kernel over all the parameters, torch >=
    2.4 on CPU and CUDA) where the parameters' device and dtype allow it, else the default
    one: the same update rule either way, without a per-parameter loop of small ops."""
    if name not in OPTIMIZERS:
        raise UnknownNameError("optimizer", name, OPTIMIZERS)
    # lists, not generators: a refused fused attempt must leave them for the second one
    params = [dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor)
                   else list(g["params"])) if isinstance(g, dict) else g for g in params]
    cls, kw = {
        "sgd": (torch.optim.SGD, {"momentum": momentum}),
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
    }[name]
    try:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # device, dtype or torch build without it
        return cls(params, lr=lr, weight_decay=weight_decay, **kw)


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The schedule as a pure function of the global step, so resuming needs only the step.

    ``cosine``: half a cosine from 1 to 0 over the run; ``step``: ×0.1 at 50% and 75%;
    ``onecycle``: linear warm-up over the first 30% then cosine down. A linear warm-up over
    ``warmup_steps`` multiplies any of them.
    """
    total = max(total_steps, 1)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    t = min(step / total, 1.0)
    if name == "none":
        base = 1.0
    elif name == "cosine":
        base = 0.5 * (1.0 + math.cos(math.pi * t))
    elif name == "step":
        base = 0.1 ** ((t >= 0.5) + (t >= 0.75))
    elif name == "onecycle":
        base = t / 0.3 if t < 0.3 else 0.5 * (1.0 + math.cos(math.pi * (t - 0.3) / 0.7))
        base = max(base, 1e-3)
    else:
        raise UnknownNameError("scheduler", name, SCHEDULERS)
    return warm * base


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> LambdaLR:
    """A per-step LambdaLR; stepping it once per optimizer step. Its ``plan`` (name, total and
    warm-up steps) is part of its state_dict, so a resume can tell that the schedule it loads
    was planned for another length (:meth:`divekit.engine.trainer.Trainer.restore`)."""
    lr_multiplier(name, 0, total_steps, warmup_steps)  # validate the name now
    sched = LambdaLR(optimizer, lambda step: lr_multiplier(name, step, total_steps, warmup_steps))
    sched.plan = {"name": name, "total_steps": total_steps, "warmup_steps": warmup_steps}
    return sched
