"""ResNet (He et al. 2016) as the course writes it for ``(1, 96, 96)`` inputs.

:class:`Residual` (the paper's basic block, alias :class:`BasicBlock`) computes
``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with two 3x3 convs; the shortcut is the
identity, or a 1x1 conv (``use_1x1conv``) when the block changes channels or strides.
:class:`Bottleneck` (ResNet-50 and deeper) is 1x1 reduce, 3x3, 1x1 expand (x4).

The network: ``b1`` the stem (7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max-pool), then
four stages ``b2`` ... ``b5`` of 64, 128, 256, 512 channels (times 4 for bottlenecks); each stage
but the first halves height and width in its first block. The head averages globally and ends
with one dense layer. At 96x96: ``(64, 24, 24) → (64, 24, 24) → (128, 12, 12) → (256, 6, 6)
→ (512, 3, 3) → (512,)``; 28x28 inputs give 7 → 7 → 4 → 2 → 1.

As the course, :class:`Residual`'s 1x1 shortcut is a plain conv (with bias, no BatchNorm);
:class:`Bottleneck` follows torchvision (stride on the 3x3 conv, shortcut conv + BatchNorm).
Convs followed by BatchNorm have no bias (it would be cancelled by the mean subtraction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from divekit.models.alexnet import init_relu_cnn
from divekit.models.base import Classifier
from divekit.models.layout import KeepsNCHW
from divekit.models.registry import register_model

NCHW_CHANNELS = 512  # a basic block this wide stays NCHW on the CPU (Residual)


class Residual(KeepsNCHW, nn.Module):
    """The basic residual block: ``(N, in, H, W) → (N, num_channels, H / strides, W / strides)``.

    With 512 channels or more (ResNet-18's and -34's last stage) the block stays NCHW on the
    CPU inside a channels_last model (:class:`~divekit.models.layout.KeepsNCHW`): there oneDNN's
    NHWC backward is slower than NCHW's (its maps are small: 3x3 at 96x96 inputs, 7x7 at
    224x224), and these weights, 75% of ResNet-18's, are the ones whose layout copies cost
    most (9.4 MB each). Measured, one training step, one thread, medians of 3-7 interleaved
    rounds: 96x96 batch 128, NHWC throughout 2.78 s, NCHW throughout 2.96 s, NHWC with this
    stage NCHW 2.56 s; 224x224 batch 16: 1.85, 1.90, 1.62 s; 32x32 batch 128: 0.52, 0.50,
    0.50 s.
    """

    expansion = 1

    def __init__(self, in_channels: int, num_channels: int, *, use_1x1conv: bool = False,
                 strides: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, num_channels, 3, stride=strides, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.conv2 = nn.Conv2d(num_channels, num_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_channels)
        self.conv3 = (nn.Conv2d(in_channels, num_channels, 1, stride=strides)
                      if use_1x1conv else None)
        self.keeps_nchw = num_channels >= NCHW_CHANNELS

    def forward(self, X: Tensor) -> Tensor:
        X = self.nchw_input(X)
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3 is not None:
            X = self.conv3(X)
        return F.relu(Y + X)


BasicBlock = Residual


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride), 1x1 expand: ``(N, in, H, W) → (N, 4 * num_channels, H / s, W / s)``."""

    expansion = 4

    def __init__(self, in_channels: int, num_channels: int, *, use_1x1conv: bool = False,
                 strides: int = 1):
        super().__init__()
        out_channels = num_channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, num_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.conv2 = nn.Conv2d(num_channels, num_channels, 3, stride=strides, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_channels)
        self.conv3 = nn.Conv2d(num_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=strides, bias=False),
                          nn.BatchNorm2d(out_channels))
            if use_1x1conv else None
        )

    def forward(self, X: Tensor) -> Tensor:
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = F.relu(self.bn2(self.conv2(Y)))
        Y = self.bn3(self.conv3(Y))
        if self.shortcut is not None:
            X = self.shortcut(X)
        return F.relu(Y + X)


Block = type[Residual] | type[Bottleneck]


def resnet_stage(block: Block, in_channels: int, num_channels: int, num_residuals: int,
                 *, first_block: bool = False) -> nn.Sequential:
    """``num_residuals`` blocks; the first halves H and W unless ``first_block`` (after the stem)."""
    blocks = []
    for i in range(num_residuals):
        strides = 2 if i == 0 and not first_block else 1
        out_channels = num_channels * block.expansion
        blocks.append(block(in_channels, num_channels, strides=strides,
                            use_1x1conv=strides != 1 or in_channels != out_channels))
        in_channels = out_channels
    return nn.Sequential(*blocks)


def resnet(
    arch: Sequence[int], *, block: Block = Residual, num_classes: int = 10, in_channels: int = 1
) -> Classifier:
    """A ResNet with ``arch[i]`` blocks in stage ``i`` (64, 128, 256, 512, ... channels)."""
    if not arch or min(arch) < 1:
        raise ValueError(f"arch must list a positive number of blocks per stage, got {arch!r}")
    features = nn.Sequential()
    features.add_module("b1", nn.Sequential(  # (N, 64, H/4, W/4)
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
    channels = 64
    for i, num_residuals in enumerate(arch):
        num_channels = 64 * 2**i
        features.add_module(f"b{i + 2}", resnet_stage(block, channels, num_channels, num_residuals,
                                                       first_block=i == 0))
        channels = num_channels * block.expansion
    head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, num_classes))
    model = Classifier(features, head, num_classes)
    init_relu_cnn(model)
    for m in model.head.modules():  # the dense layer keeps PyTorch's default init, as torchvision
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return model


# SGD 0.05 with a cosine schedule and batches of 64: 98% on digits after 5 epochs (README)
RESNET_RECIPES = {"*": {"optimizer": "sgd", "lr": 0.05, "batch_size": 64, "scheduler": "cosine"}}


@register_model("resnet18", input_shape=(1, 96, 96), recipes=RESNET_RECIPES)
def resnet18(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """ResNet-18 (He et al. 2016): residual blocks with BatchNorm, stages of (2, 2, 2, 2) blocks."""
    return resnet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@register_model("resnet34", input_shape=(1, 96, 96), recipes=RESNET_RECIPES)
def resnet34(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """ResNet-34 (He et al. 2016): residual blocks with BatchNorm, stages of (3, 4, 6, 3) blocks."""
    return resnet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)


@register_model("resnet50", input_shape=(1, 96, 96), recipes=RESNET_RECIPES)
def resnet50(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """ResNet-50 (He et al. 2016): bottleneck residual blocks (x4 expansion), stages (3, 4, 6, 3)."""
    return resnet((3, 4, 6, 3), block=Bottleneck, num_classes=num_classes, in_channels=in_channels)
