"""DenseNet (Huang et al. 2017): each layer's output is concatenated onto its input.

A :class:`DenseBlock` of ``num_convs`` layers grows the channels by ``growth_rate`` per layer; a
:class:`TransitionBlock` (BatchNorm, ReLU, 1x1 conv, 2x2 average pool) halves the channels and
the height and width between blocks. Layers use the BN-ReLU-conv ordering of the paper and the
course. The stem is ResNet's (7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max-pool); after
the last block come BatchNorm and ReLU, then the head (global average pool, dense layer).

``densenet121`` is DenseNet-BC-121 as in the paper and torchvision: block config
``(6, 12, 24, 16)``, growth rate 32, 64 stem channels, and bottleneck layers (BN-ReLU-1x1 conv
to ``4 * growth_rate`` channels before the BN-ReLU-3x3 conv). The course's smaller DenseNet
(``arch=(4, 4, 4, 4)``, plain BN-ReLU-3x3 layers) is ``densenet((4, 4, 4, 4), bn_size=None)``.
At 96x96 the blocks work at 24, 12, 6, 3 pixels, with 256, 512, 1024, 1024 output channels
(128, 256, 512 after the transitions).

Deviation, so that inputs from 28x28 up work (7 → 3 → 1 → 0 would collapse): the transition
pools use ``ceil_mode=True`` (7 → 4 → 2 → 1); this changes nothing for even sizes such as
the 24 → 12 → 6 → 3 of a 96x96 input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from divekit.models.alexnet import init_relu_cnn
from divekit.models.base import Classifier
from divekit.models.registry import register_model


class DenseLayer(nn.Sequential):
    """BN-ReLU-3x3 conv to ``growth_rate`` channels, after a BN-ReLU-1x1 bottleneck to
    ``bn_size * growth_rate`` channels unless ``bn_size`` is None (the course's ``conv_block``)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None = 4):
        layers: list[nn.Module] = []
        if bn_size is not None:
            mid = bn_size * growth_rate
            layers += [nn.BatchNorm2d(in_channels), nn.ReLU(),
                       nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)]
            in_channels = mid
        layers += [nn.BatchNorm2d(in_channels), nn.ReLU(),
                   nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)]
        super().__init__(*layers)


class DenseBlock(nn.Module):
    """``num_convs`` dense layers: ``(N, in, H, W) → (N, in + num_convs * growth_rate, H, W)``."""

    def __init__(self, num_convs: int, in_channels: int, growth_rate: int,
                 bn_size: int | None = 4):
        super().__init__()
        self.net = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size) for i in range(num_convs)
        )
        self.out_channels = in_channels + num_convs * growth_rate

    def forward(self, X: Tensor) -> Tensor:
        for layer in self.net:
            X = torch.cat((X, layer(X)), dim=1)  # concatenate each layer's output on channels
        return X


class TransitionBlock(nn.Sequential):
    """BN, ReLU, 1x1 conv, 2x2 average pool: ``(N, in, H, W) → (N, out, ceil(H/2), ceil(W/2))``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True),
        )


def densenet(
    arch: Sequence[int] = (4, 4, 4, 4),
    *,
    growth_rate: int = 32,
    bn_size: int | None = 4,
    num_init_features: int = 64,
    num_classes: int = 10,
    in_channels: int = 1,
) -> Classifier:
    """A DenseNet with ``arch[i]`` layers in dense block ``i`` and a transition between blocks."""
    if not arch or min(arch) < 1:
        raise ValueError(f"arch must list a positive number of layers per block, got {arch!r}")
    features = nn.Sequential()
    features.add_module("b1", nn.Sequential(  # (N, num_init_features, H/4, W/4)
        nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(num_init_features), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
    channels = num_init_features
    for i, num_convs in enumerate(arch):
        block = DenseBlock(num_convs, channels, growth_rate, bn_size)
        features.add_module(f"dense{i + 1}", block)
        channels = block.out_channels
        if i != len(arch) - 1:
            features.add_module(f"trans{i + 1}", TransitionBlock(channels, channels // 2))
            channels //= 2
    features.add_module("norm", nn.BatchNorm2d(channels))
    features.add_module("relu", nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, num_classes))
    model = Classifier(features, head, num_classes)
    init_relu_cnn(model)
    for m in model.head.modules():  # the dense layer keeps PyTorch's default init
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return model


@register_model("densenet121", input_shape=(1, 96, 96))
def densenet121(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """DenseNet-121 (Huang et al. 2017): dense blocks (6, 12, 24, 16), growth 32, bottlenecks."""
    return densenet((6, 12, 24, 16), growth_rate=32, bn_size=4, num_classes=num_classes,
                    in_channels=in_channels)
