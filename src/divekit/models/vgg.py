"""VGG (Simonyan & Zisserman 2014): networks made of repeated blocks, as the course writes them.

A VGG block is ``num_convs`` 3x3 ReLU convolutions (padding 1) followed by a 2x2 stride-2
max-pool, which halves height and width. :func:`vgg` stacks one block per ``(num_convs,
out_channels)`` pair of ``arch`` and ends with AlexNet's dense layers (4096, 4096,
``num_classes``, dropout 0.5). VGG-11 is ``((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))``:
at 224x224 its blocks give ``(64, 112, 112) → (128, 56, 56) → (256, 28, 28) → (512, 14, 14)
→ (512, 7, 7)``, flattened to 25088.

Deviations, so that inputs from 28x28 up work (28 → 14 → 7 → 3 → 1 → 0 would collapse):

* the max-pools are :class:`~divekit.models.alexnet.SafeMaxPool2d`, which pools a 1x1 map to
  1x1 (identical to ``nn.MaxPool2d`` on maps of at least 2x2);
* the head starts with ``AdaptiveAvgPool2d((7, 7))`` like torchvision's VGG, so the first dense
  layer has ``out_channels * 49`` inputs for any input size and any ``arch`` (identity for VGG-11
  at 224x224).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from divekit.models.alexnet import SafeMaxPool2d, dense_head, init_relu_cnn
from divekit.models.base import Classifier
from divekit.models.registry import register_model

VGG11 = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, ReLU), then a 2x2 max-pool: ``(N, in, H, W) → (N, out, H/2, W/2)``."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers.append(SafeMaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg(
    arch: Sequence[tuple[int, int]], *, num_classes: int = 10, in_channels: int = 1
) -> Classifier:
    """A VGG network with one :func:`vgg_block` per ``(num_convs, out_channels)`` in ``arch``."""
    arch = [tuple(b) for b in arch]
    if not arch or any(len(b) != 2 or min(b) < 1 for b in arch):
        raise ValueError(f"arch must be a non-empty list of (num_convs, out_channels) pairs of "
                         f"positive integers, got {arch!r}")
    blocks = []
    for num_convs, out_channels in arch:
        blocks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels = out_channels
    model = Classifier(nn.Sequential(*blocks), dense_head(in_channels, 7, num_classes), num_classes)
    init_relu_cnn(model)
    return model


@register_model("vgg11", input_shape=(1, 224, 224))
def vgg11(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """VGG-11 (Simonyan & Zisserman 2014): five blocks of 3x3 convs, then dense layers."""
    return vgg(VGG11, num_classes=num_classes, in_channels=in_channels)
