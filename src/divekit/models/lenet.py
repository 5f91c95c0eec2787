"""LeNet-5 (LeCun et al. 1998) as the course writes it, with and without batch normalization.

``lenet``: conv 5x5 pad 2 (6 channels), sigmoid, avg-pool 2, conv 5x5 (16 channels), sigmoid,
avg-pool 2, flatten, 120, 84, ``num_classes``. On a ``(1, 28, 28)`` input the shapes are the
course's: ``(6, 28, 28) → (6, 14, 14) → (16, 10, 10) → (16, 5, 5) → 400 → 120 → 84 → 10``.

``lenet_bn``: the course's ``BNLeNetScratch``, the scratch :class:`BatchNorm` after every conv
and hidden linear layer, before the sigmoid (its first conv has no padding, as in the course:
``(6, 24, 24) → (6, 12, 12) → (16, 8, 8) → (16, 4, 4) → 256``).

Deviation: the second pooling layer is ``AdaptiveAvgPool2d`` to the course's size (5x5, or 4x4
with BatchNorm). At 28x28 it is exactly ``AvgPool2d(2, 2)``; on larger inputs it keeps the
fully connected layers' size fixed, so LeNet runs on any input from 28x28 up.
"""

from __future__ import annotations

from torch import nn

from divekit.models.base import Classifier
from divekit.models.batchnorm import BatchNorm
from divekit.models.registry import register_model


def init_lenet(module: nn.Module, gain: float = 4.0) -> None:
    """Xavier-uniform weights for conv and linear layers, by default with the sigmoid's gain of 4.

    The course's ``init_cnn`` uses gain 1, which leaves a sigmoid LeNet on a long plateau at
    the start (every sample gives nearly the same output: a fixed batch of 32 does not lose
    half its loss in 30 steps). Glorot & Bengio (2010) derive gain 4 for the logistic sigmoid,
    whose slope at 0 is 1/4; with it the plateau goes away. With BatchNorm before every sigmoid
    the scale of the weights does not matter, and ``lenet_bn`` keeps the course's gain of 1.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=gain)


@register_model("lenet", input_shape=(1, 28, 28))
def lenet(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """LeNet-5 (LeCun et al. 1998): two sigmoid convs with average pooling, three dense layers."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Sigmoid(),  # (N, 6, 28, 28)
        nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 6, 14, 14)
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),  # (N, 16, 10, 10)
        nn.AdaptiveAvgPool2d(5),  # (N, 16, 5, 5); AvgPool2d(2, 2) at 28x28
    )
    head = nn.Sequential(
        nn.Flatten(),  # (N, 400)
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
    model = Classifier(features, head, num_classes)
    init_lenet(model)
    return model


# SGD 0.1 with a cosine schedule: 98.9% on MNIST after 2 epochs (README)
@register_model("lenet_bn", input_shape=(1, 28, 28),
                recipes={"*": {"lr": 0.1, "batch_size": 64, "scheduler": "cosine"}})
def lenet_bn(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """LeNet with batch normalization (Ioffe & Szegedy 2015), the course's scratch BatchNorm."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),  # (N, 6, 12, 12)
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(4),  # (N, 16, 4, 4); AvgPool2d(2, 2) at 28x28
    )
    head = nn.Sequential(
        nn.Flatten(),  # (N, 256)
        nn.Linear(16 * 4 * 4, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
    model = Classifier(features, head, num_classes)
    init_lenet(model, gain=1.0)
    return model
