"""Network in Network (Lin et al. 2013) as the course writes it for ``(1, 224, 224)`` inputs.

A NiN block is a convolution followed by two 1x1 convolutions (per-pixel dense layers), each
followed by ReLU. Four blocks (96, 256, 384, ``num_classes`` channels) with 3x3 stride-2
max-pools between them and dropout 0.5 before the last; global average pooling of the last
block's ``num_classes`` maps gives the logits: there is no dense layer. At 224x224:
``(96, 54, 54) → (96, 26, 26) → (256, 26, 26) → (256, 12, 12) → (384, 12, 12) → (384, 5, 5)
→ (10, 5, 5) → (10,)``.

Split: ``features`` ends at the 384-channel maps; ``head`` is dropout, the last NiN block (the
only layer that knows ``num_classes``), global average pooling and flatten, so replacing the head
re-targets the network.

Deviation, so that inputs from 28x28 up work: the max-pools are
:class:`~divekit.models.alexnet.SafeMaxPool2d`, which pools a map smaller than its 3x3 window
to 1x1 instead of failing (a 28x28 input is 5x5 after the first block); otherwise it is
exactly ``nn.MaxPool2d``.

Initialisation (:func:`init_nin`): Kaiming-normal for the spatial convolutions as elsewhere, but
each block's two 1x1 convolutions start as the identity (so a block starts as conv → ReLU and its
per-pixel dense layers learn their mixing from there, as identity-initialised ReLU layers do in
Le et al. 2015), and the class block's biases start at 1. Both answer the design's weak spot:
the logits are averages of ReLU'd ``num_classes``-channel maps, so a class whose pre-activation
is negative for a sample passes no gradient back for it, and two 10-channel ReLU layers in a row
with random weights lose most of what reaches them. With Kaiming everywhere the network needs
50-100 Adam steps (some seeds never) to halve its loss on a fixed batch of 32 at 28x28; with this
it takes 12-16 on every seed tried (``tests/test_models.py``), and 13 at 224x224; at 64-96 the
first loss is higher (3.4-5, larger class maps) and halving it takes longer. On real data the
difference is starker: ``divekit train nin --data digits --resize 28`` with the default SGD sits
at 10% for 10 epochs with Kaiming everywhere and reaches 97.8% with this; at ``--resize 64
--lr 0.01``, 31% against 75% after 6 epochs.
"""

from __future__ import annotations

import torch
from torch import nn

from divekit.models.alexnet import SafeMaxPool2d, init_relu_cnn
from divekit.models.base import Classifier
from divekit.models.registry import register_model


class NiNBlock(nn.Sequential):
    """Conv ``kernel_size`` then two 1x1 convs, each followed by ReLU: ``(N, in, H, W) → (N, out, H', W')``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, strides: int,
                 padding: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=strides, padding=padding),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        )


@register_model("nin", input_shape=(1, 224, 224))
def nin(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """Network in Network (Lin et al. 2013): 1x1 convs and global average pooling, no dense layer."""
    features = nn.Sequential(
        NiNBlock(in_channels, 96, kernel_size=11, strides=4, padding=0),  # (N, 96, 54, 54)
        SafeMaxPool2d(3, stride=2),  # (N, 96, 26, 26)
        NiNBlock(96, 256, kernel_size=5, strides=1, padding=2),
        SafeMaxPool2d(3, stride=2),  # (N, 256, 12, 12)
        NiNBlock(256, 384, kernel_size=3, strides=1, padding=1),
        SafeMaxPool2d(3, stride=2),  # (N, 384, 5, 5)
    )
    head = nn.Sequential(
        nn.Dropout(0.5),
        NiNBlock(384, num_classes, kernel_size=3, strides=1, padding=1),  # (N, classes, 5, 5)
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),  # (N, classes)
    )
    model = Classifier(features, head, num_classes)
    init_nin(model)
    return model


def init_nin(model: nn.Module, class_bias: float = 1.0) -> None:
    """Kaiming-normal spatial convs, identity 1x1 convs, and biases of ``class_bias`` in the last
    NiN block (the one producing class maps); see the module's docstring for why."""
    init_relu_cnn(model)
    blocks = [m for m in model.modules() if isinstance(m, NiNBlock)]
    for block in blocks:
        for conv in block:
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1):
                with torch.no_grad():
                    conv.weight.zero_()
                    conv.weight[:, :, 0, 0].copy_(torch.eye(conv.out_channels))
    if blocks:
        for conv in blocks[-1]:
            if isinstance(conv, nn.Conv2d):
                nn.init.constant_(conv.bias, class_bias)

