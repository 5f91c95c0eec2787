"""Gradient clipping by global norm, the course's ``grad_clipping``.

``g <- min(1, theta / ||g||) g`` where ``||g||`` is the L2 norm of all gradients taken together,
so the update's direction is kept and only its length is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from divekit.errors import DivekitError


def clip_grad_norm(parameters: Tensor | Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the total norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does (and, like
    it, divides by ``norm + 1e-6``). Per-tensor norms come from one fused ``_foreach_norm`` per
    device and dtype; the scaling is one ``_foreach_mul_``.
    """
    if isinstance(max_norm, bool) or not (isinstance(max_norm, int | float) and max_norm >= 0):
        raise DivekitError(f"max_norm must be a number >= 0, got {max_norm!r}")
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not groups:
        return torch.tensor(0.0)
    first_device = next(iter(groups))[0]
    norms = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).to(first_device)
        for grads in groups.values()
    ]
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    if math.isinf(max_norm):
        return total
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), grads in groups.items():
        torch._foreach_mul_(grads, scale.to(device))
    return total
