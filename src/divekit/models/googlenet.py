"""GoogLeNet (Szegedy et al. 2015) as the course writes it for ``(1, 96, 96)`` inputs.

An :class:`InceptionBlock` runs four paths in parallel and concatenates them on channels: 1x1
conv; 1x1 then 3x3 conv; 1x1 then 5x5 conv; 3x3 max-pool then 1x1 conv. Five stages: ``b1`` a
7x7 stride-2 conv and a max-pool; ``b2`` a 1x1 and a 3x3 conv and a max-pool; ``b3``, ``b4``,
``b5`` two, five and two Inception blocks (nine in all), ``b3`` and ``b4`` ending with a
max-pool. At 96x96 the stages give ``(64, 24, 24) → (192, 12, 12) → (480, 6, 6) → (832, 3, 3)
→ (1024, 3, 3)``; the head averages globally to 1024 features and ends with one dense layer.

Split: ``features`` is ``b1`` ... ``b5`` (the course's ``b5`` without its global average pooling
and flatten, which open the head). Every pool pads by 1, so inputs from 28x28 up work unchanged
(28 → 7 → 4 → 2 → 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from divekit.models.alexnet import init_relu_cnn
from divekit.models.base import Classifier
from divekit.models.registry import register_model


def _conv_relu(in_channels: int, out_channels: int, kernel_size: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, **kw), nn.ReLU())


class InceptionBlock(nn.Module):
    """Four parallel paths concatenated on channels: ``(N, in, H, W) → (N, c1 + c2[1] + c3[1] + c4, H, W)``.

    ``c1``: 1x1 conv; ``c2 = (reduce, out)``: 1x1 then 3x3 conv; ``c3 = (reduce, out)``: 1x1
    then 5x5 conv; ``c4``: 3x3 max-pool (stride 1) then 1x1 conv. Every conv is followed by ReLU.
    """

    def __init__(self, in_channels: int, c1: int, c2: tuple[int, int], c3: tuple[int, int],
                 c4: int):
        super().__init__()
        self.p1 = _conv_relu(in_channels, c1, 1)
        self.p2 = nn.Sequential(_conv_relu(in_channels, c2[0], 1),
                                _conv_relu(c2[0], c2[1], 3, padding=1))
        self.p3 = nn.Sequential(_conv_relu(in_channels, c3[0], 1),
                                _conv_relu(c3[0], c3[1], 5, padding=2))
        self.p4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                _conv_relu(in_channels, c4, 1))
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((self.p1(x), self.p2(x), self.p3(x), self.p4(x)), dim=1)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # halves H and W (rounding up)


@register_model("googlenet", input_shape=(1, 96, 96))
def googlenet(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """GoogLeNet (Szegedy et al. 2015): nine Inception blocks of parallel 1x1/3x3/5x5/pool paths."""
    b1 = nn.Sequential(  # (N, 64, H/4, W/4)
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3), nn.ReLU(), _pool())
    b2 = nn.Sequential(  # (N, 192, H/8, W/8)
        nn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
        nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(), _pool())
    b3 = nn.Sequential(  # (N, 480, H/16, W/16)
        InceptionBlock(192, 64, (96, 128), (16, 32), 32),  # 256 channels
        InceptionBlock(256, 128, (128, 192), (32, 96), 64),  # 480
        _pool())
    b4 = nn.Sequential(  # (N, 832, H/32, W/32)
        InceptionBlock(480, 192, (96, 208), (16, 48), 64),  # 512
        InceptionBlock(512, 160, (112, 224), (24, 64), 64),  # 512
        InceptionBlock(512, 128, (128, 256), (24, 64), 64),  # 512
        InceptionBlock(512, 112, (144, 288), (32, 64), 64),  # 528
        InceptionBlock(528, 256, (160, 320), (32, 128), 128),  # 832
        _pool())
    b5 = nn.Sequential(  # (N, 1024, H/32, W/32)
        InceptionBlock(832, 256, (160, 320), (32, 128), 128),  # 832
        InceptionBlock(832, 384, (192, 384), (48, 128), 128))  # 1024
    features = nn.Sequential()
    for name, stage in zip(("b1", "b2", "b3", "b4", "b5"), (b1, b2, b3, b4, b5)):
        features.add_module(name, stage)
    head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(1024, num_classes))
    model = Classifier(features, head, num_classes)
    init_relu_cnn(model)
    return model
