"""AlexNet (Krizhevsky et al. 2012) as the course writes it for ``(1, 224, 224)`` inputs.

Five ReLU convolutions (11x11 stride 4, 5x5, three 3x3) with three 3x3 stride-2 max-pools, then
dense layers of 4096, 4096 and ``num_classes`` with dropout 0.5. At 224x224 the feature maps are
the course's: ``(96, 54, 54) → (96, 26, 26) → (256, 26, 26) → (256, 12, 12) → (384, 12, 12)
→ (256, 12, 12) → (256, 5, 5)``, flattened to 6400.

Deviations, so that inputs from 28x28 up work (a 28x28 image is 5x5 after the first conv, too
small for the course's third pooling window):

* the max-pools are :class:`SafeMaxPool2d`: a map smaller than the 3x3 window is padded
  (with -inf) up to the window, so it pools to 1x1 instead of failing; otherwise it is exactly
  ``nn.MaxPool2d``;
* the head starts with ``AdaptiveAvgPool2d((5, 5))``, as torchvision's AlexNet does, so the first
  dense layer always sees 256 x 5 x 5 = 6400 values (identity at 224x224).

This module also holds the two helpers the other ReLU networks share: :class:`SafeMaxPool2d`
and :func:`init_relu_cnn`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from divekit.models.base import Classifier
from divekit.models.registry import register_model


class SafeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that also takes feature maps smaller than its window.

    Such a map is padded with -inf at the bottom/right up to the window (what ``ceil_mode``
    does at the edges), so it pools to 1x1 instead of raising; larger maps are pooled as usual.
    """

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (ph, pw), (dh, dw) = (_pair(v) for v in (self.kernel_size, self.padding,
                                                          self.dilation))
        short_h = max(0, dh * (kh - 1) + 1 - x.shape[-2] - 2 * ph)  # rows missing from one window
        short_w = max(0, dw * (kw - 1) + 1 - x.shape[-1] - 2 * pw)
        if short_h or short_w:
            x = F.pad(x, (0, short_w, 0, short_h), value=float("-inf"))
        return super().forward(x)


def init_relu_cnn(module: nn.Module) -> None:
    """Kaiming-normal (fan-in) convs for ReLU, N(0, 0.01) linear layers, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # fan_in: keeps forward variance
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def dense_head(in_channels: int, pooled: int, num_classes: int, hidden: int = 4096) -> nn.Sequential:
    """AlexNet's and VGG's classifier: pool to ``pooled x pooled``, two ReLU dense layers with
    dropout 0.5, then ``num_classes`` logits."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d((pooled, pooled)),  # (N, C, pooled, pooled) whatever the input
        nn.Flatten(),  # (N, C * pooled^2)
        nn.Linear(in_channels * pooled * pooled, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


@register_model("alexnet", input_shape=(1, 224, 224))
def alexnet(*, num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """AlexNet (Krizhevsky et al. 2012): five ReLU convs, max-pooling, dropout dense layers."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),  # (N, 96, 54, 54)
        SafeMaxPool2d(kernel_size=3, stride=2),  # (N, 96, 26, 26)
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        SafeMaxPool2d(kernel_size=3, stride=2),  # (N, 256, 12, 12)
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        SafeMaxPool2d(kernel_size=3, stride=2),  # (N, 256, 5, 5)
    )
    model = Classifier(features, dense_head(256, 5, num_classes), num_classes)
    init_relu_cnn(model)
    return model
