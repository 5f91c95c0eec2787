"""Layer-by-layer shapes, parameters and multiply-adds: the course's

    for layer in net:
        X = layer(X)
        print(layer.__class__.__name__, 'output shape:', X.shape)

as a function, with parameter and compute counts so one sees where a VGG's parameters sit
(its fully connected layers) and where its compute sits (its convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from divekit.errors import DivekitError


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def top_level_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's own ``layers()`` when it has them (every zoo classifier), else its children."""
    if hasattr(model, "layers"):
        return list(model.layers())
    children = list(model.named_children())
    return children or [(type(model).__name__, model)]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """Run one zero batch of ``input_shape`` (C, H, W) through each top-level layer in turn.

    Raises DivekitError naming the layer that cannot take its input.
    """
    x = torch.zeros(1, *input_shape)
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in top_level_layers(model):
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        x = layer(x)
                except RuntimeError as e:
                    shape = "x".join(map(str, input_shape))
                    reason = str(e).strip().splitlines()[0]
                    raise DivekitError(
                        f"input shape {shape} fails at layer {name} ({type(layer).__name__}) "
                        f"whose input is {tuple(x.shape)}: {reason}"
                    ) from None
                rows.append(
                    LayerRow(name, type(layer).__name__, tuple(x.shape), count_params(layer),
                             counter.get_total_flops() // 2)
                )
    finally:
        model.train(was_training)
    return rows


def format_table(rows: list[LayerRow], title: str = "") -> str:
    total_params = sum(r.params for r in rows)
    total_macs = sum(r.macs for r in rows)
    lines = [title] if title else []
    header = f"{'layer':<16} {'type':<18} {'output shape':<22} {'params':>12} {'mult-adds':>14}"
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<16} {r.kind:<18} {str(r.output_shape):<22} {r.params:>12,} {r.macs:>14,}"
        )
    lines.append("-" * len(header))
    lines.append(f"total parameters: {total_params:,}")
    lines.append(f"total multiply-adds per sample: {total_macs:,} ({total_macs / 1e9:.3f} G)")
    if total_params and total_macs:
        top_p = max(rows, key=lambda r: r.params)
        top_m = max(rows, key=lambda r: r.macs)
        lines.append(
            f"most parameters: {top_p.name} ({100 * top_p.params / total_params:.0f}%); "
            f"most compute: {top_m.name} ({100 * top_m.macs / total_macs:.0f}%)"
        )
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"1,224,224"`` → ``(1, 224, 224)``, with a clear error otherwise."""
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise DivekitError(f"--input-shape must be C,H,W with positive integers, got {text!r}")
    return dims  # type: ignore[return-value]
