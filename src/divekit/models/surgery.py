"""Model surgery for fine-tuning: freeze stages, replace the head, group parameters.

The course: a network is a feature extractor plus a linear classifier. Copy a model trained on
a large source dataset, replace the output layer for the target's classes (fresh
initialisation), train the new layer with a large learning rate and the copied layers with a
small one, optionally freezing the bottom layers (low-level features are the most general).

Every zoo classifier is ``features`` (an ``nn.Sequential`` of stages) then ``head``; a
torchvision classifier is split the same way by :func:`torchvision_classifier`, so everything
here works on both. "Freeze the first N stages" means the first N children of ``features``.

This module only reshapes and regroups a model; it reads no files (weights files are
:mod:`divekit.weights`'s) and trains nothing (the fine-tuning task,
:mod:`divekit.tasks.finetune`, puts the pieces together for the engine).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.models.base import Classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_PREFIX = "torchvision:"


# ----------------------------------------------------------------------------- freezing
def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stages of ``model.features``, bottom (input side) first."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "head"):
        raise DivekitError(f"{type(model).__name__} has no features/head split to fine-tune")
    return list(features.named_children())


def freeze_stages(model: nn.Module, n: int) -> list[str]:
    """``requires_grad = False`` on the first ``n`` stages; returns their names."""
    parts = stages(model)
    if not 0 <= n <= len(parts):
        names = ", ".join(name for name, _ in parts)
        raise DivekitError(f"--freeze must be in 0..{len(parts)} (the stages: {names}), got {n}")
    for _, stage in parts[:n]:
        stage.requires_grad_(False)
    return [name for name, _ in parts[:n]]


def frozen_to_eval(model: nn.Module, n: int) -> None:
    """Frozen stages run in eval mode, so their BatchNorm statistics stay the source's too."""
    for _, stage in stages(model)[:n]:
        stage.eval()


def param_groups(model: nn.Module, lr: float, *, head_lr_mult: float = 10.0,
                 lr_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: the head at ``head_lr_mult × lr``; stage ``i`` of the ``n`` stages
    with parameters at ``lr × lr_decay^(n-1-i)`` (layer-wise decay: the top stage gets ``lr``,
    lower ones less).

    Frozen parameters are left out, so no optimizer (momentum, weight decay) ever touches them.
    """
    if head_lr_mult <= 0 or not 0 < lr_decay <= 1:
        raise DivekitError(
            f"--head-lr-mult must be positive and --lr-decay in (0, 1], got {head_lr_mult}, {lr_decay}"
        )
    parts = [(name, stage) for name, stage in stages(model) if any(True for _ in stage.parameters())]
    groups = []
    for i, (name, stage) in enumerate(parts):  # stages without parameters (ReLU, pooling) skipped
        params = [p for p in stage.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * lr_decay ** (len(parts) - 1 - i),
                           "name": f"features.{name}"})
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups.append({"params": head, "lr": lr * head_lr_mult, "name": "head"})
    grouped = sum(p.numel() for g in groups for p in g["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if grouped != trainable:
        raise DivekitError("the model has trainable parameters outside features and head")
    return groups


# ----------------------------------------------------------------------------- weights
def load_matching(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """``load_state_dict(strict=True)``, with a one-line error naming what mismatched."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape (source vs model)", shapes)) if items]
        raise DivekitError(f"{what} does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Make the first convolution take ``in_channels``; pretrained RGB filters are summed over
    their inputs for grayscale (a gray image is R = G = B) or tiled and rescaled otherwise."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels == in_channels:
        return
    w = conv.weight.detach()
    if in_channels == 1:
        new_w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_channels // w.shape[1])
        new_w = w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels)
    conv.in_channels = in_channels
    conv.weight = nn.Parameter(new_w.contiguous())


def transfer_features(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source.features`` into ``target.features``; the target's head stays fresh."""
    load_matching(target.features, source.features.state_dict(), "the source's feature extractor")


# ----------------------------------------------------------------------------- torchvision
def _split(m: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """torchvision classifier → (features as stages, head); see the module docstring."""
    from torchvision.models import DenseNet

    if hasattr(m, "layer4") and hasattr(m, "fc"):  # ResNet, ResNeXt, Wide ResNet
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        features = nn.Sequential(OrderedDict(
            [("stem", stem)] + [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]))
        return features, nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)
    if isinstance(m, DenseNet):
        features = nn.Sequential(OrderedDict([*m.features.named_children(), ("relu", nn.ReLU())]))
        return features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier)
    if hasattr(m, "features") and hasattr(m, "avgpool") and hasattr(m, "classifier"):
        return m.features, nn.Sequential(m.avgpool, nn.Flatten(1), m.classifier)  # VGG, AlexNet, ...
    raise DivekitError(
        f"torchvision's {type(m).__name__} is not supported for fine-tuning; use a ResNet, "
        "ResNeXt, Wide ResNet, DenseNet, VGG, AlexNet, MobileNetV3 or EfficientNet"
    )


def torchvision_classifier(arch: str, num_classes: int, in_channels: int = 3,
                           state: dict[str, Tensor] | None = None) -> Classifier:
    """A torchvision architecture split into ``features`` stages and ``head``.

    ``state`` (torchvision's parameter names) is loaded before the split; then the first
    convolution is adapted to ``in_channels`` (:func:`set_input_channels`).
    """
    import torchvision

    arch = arch.removeprefix(TORCHVISION_PREFIX)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise DivekitError(f"unknown torchvision classifier {arch!r}; e.g. resnet18, vgg11, densenet121")
    extra = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    if state is not None:
        load_matching(net, state, f"the weights for torchvision's {arch}")
    features, head = _split(net)
    model = Classifier(features, head, num_classes)
    set_input_channels(model, in_channels)
    return model


def state_num_classes(state: dict[str, Tensor]) -> int:
    """The output size of a classifier state dict: the rows of its last 2-D weight."""
    dense = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not dense:
        raise DivekitError("the weights hold no dense (classifier) layer")
    return int(dense[-1].shape[0])
