"""The shape every classifier in the zoo shares: ``features`` then ``head``.

Fine-tuning replaces ``head``; ``divekit summary`` walks :meth:`Classifier.layers`, the course's
``for layer in net: X = layer(X)``.
"""

from __future__ import annotations

from torch import Tensor, nn


class Classifier(nn.Module):
    """``forward(x) = head(features(x))``; both are ``nn.Sequential``.

    ``features`` maps ``(N, C, H, W)`` images to feature maps; ``head`` maps those to
    ``(N, num_classes)`` logits (pooling and flattening live in the head).
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential, num_classes: int):
        super().__init__()
        self.features = features
        self.head = head
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def layers(self) -> list[tuple[str, nn.Module]]:
        """Top-level layers in order, named ``features.0``, ..., ``head.0``, ..."""
        return [(f"features.{n}", m) for n, m in self.features.named_children()] + [
            (f"head.{n}", m) for n, m in self.head.named_children()
        ]
