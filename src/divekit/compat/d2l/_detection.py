"""The book's boxes, anchors and NMS (sections bounding-box, anchor, ssd) over ``divekit.ops``.

Every function is divekit's own (``divekit.ops.boxes``, ``divekit.ops.anchors``: vectorised over
the batch and the anchors) behind the book's signature and return conventions. Boxes are corner
``(x1, y1, x2, y2)`` or centre ``(cx, cy, w, h)``; anchors are the book's ``(1, A, 4)``.

Differences from the book:

* ``assign_anchor_to_bbox`` honours ``iou_threshold``; the book's code compares with 0.5 whatever
  it is given (the same result at the default).
* ``multibox_target`` ignores padding rows (class -1) of ``labels``; the book treats them as
  ground truth, so anchors near a padding box got a mask of 1 and offsets towards it.
* With more ground truths than anchors the greedy assignment stops when the anchors run out; the
  book's loop then assigned the deleted anchor 0 again.
* ``nms`` orders tied scores by index (smaller first); the book's ``argsort`` is not stable, so
  its order among ties was arbitrary. ``multibox_detection`` inherits this.
* ``multibox_detection`` also takes divekit's keyword-only ``class_agnostic`` (default True, the
  book's NMS across classes).
* The box conversions take any leading dimensions ``(..., 4)``, not only ``(N, 4)``.
* Offsets keep the anchors' dtype (the book always produced float32).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from divekit.ops import anchors as _anchors
from divekit.ops import boxes as _boxes

__all__ = [
    "box_corner_to_center",
    "box_center_to_corner",
    "box_iou",
    "assign_anchor_to_bbox",
    "offset_boxes",
    "offset_inverse",
    "multibox_prior",
    "multibox_target",
    "nms",
    "multibox_detection",
]


def box_corner_to_center(boxes: Tensor) -> Tensor:
    """Corner ``(x1, y1, x2, y2)`` -> centre ``(cx, cy, w, h)``."""
    return _boxes.box_corner_to_center(boxes)


def box_center_to_corner(boxes: Tensor) -> Tensor:
    """Centre ``(cx, cy, w, h)`` -> corner ``(x1, y1, x2, y2)``."""
    return _boxes.box_center_to_corner(boxes)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of corner boxes ``(N, 4)`` and ``(M, 4)`` -> ``(N, M)``."""
    return _boxes.box_iou(boxes1, boxes2)


def assign_anchor_to_bbox(
    ground_truth: Tensor,
    anchors: Tensor,
    device: torch.device | str | None,
    iou_threshold: float = 0.5,
) -> Tensor:
    """The truth index ``(A,)`` assigned to each anchor, -1 where none (greedy, then threshold)."""
    return _anchors.assign_anchor_to_bbox(ground_truth, anchors, device, iou_threshold)


def offset_boxes(anchors: Tensor, assigned_bb: Tensor, eps: float = 1e-06) -> Tensor:
    """Offsets of ``assigned_bb`` from ``anchors`` (both corner): centres x10, log sizes x5."""
    return _anchors.offset_boxes(anchors, assigned_bb, eps)


def offset_inverse(anchors: Tensor, offset_preds: Tensor) -> Tensor:
    """Corner boxes from anchors and predicted offsets (the inverse of ``offset_boxes``)."""
    return _anchors.offset_inverse(anchors, offset_preds)


def multibox_prior(data: Tensor, sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Anchors centred on every pixel of ``data (..., h, w)`` -> ``(1, h*w*(n+m-1), 4)``."""
    return _anchors.multibox_prior(data, sizes, ratios)


def multibox_target(anchors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Label anchors ``(1, A, 4)`` with ``labels (B, G, 5)``: ``(offsets (B, A*4),
    mask (B, A*4), classes (B, A))``, class 0 for background and ``c + 1`` for class ``c``."""
    return _anchors.multibox_target(anchors, labels)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the boxes NMS keeps, by decreasing score (ties: smaller index first)."""
    return _boxes.nms(boxes, scores, iou_threshold)


_BOOK_POS_THRESHOLD = 0.009999999  # the book's default; divekit's own is 0.009


def multibox_detection(*args: Any, **kwargs: Any) -> Tensor:
    """Predicted boxes ``(B, A, 6)``, rows ``[class, confidence, x1, y1, x2, y2]``; class -1 for
    an anchor NMS suppressed or below ``pos_threshold``. Kept rows first, by confidence.

    The arguments are :func:`divekit.ops.anchors.multibox_detection`'s, one list of them, which
    names the book's five first; only the default ``pos_threshold`` is the book's (0.009999999).
    """
    if len(args) < 5 and "pos_threshold" not in kwargs:  # the fifth positional one
        kwargs["pos_threshold"] = _BOOK_POS_THRESHOLD
    return _anchors.multibox_detection(*args, **kwargs)


# inspect.signature and help(): divekit's arguments with the book's default
_signature = inspect.signature(_anchors.multibox_detection)
multibox_detection.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p.replace(default=_BOOK_POS_THRESHOLD) if p.name == "pos_threshold" else p
                for p in _signature.parameters.values()]
)
