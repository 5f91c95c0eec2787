"""Mean average precision (mAP) of a detector, PASCAL VOC and COCO style.

For one class, the detections of all images are sorted by decreasing score; each is a true
positive when it overlaps (IoU ≥ threshold) a ground-truth box of its image and class that no
higher-scoring detection took (greedy matching by score), else a false positive. Walking down
the sorted list gives precision ``TP / (TP + FP)`` and recall ``TP / num_truths`` at every
rank. The precision envelope ``p̂(r) = max_{r' ≥ r} p(r')`` makes the curve monotone, and

* ``interpolation="all"`` (VOC 2010+): AP = area under the envelope, ``Σ (r_k - r_{k-1}) p̂(r_k)``;
* ``interpolation="coco"`` (COCO, torchmetrics): AP = mean of ``p̂`` at the 101 recalls
  ``0, 0.01, ..., 1`` (0 beyond the highest recall reached), with at most ``max_detections``
  detections per image and class.

mAP is the mean over the classes that have ground truth; a class with truths but no
detections has AP 0. Boxes are corner format ``(x1, y1, x2, y2)``, in any one unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.ops.boxes import box_iou

__all__ = ["average_precision", "match_detections", "mean_average_precision"]

Detections = Mapping[str, Tensor]  # {"boxes": (K, 4), "scores": (K,), "labels": (K,)}
Truths = Mapping[str, Tensor]  # {"boxes": (G, 4), "labels": (G,)}


def average_precision(scores: Tensor, is_true: Tensor, num_truths: int,
                      interpolation: str = "all") -> float:
    """AP of one class from its detections' ``scores (K,)`` and TP flags ``is_true (K,)``.

    Ties in score keep the given order (stable sort), as pycocotools does.
    """
    if interpolation not in ("all", "coco"):
        raise DivekitError(f"interpolation must be 'all' or 'coco', got {interpolation!r}")
    if num_truths <= 0:
        raise DivekitError(f"average_precision needs at least one ground-truth box, got {num_truths}")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    tp = is_true.double()[order].cumsum(0)  # (K,)
    fp = (1 - is_true.double()[order]).cumsum(0)
    recall = tp / num_truths
    precision = tp / (tp + fp).clamp(min=1)
    # envelope: p̂_k = max_{j ≥ k} p_j (a reversed running maximum)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    if interpolation == "all":
        steps = torch.diff(recall, prepend=recall.new_zeros(1))
        return float((steps * envelope).sum())
    if len(envelope) == 0:
        return 0.0
    thresholds = torch.arange(101, dtype=torch.float64) / 100  # 0, 0.01, ..., 1
    where = torch.searchsorted(recall, thresholds, right=False)  # first rank reaching each recall
    reached = where < len(envelope)
    sampled = torch.zeros(101, dtype=torch.float64)
    sampled[reached] = envelope[where[reached]]
    return float(sampled.mean())


def match_detections(boxes: Tensor, scores: Tensor, truths: Tensor, iou_threshold: float) -> Tensor:
    """TP flags ``(K,)`` of one image's detections of one class against its truths ``(G, 4)``.

    Detections in decreasing score (ties by index) each take the unmatched truth they overlap
    most, if that IoU ≥ ``iou_threshold``. The loop is over detections of one image and class.
    """
    is_true = torch.zeros(len(boxes), dtype=torch.bool)
    if len(boxes) == 0 or len(truths) == 0:
        return is_true
    iou = box_iou(boxes.double(), truths.double())  # (K, G)
    taken = torch.zeros(len(truths), dtype=torch.bool)
    for k in torch.sort(scores, descending=True, stable=True).indices.tolist():
        candidates = torch.where(taken | (iou[k] < iou_threshold), -1.0, iou[k])
        best = int(candidates.argmax())
        if candidates[best] >= 0:
            taken[best] = True
            is_true[k] = True
    return is_true


def _check(items: Sequence[Mapping[str, Tensor]], keys: tuple[str, ...], name: str) -> None:
    for i, item in enumerate(items):
        for key in keys:
            if key not in item:
                raise DivekitError(f"{name}[{i}] has no {key!r} entry; expected keys {list(keys)}")
        boxes = item["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise DivekitError(f"{name}[{i}]['boxes'] must have shape (K, 4), got {tuple(boxes.shape)}")
        for key in keys[1:]:
            if item[key].shape != boxes.shape[:1]:
                raise DivekitError(
                    f"{name}[{i}][{key!r}] has shape {tuple(item[key].shape)}; expected ({len(boxes)},)"
                )


def mean_average_precision(
    preds: Sequence[Detections],
    targets: Sequence[Truths],
    iou_threshold: float = 0.5,
    *,
    interpolation: str = "all",
    max_detections: int | None = None,
) -> dict[str, object]:
    """mAP over images: ``preds[i]`` and ``targets[i]`` are image ``i``'s detections and truths.

    The dicts are torchmetrics' format. Returns ``{"map": float, "per_class": {class: AP}}``;
    ``map`` is NaN when no image has any truth. ``interpolation="coco"`` with
    ``max_detections=100`` is torchmetrics' ``MeanAveragePrecision(iou_thresholds=[t])``.
    """
    if len(preds) != len(targets):
        raise DivekitError(f"{len(preds)} prediction entries but {len(targets)} target entries")
    _check(preds, ("boxes", "scores", "labels"), "preds")
    _check(targets, ("boxes", "labels"), "targets")
    if interpolation == "coco" and max_detections is None:
        max_detections = 100
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    per_class: dict[int, float] = {}
    for c in classes:
        scores, flags, num_truths = [], [], 0
        for pred, target in zip(preds, targets):
            truths = target["boxes"][target["labels"] == c].cpu()
            num_truths += len(truths)
            mine = pred["labels"] == c
            boxes, s = pred["boxes"][mine].cpu(), pred["scores"][mine].cpu().double()
            order = torch.sort(s, descending=True, stable=True).indices
            if max_detections is not None:
                order = order[:max_detections]
            boxes, s = boxes[order], s[order]
            scores.append(s)
            flags.append(match_detections(boxes, s, truths, iou_threshold))
        per_class[c] = average_precision(torch.cat(scores), torch.cat(flags), num_truths, interpolation)
    value = sum(per_class.values()) / len(per_class) if per_class else float("nan")
    return {"map": value, "per_class": per_class}
