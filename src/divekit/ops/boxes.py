"""Bounding boxes: format conversion, area, IoU and non-maximum suppression (d2l 14.3, 14.4).

Two box formats appear, and every function names the one it takes:

* corner: ``(x1, y1, x2, y2)``, the upper-left and lower-right corners (``x2 >= x1``, ``y2 >= y1``);
* center: ``(cx, cy, w, h)``, the centre, width and height.

Every function is pure and vectorised over any leading dimensions unless it says otherwise.
``box_iou``, ``box_area`` and the conversions are plain arithmetic and do not validate their
input (they sit on hot paths); ``nms``, ``batched_nms`` and the anchor functions do.

NMS tie order: when scores tie, the box with the smaller index is visited (and returned) first.
That is what ``torchvision.ops.nms`` does on the CPU (its kernel's descending sort is stable;
``tests/test_ops_boxes.py`` checks it on many tie-heavy random cases), and the reference path
here stable-sorts in descending order to match it index for index. The course's ``d2l.nms``
uses a plain ``argsort``, which is not stable, so its order among tied scores is arbitrary.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from divekit.errors import DivekitError


def _tv_ops():
    """``torchvision.ops``, imported on first use: it costs about a second at start-up, which
    commands that never run NMS (``divekit hw``, ``summary``) should not pay."""
    import torchvision  # type: ignore[import-untyped]

    return torchvision.ops

__all__ = [
    "box_area",
    "box_center_to_corner",
    "box_corner_to_center",
    "box_iou",
    "batched_nms",
    "nms",
    "validate_boxes",
]

NmsMethod = Literal["fast", "reference"]


def box_corner_to_center(boxes: Tensor) -> Tensor:
    """Corner ``(x1, y1, x2, y2)`` -> center ``(cx, cy, w, h)``; shape ``(..., 4)`` kept."""
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    cx = (x1 + x2) / 2
    cy = (y1 + y2) / 2
    w = x2 - x1
    h = y2 - y1
    return torch.stack((cx, cy, w, h), dim=-1)


def box_center_to_corner(boxes: Tensor) -> Tensor:
    """Center ``(cx, cy, w, h)`` -> corner ``(x1, y1, x2, y2)``; shape ``(..., 4)`` kept."""
    cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    x1 = cx - 0.5 * w
    y1 = cy - 0.5 * h
    x2 = cx + 0.5 * w
    y2 = cy + 0.5 * h
    return torch.stack((x1, y1, x2, y2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of corner-format boxes: ``(..., 4)`` -> ``(...)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU (Jaccard index) of corner-format boxes: ``(..., N, 4), (..., M, 4) -> (..., N, M)``.

    ``J(A, B) = |A ∩ B| / |A ∪ B|``. Leading dimensions broadcast, so a batch of truths
    ``(B, G, 4)`` against anchors ``(A, 4)`` gives ``(B, G, A)``. The arithmetic is torchvision's,
    in the same order, so the two agree bit for bit on 2-D input. (Each coordinate is worked on as
    its own contiguous plane: with ``M`` last, the broadcasts run over long contiguous rows.)
    """
    if not boxes1.is_floating_point():  # integer pixel boxes: IoU is a fraction all the same
        boxes1 = boxes1.float()
    if not boxes2.is_floating_point():
        boxes2 = boxes2.float()
    x1a, y1a, x2a, y2a = (c.contiguous()[..., :, None] for c in boxes1.unbind(-1))  # (..., N, 1)
    x1b, y1b, x2b, y2b = (c.contiguous()[..., None, :] for c in boxes2.unbind(-1))  # (..., 1, M)
    area1 = (x2a - x1a) * (y2a - y1a)
    area2 = (x2b - x1b) * (y2b - y1b)
    if torch.is_grad_enabled() and (boxes1.requires_grad or boxes2.requires_grad):
        w = (torch.min(x2a, x2b) - torch.max(x1a, x1b)).clamp(min=0)  # (..., N, M)
        h = (torch.min(y2a, y2b) - torch.max(y1a, y1b)).clamp(min=0)
        inter = w * h
        return inter / (area1 + area2 - inter)
    # The same arithmetic in three (..., N, M) buffers: several times faster on big inputs.
    tmp = torch.max(x1a, x1b)
    inter = torch.min(x2a, x2b).sub_(tmp).clamp_(min=0)  # the intersections' widths, then areas
    h = torch.min(y2a, y2b).sub_(torch.max(y1a, y1b, out=tmp)).clamp_(min=0)
    inter.mul_(h)
    union = torch.add(area1, area2, out=h).sub_(inter)
    return inter.div_(union)


