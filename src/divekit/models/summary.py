"""Reports on the zoo's models: where each layer's shapes, parameters and compute sit, and
which models data parallelism suits.

Layer by layer (:func:`layer_table`), the course's

    for layer in net:
        X = layer(X)
        print(layer.__class__.__name__, 'output shape:', X.shape)

as a function, with parameter and compute counts so one sees where a VGG's parameters sit
(its fully connected layers) and where its compute sits (its convolutions).

Computation per byte of communication (:func:`comm_ratio_table`, ``divekit models
--comm-ratio``): each step of data-parallel training computes a forward and a backward pass per
sample and exchanges one gradient per parameter (4 bytes in float32), whatever the batch. A
model whose training FLOPs per gradient byte are high (convolutions reused over large feature
maps) keeps its workers busy between all-reduces; one whose parameters sit in dense layers
(AlexNet's classifier) spends its time communicating. The course's claim to check: Inception
(GoogLeNet) > ResNet > AlexNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from divekit.errors import DivekitError
from divekit.models.registry import create_model, list_models, model_info

COMMON_INPUT = 224  # ImageNet's size: the course's architectures compared on equal terms


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


def is_chain(model: nn.Module) -> bool:
    """True when the model is its layers applied one after another (every zoo classifier)."""
    return hasattr(model, "layers") or isinstance(model, nn.Sequential)


def branch_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of a model that is not a chain, ``ModuleList``/``ModuleDict`` expanded one
    level (a detector's ``blocks.0``, ``cls_predictors.2``, ...)."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out += [(f"{name}.{k}", c) for k, c in child.named_children()]
        else:
            out.append((name, child))
    return out


def _shape_of(output: object) -> tuple[int, ...]:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return tuple(output[0].shape)
    return ()


def _fail(input_shape: tuple[int, ...], where: str, error: Exception) -> DivekitError:
    shape = "x".join(map(str, input_shape))
    reason = str(error).strip().splitlines()[0]
    return DivekitError(f"input shape {shape} fails at {where}: {reason}")


def branch_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """For models whose forward branches (detectors: a backbone feeding several heads): one
    forward pass, each child's output shape and multiply-adds recorded by hooks, in call order."""
    x = torch.zeros(1, *input_shape)
    from torch.utils.flop_counter import FlopCounterMode  # ~0.1 s to import: only when counting

    counter = FlopCounterMode(display=False)
    rows: dict[str, LayerRow] = {}
    started: dict[str, int] = {}
    current: list[str] = []

    def total() -> int:
        return sum(counter.flop_counts["Global"].values())

    def before(name: str):
        def hook(module: nn.Module, args: object) -> None:
            current.append(name)
            started[name] = total()
        return hook

    def after(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            current.pop()
            macs = (total() - started[name]) // 2
            if name in rows:  # called again: add its compute
                rows[name].macs += macs
            else:
                rows[name] = LayerRow(name, type(module).__name__, _shape_of(output),
                                      count_params(module), macs)
        return hook

    handles = []
    for name, layer in branch_layers(model):
        handles.append(layer.register_forward_pre_hook(before(name)))
        handles.append(layer.register_forward_hook(after(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    except RuntimeError as e:
        where = f"layer {current[-1]}" if current else type(model).__name__
        raise _fail(input_shape, where, e) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(rows.values())


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerRow]:
    """Run one zero batch of ``input_shape`` (C, H, W) through each top-level layer in turn
    (through the whole model with hooks when it is not a chain of layers).

    Raises DivekitError naming the layer that cannot take its input.
    """
    if not is_chain(model):
        return branch_table(model, input_shape)
    x = torch.zeros(1, *input_shape)
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in top_level_layers(model):
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        x = layer(x)
                except RuntimeError as e:
                    raise _fail(input_shape, f"layer {name} ({type(layer).__name__}) whose input is "
                                f"{tuple(x.shape)}", e) from None
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
    w = max([16] + [len(r.name) for r in rows])
    header = f"{'layer':<{w}} {'type':<18} {'output shape':<22} {'params':>12} {'mult-adds':>14}"
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<{w}} {r.kind:<18} {str(r.output_shape):<22} {r.params:>12,} {r.macs:>14,}"
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


# ----------------------------------------------------------------------------- data parallelism
@dataclass(frozen=True)
class CommRatio:
    """One model's row of :func:`comm_ratio_table`."""

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
    """The table ``divekit models --comm-ratio`` prints, one model a line."""
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
