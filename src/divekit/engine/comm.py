"""Computation per byte of communication: which models data parallelism suits.

Each step of data-parallel training computes a forward and a backward pass per sample and
exchanges one gradient per parameter (4 bytes in float32), whatever the batch. A model whose
training FLOPs per gradient byte are high (convolutions reused over large feature maps) keeps
its workers busy between all-reduces; one whose parameters sit in dense layers (AlexNet's
classifier) spends its time communicating. The course's claim to check: Inception (GoogLeNet)
> ResNet > AlexNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from divekit.models import create_model, model_info

COMMON_INPUT = 224  # ImageNet's size: the course's architectures compared on equal terms


@dataclass(frozen=True)
class CommRatio:
    name: str
    params: int
    gradient_bytes: int  # exchanged per step (float32)
    train_flops: int  # forward + backward, one sample at the model's default input
    train_flops_224: int  # the same at 224×224
    gradient_bytes_224: int  # differs from gradient_bytes only where the head depends on size

    @property
    def ratio(self) -> float:
        """Training FLOPs per sample per byte of gradient, at the default input."""
        return self.train_flops / self.gradient_bytes

    @property
    def ratio_224(self) -> float:
        return self.train_flops_224 / self.gradient_bytes_224


def training_flops(name: str, shape: tuple[int, int, int], num_classes: int = 10) -> tuple[int, int]:
    """``(FLOPs of forward + backward for one sample, trainable parameters)``.

    Counted by ``torch.utils.flop_counter`` on the meta device: shapes only, no arithmetic, so
    even VGG at 224×224 costs milliseconds.
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=shape[0])
        x = torch.zeros(2, *shape)  # two samples: BatchNorm needs more than one in training
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counter.get_total_flops() // 2, params


def comm_ratio_table(names: list[str] | None = None) -> list[CommRatio]:
    """Every image classifier of ``names``, best FLOPs per gradient byte (at 224×224) first."""
    from divekit.models import list_models

    rows = []
    for name in names if names is not None else list_models("classify"):
        info = model_info(name)
        if info.task != "classify" or info.input_shape is None:
            continue
        flops, params = training_flops(name, info.input_shape)
        flops_224, params_224 = training_flops(name, (info.input_shape[0], COMMON_INPUT, COMMON_INPUT))
        rows.append(CommRatio(name, params, 4 * params, flops, flops_224, 4 * params_224))
    return sorted(rows, key=lambda r: r.ratio_224, reverse=True)


def format_comm_ratio(rows: list[CommRatio]) -> str:
    lines = [
        "training FLOPs (forward + backward, per sample) per byte of float32 gradient exchanged",
        f"{'name':<14} {'params':>12} {'grad MB':>9} {'input':>9} {'FLOP/B':>8} {'FLOP/B@224':>11}",
    ]
    for r in rows:
        shape = "x".join(map(str, model_info(r.name).input_shape or ()))
        lines.append(f"{r.name:<14} {r.params:>12,} {r.gradient_bytes / 1e6:>9.2f} {shape:>9} "
                     f"{r.ratio:>8.1f} {r.ratio_224:>11.1f}")
    lines.append("per step and worker: multiply by the per-worker batch; higher = less time "
                 "waiting on the all-reduce")
    return "\n".join(lines)
