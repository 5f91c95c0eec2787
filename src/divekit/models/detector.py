"""What the detection task asks of a detector: one small interface every family implements.

The detection task (``divekit.tasks.detect``), ``divekit evaluate`` and ``divekit predict``
rely on nothing else, so a new detector is one file in ``divekit.models``:

* ``forward(x)`` → the model's raw outputs (any structure; what ``divekit summary`` runs);
  ``forward(x, labels)`` (and ``masks`` for models with ``needs_masks``) → ``(loss, metrics)``:
  the scalar training objective of the batch and a dict of detached scalars for the progress
  bar and ``metrics.csv``. Training goes through ``forward`` so DistributedDataParallel's
  hooks see it. In ``eval()`` mode the same call gives the validation loss.
* ``detect(x, nms_iou)`` → ``(N, K, 6)`` rows ``[class, score, x1, y1, x2, y2]``: corners
  normalised by width and height, class −1 on padding and suppressed rows. mAP, the
  validation pictures and ``predict`` read only this.

A builder takes ``num_classes`` and ``in_channels`` (and ``image_size`` when the network depends
on it, as YOLO's grid does) plus its family's hyper-parameters, and registers with
``task="detect"`` and a training recipe (:data:`ADAM_RECIPE` for those here).

Labels everywhere are the course's banana format: ``(N, G, 5)`` rows
``[class, x1, y1, x2, y2]`` with normalised corners, padding rows all −1; masks, when a
dataset has them, are ``(N, G, H, W)`` with one binary mask per label row.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# How the detectors here train from random initialisation: Adam at 1e-3 (tiny SSD on shapes at
# 96 px, 8 epochs: mAP@0.5 0.989, against 0.697 with the course's SGD at 0.2; README).
ADAM_RECIPE: dict[str, dict[str, Any]] = {"*": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}}


class Detector(nn.Module):
    """Base class: subclasses give ``raw``, ``compute_loss`` and ``decode``, or override
    ``forward`` and ``detect`` themselves (the torchvision R-CNNs do)."""

    needs_masks: bool = False
    num_classes: int

    def raw(self, x: Tensor) -> Any:
        raise NotImplementedError

    def compute_loss(self, outputs: Any, labels: Tensor,
                     masks: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def decode(self, outputs: Any, nms_iou: float = 0.5) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, labels: Tensor | None = None, masks: Tensor | None = None) -> Any:
        outputs = self.raw(x)
        if labels is None:
            return outputs
        return self.compute_loss(outputs, labels, masks)

    def detect(self, x: Tensor, nms_iou: float = 0.5) -> Tensor:
        return self.decode(self.raw(x), nms_iou)


def real_rows(labels: Tensor) -> Tensor:
    """Boolean ``(N, G)``: which label rows are objects (padding rows have class −1)."""
    return labels[..., 0] >= 0