def validate_boxes(boxes: Tensor, name: str = "boxes") -> Tensor:
    """Check corner-format boxes ``(..., 4)``: finite, ``x2 >= x1`` and ``y2 >= y1``.

    Raises ``DivekitError`` naming the first offending row, e.g. ``boxes[3]`` or
    ``labels[1, 0]``; returns ``boxes`` unchanged so calls can be chained.
    """
    if not isinstance(boxes, Tensor):
        raise DivekitError(
            f"{name} must be a tensor of corner boxes (..., 4), got {type(boxes).__name__}"
        )
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise DivekitError(
            f"{name} must have shape (..., 4) [x1, y1, x2, y2], got {tuple(boxes.shape)}"
        )
    if boxes.numel() == 0:
        return boxes
    x1, y1, x2, y2 = boxes.unbind(-1)
    if bool(torch.isfinite(boxes).all()) and bool((x2 >= x1).all()) and bool((y2 >= y1).all()):
        return boxes
    finite = torch.isfinite(boxes).all(dim=-1)
    x_ok = boxes[..., 2] >= boxes[..., 0]
    y_ok = boxes[..., 3] >= boxes[..., 1]
    bad = ~(finite & x_ok & y_ok)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        row = boxes[where]
        if not bool(finite[where]):
            problem = "a NaN or infinite coordinate"
        elif not bool(x_ok[where]):
            problem = "x2 < x1"
        else:
            problem = "y2 < y1"
        index = ", ".join(map(str, where))
        values = [round(float(v), 6) for v in row.tolist()]
        raise DivekitError(
            f"{name}[{index}] = {values} has {problem}; expected corner boxes [x1, y1, x2, y2] "
            "with x2 >= x1 and y2 >= y1"
        )
    return boxes


def _check_nms_args(boxes: Tensor, scores: Tensor, iou_threshold: float, method: str,
                    values: bool = True) -> None:
    """Shapes, threshold and method; with ``values`` also the coordinates (the native kernel
    checks those itself, on the way)."""
    if values or not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        validate_boxes(boxes, "boxes")
    if boxes.dim() != 2:
        raise DivekitError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if not isinstance(scores, Tensor) or scores.shape != boxes.shape[:1]:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise DivekitError(
            f"scores must have shape ({boxes.shape[0]},) to match boxes, got {shape}"
        )
    if (
        isinstance(iou_threshold, bool)
        or not isinstance(iou_threshold, int | float)
        or math.isnan(iou_threshold)
    ):
        raise DivekitError(f"iou_threshold must be a number, got {iou_threshold!r}")
    if method not in ("fast", "reference"):
        raise DivekitError(f"unknown nms method {method!r}; choose one of: fast, reference")


def _nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """The course's NMS, step by step (corner boxes ``(N, 4)``, scores ``(N,)`` -> kept ``(K,)``)."""
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: smaller index first
    keep = []
    while order.numel() > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        iou = box_iou(boxes[best][None], boxes[rest])[0]  # (len(rest),)
        # Compared in double precision, as torchvision's kernel does; NaN IoU (two empty boxes)
        # suppresses nothing, also as there.
        order = rest[~(iou.double() > iou_threshold)]
    if not keep:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    return torch.stack(keep)


def nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, *, method: NmsMethod = "fast"
) -> Tensor:
    """Non-maximum suppression on corner-format boxes ``(N, 4)`` with ``scores (N,)``.

    The course's algorithm: sort by score, keep the highest remaining box, drop every other box
    whose IoU with it is above ``iou_threshold``, repeat. Returns the kept indices ``(K,)``
    (int64) in decreasing score order, ties smaller index first. ``method="fast"`` is
    ``torchvision.ops.nms``; ``method="reference"`` is the readable loop above; both give the
    same indices. On the CPU with float32 boxes the fast path is a compiled grid kernel
    (``divekit.ops._native_nms``: a kept box is compared only with boxes sharing a grid cell, the
    same arithmetic and order as torchvision's), else torchvision's kernel.
    """
    from divekit.ops import _native_nms

    native = (method == "fast" and isinstance(boxes, Tensor) and isinstance(iou_threshold, float | int)
              and not isinstance(iou_threshold, bool) and _native_nms.usable(boxes, float(iou_threshold)))
    _check_nms_args(boxes, scores, iou_threshold, method, values=not native)
    if method == "reference":
        return _nms_reference(boxes, scores, iou_threshold)
    kept = _native_nms.grid_nms(boxes, scores, float(iou_threshold)) if native else None
    if kept is not None:
        return kept
    if native:  # the kernel refused a box: name it
        validate_boxes(boxes, "boxes")
    return _tv_ops().nms(boxes, scores, float(iou_threshold))


def _batched_nms_per_group(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, fast: bool
) -> Tensor:
    """NMS within each group of ``idxs`` separately; kept indices by decreasing score."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.where(idxs == group)[0]
        if fast:
            kept = _tv_ops().nms(boxes[members], scores[members], float(iou_threshold))
        else:
            kept = _nms_reference(boxes[members], scores[members], iou_threshold)
        keep_mask[members[kept]] = True
    kept_all = torch.where(keep_mask)[0]  # ascending, so the stable sort breaks ties by index
    return kept_all[torch.sort(scores[kept_all], descending=True, stable=True).indices]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    method: NmsMethod = "fast",
) -> Tensor:
    """NMS within each category: corner boxes ``(N, 4)``, ``scores (N,)``, ``idxs (N,)`` int.

    Boxes of different categories never suppress each other. Returns kept indices ``(K,)`` in
    decreasing score order, ties smaller index first (torchvision returns the same indices, but
    above 1,000 boxes orders tied scores arbitrarily). ``method="fast"`` is
    ``torchvision.ops.batched_nms``, except when a coordinate is below -1: torchvision's
    coordinate trick (shift each category by ``idx * (max + 1)``) can then let categories
    overlap, so NMS runs per category instead. ``method="reference"`` runs the course's loop per
    category.
    """
    _check_nms_args(boxes, scores, iou_threshold, method)
    if not isinstance(idxs, Tensor) or idxs.shape != boxes.shape[:1]:
        shape = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise DivekitError(f"idxs must have shape ({boxes.shape[0]},) to match boxes, got {shape}")
    if idxs.is_floating_point() or idxs.is_complex():
        raise DivekitError(f"idxs must be integer category indices, got dtype {idxs.dtype}")
    return _batched_nms(boxes, scores, idxs, iou_threshold, method)


def _batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, method: str
) -> Tensor:
    """``batched_nms`` without the input checks, for callers whose boxes are already known good."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if method == "reference":
        return _batched_nms_per_group(boxes, scores, idxs, iou_threshold, fast=False)
    if bool(boxes.min() < -1):
        return _batched_nms_per_group(boxes, scores, idxs, iou_threshold, fast=True)
    keep = _tv_ops().batched_nms(boxes, scores, idxs, float(iou_threshold))
    # Above 1,000 boxes torchvision merges its per-class results with an unstable sort; restore
    # the documented order (ties: smaller index first).
    keep = keep.sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]
