"""``divekit export RUN --format torchvision``: a classifier's weights under torchvision's names.

Where divekit's network *is* torchvision's, the state dict is renamed so that::

    net = torchvision.models.resnet18(num_classes=len(classes))
    net.load_state_dict(torch.load("torchvision.pth", weights_only=True))

gives the run's logits (in eval mode). The architectures that match:

* ResNet-18/34/50: the stem, the stages ``b2..b5`` (``layer1..layer4``) and ``fc`` are
  torchvision's. One difference is bridged exactly: the course's basic block has a 1x1
  shortcut conv *with a bias and no BatchNorm*, torchvision's a bias-free conv and a
  BatchNorm (``downsample.0/1``). A BatchNorm with running mean 0, running variance 1, weight
  ``sqrt(1 + eps)`` and bias ``b`` computes ``x + b`` in eval mode, so the conv's bias moves
  into that BatchNorm. (In train mode the BatchNorm would use batch statistics instead.)
* VGG-11: the same convs, pools and dense layers (``features.K``, ``classifier.0/3/6``).
* DenseNet-121: the same layers; divekit's transitions pool with ``ceil_mode=True``, which
  equals torchvision's pooling when every map before a transition has an even side (true at
  the course's 96x96 and at 224x224); other input sizes are refused.

AlexNet (the course's has 96-256-384-384-256 channels, torchvision's 64-192-384-256-256) and
GoogLeNet (the course's has no BatchNorm, torchvision's has one after each conv) are other
networks: refused in one line. A run on 1-channel images has its first conv repeated over 3
input channels and divided by 3, so torchvision's model given the grey image repeated 3 times
(``transforms.Grayscale(num_output_channels=3)``) computes the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divekit.errors import DivekitError

NOT_THE_SAME = {
    "alexnet": "the course's AlexNet has 96-256-384-384-256 conv channels and an 11x11 stride-4 "
               "stem with padding 1, torchvision's 64-192-384-256-256 and padding 2",
    "googlenet": "the course's GoogLeNet has no BatchNorm and no auxiliary heads; torchvision's "
                 "puts a BatchNorm after every conv",
    "nin": "torchvision has no Network in Network",
    "lenet": "torchvision has no LeNet",
    "lenet_bn": "torchvision has no LeNet",
}
VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _bn(dst: str, src: str, sd: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"{src}.{k}" in sd:
            out[f"{dst}.{k}"] = sd[f"{src}.{k}"]


def _resnet(sd: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    out = {"conv1.weight": sd["features.b1.0.weight"]}
    _bn("bn1", "features.b1.1", sd, out)
    stages = sorted({int(k.split(".")[1][1:]) for k in sd if k.startswith("features.b")
                     and k.split(".")[1] != "b1"})
    for s in stages:
        blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith(f"features.b{s}.")})
        for b in blocks:
            src, dst = f"features.b{s}.{b}", f"layer{s - 1}.{b}"
            convs = (1, 2, 3) if arch == "resnet50" else (1, 2)
            for c in convs:
                out[f"{dst}.conv{c}.weight"] = sd[f"{src}.conv{c}.weight"]
                _bn(f"{dst}.bn{c}", f"{src}.bn{c}", sd, out)
            if arch == "resnet50" and f"{src}.shortcut.0.weight" in sd:
                out[f"{dst}.downsample.0.weight"] = sd[f"{src}.shortcut.0.weight"]
                _bn(f"{dst}.downsample.1", f"{src}.shortcut.1", sd, out)
            elif arch != "resnet50" and f"{src}.conv3.weight" in sd:
                # conv(bias b) = BatchNorm(mean 0, var 1, weight sqrt(1 + eps), bias b)(conv)
                bias = sd[f"{src}.conv3.bias"]
                out[f"{dst}.downsample.0.weight"] = sd[f"{src}.conv3.weight"]
                out[f"{dst}.downsample.1.weight"] = torch.full_like(
                    bias, math.sqrt(1 + 1e-5))
                out[f"{dst}.downsample.1.bias"] = bias
                out[f"{dst}.downsample.1.running_mean"] = torch.zeros_like(bias)
                out[f"{dst}.downsample.1.running_var"] = torch.ones_like(bias)
                out[f"{dst}.downsample.1.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"], out["fc.bias"] = sd["head.2.weight"], sd["head.2.bias"]
    return out


def _vgg11(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    flat, block, conv = 0, 0, 0
    for item in VGG11_CFG:
        if item == "M":
            flat, block, conv = flat + 1, block + 1, 0
            continue
        for p in ("weight", "bias"):
            out[f"features.{flat}.{p}"] = sd[f"features.{block}.{2 * conv}.{p}"]
        flat, conv = flat + 2, conv + 1
    for dst, src in ((0, 2), (3, 5), (6, 8)):  # head: pool, flatten, linear, relu, dropout, ...
        for p in ("weight", "bias"):
            out[f"classifier.{dst}.{p}"] = sd[f"head.{src}.{p}"]
    return out


def _densenet(sd: dict[str, Tensor], image_size: list[int]) -> dict[str, Tensor]:
    blocks = sorted({int(k.split(".")[1][5:]) for k in sd if k.startswith("features.dense")})
    side = [s for s in image_size]
    side = [((s + 2 * 3 - 7) // 2 + 1 + 2 - 3) // 2 + 1 for s in side]  # stem conv and pool
    for _ in blocks[:-1]:
        if any(s % 2 for s in side):
            raise DivekitError(f"at {image_size[0]}x{image_size[1]} a DenseNet transition pools "
                               f"an odd {side[0]}x{side[1]} map, where divekit's ceil_mode "
                               "pooling differs from torchvision's; retrain at 96x96 or 224x224")
        side = [s // 2 for s in side]
    out = {"features.conv0.weight": sd["features.b1.0.weight"]}
    _bn("features.norm0", "features.b1.1", sd, out)
    for i in blocks:
        layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(f"features.dense{i}.")})
        for j in layers:
            src, dst = f"features.dense{i}.net.{j}", f"features.denseblock{i}.denselayer{j + 1}"
            _bn(f"{dst}.norm1", f"{src}.0", sd, out)
            out[f"{dst}.conv1.weight"] = sd[f"{src}.2.weight"]
            _bn(f"{dst}.norm2", f"{src}.3", sd, out)
            out[f"{dst}.conv2.weight"] = sd[f"{src}.5.weight"]
        if f"features.trans{i}.0.weight" in sd:
            _bn(f"features.transition{i}.norm", f"features.trans{i}.0", sd, out)
            out[f"features.transition{i}.conv.weight"] = sd[f"features.trans{i}.2.weight"]
    _bn(f"features.norm{len(blocks) + 1}", "features.norm", sd, out)
    out["classifier.weight"], out["classifier.bias"] = sd["head.2.weight"], sd["head.2.bias"]
    return out


FIRST_CONV = {"resnet": "conv1.weight", "vgg11": "features.0.weight",
              "densenet121": "features.conv0.weight"}


def torchvision_state(model: Any, name: str, in_channels: int, image_size: list[int]
                      ) -> dict[str, Tensor]:
    """The run's state dict under torchvision's names (see the module's docstring)."""
    if name in NOT_THE_SAME:
        raise DivekitError(f"{name} cannot be written for torchvision: {NOT_THE_SAME[name]}")
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    if name in ("resnet18", "resnet34", "resnet50"):
        out, first = _resnet(sd, name), FIRST_CONV["resnet"]
    elif name == "vgg11":
        out, first = _vgg11(sd), FIRST_CONV["vgg11"]
    elif name == "densenet121":
        out, first = _densenet(sd, image_size), FIRST_CONV["densenet121"]
    else:
        raise DivekitError(f"{name} has no torchvision counterpart (torchvision form: resnet18, "
                           "resnet34, resnet50, vgg11, densenet121)")
    if in_channels == 1:  # torchvision's stem takes RGB: the grey image repeated 3 times
        out[first] = out[first].repeat(1, 3, 1, 1) / 3
    elif in_channels != 3:
        raise DivekitError(f"torchvision's {name} takes 3-channel images; this run's take "
                           f"{in_channels}")
    return {k: v.contiguous() for k, v in out.items()}


def refuse_early(task: str, name: str, run_dir: Path) -> None:
    """The refusals the run's record alone decides (its task, its model's name)."""
    if task != "classify":
        raise DivekitError(f"{run_dir} is a {task} run; --format torchvision writes classifiers")
    if name.startswith("torchvision:"):
        raise DivekitError(f"{name} is torchvision's own network split into divekit's "
                           "features/head; --format torchvision writes the zoo's models")
    if name in NOT_THE_SAME:
        raise DivekitError(f"{name} cannot be written for torchvision: {NOT_THE_SAME[name]}")


def export_torchvision(run: Any, path: Path, meta_path: Path) -> Any:
    from divekit.export import ExportResult
    from divekit.io import atomic_write_bytes, atomic_write_text

    task, name = str(run.record.get("task", "classify")), run.config.model
    refuse_early(task, name, run.dir)
    f = run.task.facts
    state = torchvision_state(run.model, name, int(f["in_channels"]), list(f["image_size"]))
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    channels = int(f["in_channels"])
    meta = {"format": "torchvision", "task": task, "model": name,
            "torchvision_constructor": f"torchvision.models.{name}(num_classes="
                                       f"{len(f['classes'])})",
            "classes": list(f["classes"]), "input_size": list(f["image_size"]),
            "in_channels": 3, "trained_channels": channels,
            "mean": list(f["mean"]) * (3 if channels == 1 else 1),
            "std": list(f["std"]) * (3 if channels == 1 else 1),
            "preprocess": ("grey image repeated to 3 channels, " if channels == 1 else "")
            + "scaled to [0, 1], then (x - mean) / std per channel; call model.eval()"}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return ExportResult(path, meta_path, f"torchvision.models.{name}", meta)
