"""Mean average precision (mAP) of a detector, PASCAL VOC and COCO style.

The course's detection chapter (d2l 14.3-14.7) trains detectors; this is how they are scored.
For one class, the detections of all images are sorted by decreasing score; each is a true
positive when it overlaps (IoU ≥ threshold) a ground-truth box of its image and class that no
higher-scoring detection took, else a false positive. Walking down the sorted list gives
precision ``TP / (TP + FP)`` and recall ``TP / num_truths`` at every rank. The precision
envelope ``p̂(r) = max_{r' ≥ r} p(r')`` makes the curve monotone, and

* ``interpolation="all"`` (VOC 2010+): AP = area under the envelope, ``Σ (r_k - r_{k-1}) p̂(r_k)``;
* ``interpolation="coco"`` (COCO, pycocotools, torchmetrics): AP = mean of ``p̂`` at the 101
  recall thresholds ``0, 0.01, ..., 1`` (0 beyond the highest recall reached), with at most
  ``max_detections`` detections per image and class.

mAP is the mean over the classes that have ground truth; a class with truths but no
detections has AP 0, detections of a class without truths count nowhere.
``coco_mean_average_precision`` gives COCO's headline numbers: AP averaged over the IoU
thresholds ``0.50:0.05:0.95`` (``map``), and at 0.5 and 0.75 (``map_50``, ``map_75``).

COCO style follows ``pycocotools.cocoeval.COCOeval`` (``evaluateImg`` and ``accumulate``) step
for step, so the numbers are torchmetrics' ``MeanAveragePrecision`` to rounding (the tests
check 1e-6 on many random sets with ties, duplicates and empty images):

* per image and class, detections are stable-sorted by score and cut to ``max_detections``
  before matching; the ranking over all images is a stable sort of the per-image lists
  concatenated in image order (pycocotools' mergesort);
* a detection takes, among the truths still free, the one it overlaps most, if that IoU is
  ≥ ``min(t, 1 - 1e-10)``; among equal IoUs the *later* truth wins (pycocotools replaces its
  best match whenever ``IoU ≥ best so far``);
* IoU is pycocotools' ``bbIou`` on ``(x, y, w, h)``, with ``w = x2 - x1`` taken in the boxes' own
  precision (torchmetrics' conversion) and the rest in double; boxes that only touch, and
  zero-area boxes, have IoU 0;
* truths whose area is outside COCO's "all" range ``[0, 1e10]`` are ignored (a detection that
  matches one counts neither way; an unmatched detection outside the range is ignored too);
* precision is ``TP / (TP + FP + eps)``, and a recall reaches threshold ``r`` when it is
  ``≥ r``, where ``r`` are the thresholds exactly as torchmetrics passes them to pycocotools:
  ``torch.linspace(0, 1, 101)`` in float32, so e.g. a recall of exactly 3/5 does *not* reach
  the threshold 0.6000000238 (while 1/5 does reach 0.1999999881). That was the 2e-3 gap of an
  earlier version, which compared with the exact decimals. ``recall_thresholds=`` takes other thresholds, e.g. pycocotools'
  own float64 ``np.linspace(0, 1, 101)``.

Boxes are corner format ``(x1, y1, x2, y2)``, in any one unit. The work runs on the CPU (the
greedy matching is a short loop over detection ranks, vectorised over images, thresholds and
truths); inputs may live on any device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.ops._checks import number_list
from divekit.ops.boxes import validate_boxes

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "COCO_RECALL_THRESHOLDS",
    "average_precision",
    "coco_mean_average_precision",
    "match_detections",
    "mean_average_precision",
]

Detections = Mapping[str, Tensor]  # {"boxes": (K, 4), "scores": (K,), "labels": (K,)}
Truths = Mapping[str, Tensor]  # {"boxes": (G, 4), "labels": (G,)}

#: COCO's IoU thresholds 0.50:0.05:0.95 as torchmetrics builds them (float32 linspace).
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(torch.linspace(0.5, 0.95, 10).tolist())
#: COCO's recall thresholds 0:0.01:1 as torchmetrics builds them (float32 linspace).
COCO_RECALL_THRESHOLDS: tuple[float, ...] = tuple(torch.linspace(0.0, 1.0, 101).tolist())
#: COCO's "all" area range, ``[0², 1e5²]``.
COCO_AREA_RANGE: tuple[float, float] = (0.0, 1e10)
_EPS = torch.finfo(torch.float64).eps  # pycocotools' np.spacing(1) in the precision's denominator


# --------------------------------------------------------------------------- building blocks


def _xywh(boxes: Tensor) -> Tensor:
    """Corner boxes ``(..., 4)`` -> ``(x, y, w, h)`` in double, ``w, h`` subtracted in the input dtype."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1).double()


def _coco_iou(dets: Tensor, truths: Tensor) -> Tensor:
    """pycocotools' ``bbIou``: ``(..., D, 4), (..., G, 4)`` corner boxes -> IoU ``(..., D, G)`` double.

    ``w = min(x_d + w_d, x_g + w_g) - max(x_d, x_g)`` (likewise ``h``); IoU is 0 unless both are
    positive, else ``w h / (area_d + area_g - w h)``.
    """
    d, g = _xywh(dets), _xywh(truths)
    xd, yd, wd, hd = (c[..., :, None] for c in d.unbind(-1))
    xg, yg, wg, hg = (c[..., None, :] for c in g.unbind(-1))
    w = torch.minimum(wd + xd, wg + xg) - torch.maximum(xd, xg)
    h = torch.minimum(hd + yd, hg + yg) - torch.maximum(yd, yg)
    overlap = (w > 0) & (h > 0)
    inter = w * h
    iou = inter / (wd * hd + wg * hg - inter)
    return torch.where(overlap, iou, torch.zeros_like(iou))


def _greedy_match(
    iou: Tensor, det_valid: Tensor, truth_ignored: Tensor, thresholds: Tensor
) -> tuple[Tensor, Tensor]:
    """pycocotools' ``evaluateImg`` matching, for a batch of images at ``T`` IoU thresholds at once.

    ``iou (I, D, G)``: detections in score order (ties as given) against truths, -1 where the
    truth is padding; ``det_valid (I, D)``; ``truth_ignored (I, G)``; ``thresholds (T,)``.
    Returns ``matched (I, T, D)`` and ``on_ignored (I, T, D)`` (matched to an ignored truth).

    Detection rank ``d`` of every image and threshold picks, among the truths still free with
    IoU ≥ ``min(t, 1 - 1e-10)``, the regular truth with the largest IoU (the last one among
    equals), or an ignored one when no regular truth qualifies. The loop runs over ranks only.
    """
    n_img, n_det, n_truth = iou.shape
    n_thr = len(thresholds)
    matched = torch.zeros(n_img, n_thr, n_det, dtype=torch.bool)
    on_ignored = torch.zeros(n_img, n_thr, n_det, dtype=torch.bool)
    if n_truth == 0 or n_det == 0:
        return matched, on_ignored
    thr = thresholds.double().clamp(max=1 - 1e-10).view(1, n_thr, 1)
    regular = (~truth_ignored)[:, None, :]  # (I, 1, G)
    taken = torch.zeros(n_img, n_thr, n_truth, dtype=torch.bool)
    flipped = torch.arange(n_truth - 1, -1, -1)
    for d in range(n_det):
        row = iou[:, d, None, :]  # (I, 1, G)
        ok = (row >= thr) & ~taken  # (I, T, G); padding truths (IoU -1) never qualify
        first_choice = ok & regular
        candidates = torch.where(first_choice.any(-1, keepdim=True), first_choice, ok)
        hit = candidates.any(-1) & det_valid[:, d, None]  # (I, T)
        value = torch.where(candidates, row, -1.0)
        best = flipped[value.flip(-1).argmax(-1)]  # the last maximum: (I, T)
        taken.scatter_(2, best[..., None], (hit | taken.gather(2, best[..., None])[..., 0])[..., None])
        matched[:, :, d] = hit
        on_ignored[:, :, d] = hit & truth_ignored.gather(1, best)
    return matched, on_ignored


def _ranked_ap(tp: Tensor, fp: Tensor, num_truths: int, interpolation: str,
               recall_thresholds: Tensor) -> Tensor:
    """AP ``(T,)`` from TP/FP flags ``(T, K)`` of detections already in rank order.

    A detection that is neither (ignored) keeps its rank but moves neither count.
    """
    tps, fps = tp.double().cumsum(1), fp.double().cumsum(1)
    n_thr, k = tps.shape
    if k == 0:
        return torch.zeros(n_thr, dtype=torch.float64)
    recall = tps / num_truths
    if interpolation == "coco":
        precision = tps / (tps + fps + _EPS)  # pycocotools' denominator
    else:
        precision = tps / (tps + fps).clamp(min=1)
    envelope = precision.flip(1).cummax(1).values.flip(1)  # p̂_k = max_{j ≥ k} p_j
    if interpolation == "all":
        steps = torch.diff(recall, dim=1, prepend=recall.new_zeros(n_thr, 1))
        return (steps * envelope).sum(1)
    wanted = recall_thresholds.double().expand(n_thr, -1).contiguous()
    where = torch.searchsorted(recall.contiguous(), wanted, right=False)  # first rank with recall ≥ r
    sampled = envelope.gather(1, where.clamp(max=k - 1))
    return torch.where(where < k, sampled, torch.zeros_like(sampled)).mean(1)


# --------------------------------------------------------------------------- argument checks


def _thresholds(values: float | Sequence[float], name: str) -> Tensor:
    return torch.tensor(number_list(values, name, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                        dtype=torch.float64)


def _recall_thresholds(values: Sequence[float]) -> Tensor:
    out = _thresholds(values, "recall_thresholds")
    if bool((out.diff() < 0).any()):
        raise DivekitError("recall_thresholds must be in increasing order")
    return out


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in ("all", "coco"):
        raise DivekitError(f"interpolation must be 'all' or 'coco', got {interpolation!r}")


def _check(items: Sequence[Mapping[str, Tensor]], keys: tuple[str, ...], name: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DivekitError(f"{name}[{i}] must be a dict with keys {list(keys)}, "
                               f"got {type(item).__name__}")
        for key in keys:
            if key not in item:
                raise DivekitError(f"{name}[{i}] has no {key!r} entry; expected keys {list(keys)}")
            if not isinstance(item[key], Tensor):
                raise DivekitError(f"{name}[{i}][{key!r}] must be a tensor, got {type(item[key]).__name__}")
        boxes = item["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise DivekitError(f"{name}[{i}]['boxes'] must have shape (K, 4), got {tuple(boxes.shape)}")
        validate_boxes(boxes, f"{name}[{i}]['boxes']")
        for key in keys[1:]:
            if item[key].shape != boxes.shape[:1]:
                raise DivekitError(
                    f"{name}[{i}][{key!r}] has shape {tuple(item[key].shape)}; expected ({len(boxes)},)"
                )
        labels = item["labels"]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DivekitError(f"{name}[{i}]['labels'] must be integer class ids, got dtype {labels.dtype}")
        if "scores" in keys and item["scores"].numel() and not bool(torch.isfinite(item["scores"]).all()):
            bad = int((~torch.isfinite(item["scores"])).nonzero()[0, 0])
            raise DivekitError(f"{name}[{i}]['scores'][{bad}] = {float(item['scores'][bad])} is not finite")


def _check_max_detections(max_detections: int | None) -> None:
    if max_detections is not None and (
        isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1
    ):
        raise DivekitError(f"max_detections must be a positive integer or None, got {max_detections!r}")


# --------------------------------------------------------------------------- the evaluation


def _flatten(items: Sequence[Mapping[str, Tensor]], with_scores: bool) -> tuple[Tensor, ...]:
    """All images' boxes, labels (and scores), and each row's image index, on the CPU."""
    boxes = [item["boxes"].detach().cpu() for item in items]
    dtype = torch.promote_types(torch.float32, boxes[0].dtype) if boxes else torch.float32
    for b in boxes[1:]:
        dtype = torch.promote_types(dtype, b.dtype)
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    out = [
        torch.cat([b.to(dtype) for b in boxes]) if boxes else torch.zeros(0, 4),
        torch.cat([item["labels"].detach().cpu().long() for item in items]) if items
        else torch.zeros(0, dtype=torch.long),
        torch.repeat_interleave(torch.arange(len(items)), counts),
    ]
    if with_scores:
        scores = [item["scores"].detach().cpu().double() for item in items]
        out.append(torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64))
    return tuple(out)


def _rank_in_image(image: Tensor, n_images: int) -> Tensor:
    """Position of each row within its image's run (``image`` sorted)."""
    counts = torch.bincount(image, minlength=n_images)
    starts = counts.cumsum(0) - counts
    return torch.arange(len(image)) - starts[image]


def _evaluate(
    preds: Sequence[Detections],
    targets: Sequence[Truths],
    iou_thresholds: Tensor,
    *,
    interpolation: str,
    max_detections: int | None,
    recall_thresholds: Tensor,
    area_range: tuple[float, float] | None,
) -> dict[int, Tensor]:
    """Per class with ground truth: AP at each IoU threshold, ``{class: (T,) double}``."""
    if len(preds) != len(targets):
        raise DivekitError(f"{len(preds)} prediction entries but {len(targets)} target entries")
    _check(preds, ("boxes", "scores", "labels"), "preds")
    _check(targets, ("boxes", "labels"), "targets")
    n_images = len(preds)
    p_boxes, p_labels, p_image, p_scores = _flatten(preds, with_scores=True)
    t_boxes, t_labels, t_image = _flatten(targets, with_scores=False)
    t_wh = _xywh(t_boxes)
    p_wh = _xywh(p_boxes)
    if area_range is None:
        t_ignored = torch.zeros(len(t_boxes), dtype=torch.bool)
        p_outside = torch.zeros(len(p_boxes), dtype=torch.bool)
    else:
        t_area, p_area = t_wh[:, 2] * t_wh[:, 3], p_wh[:, 2] * p_wh[:, 3]
        t_ignored = (t_area < area_range[0]) | (t_area > area_range[1])
        p_outside = (p_area < area_range[0]) | (p_area > area_range[1])

    result: dict[int, Tensor] = {}
    for c in sorted({int(v) for v in t_labels[~t_ignored].tolist()}):
        # this class's detections, per image by decreasing score (ties: given order), cut per image
        (det,) = torch.where(p_labels == c)
        det = det[torch.sort(p_scores[det], descending=True, stable=True).indices]
        det = det[torch.sort(p_image[det], stable=True).indices]
        det_rank = _rank_in_image(p_image[det], n_images)
        if max_detections is not None:
            det, det_rank = det[det_rank < max_detections], det_rank[det_rank < max_detections]
        # this class's truths, per image with the ignored ones last (pycocotools' order)
        (tru,) = torch.where(t_labels == c)
        tru = tru[torch.sort(t_ignored[tru].to(torch.uint8), stable=True).indices]
        tru = tru[torch.sort(t_image[tru], stable=True).indices]
        tru_rank = _rank_in_image(t_image[tru], n_images)
        num_truths = int((~t_ignored[tru]).sum())

        # pad to (images with any of them, D, G): only images that have detections or truths
        images = torch.unique(torch.cat((p_image[det], t_image[tru])))
        row_d = torch.searchsorted(images, p_image[det])
        row_t = torch.searchsorted(images, t_image[tru])
        n_det = int(det_rank.max()) + 1 if len(det) else 0
        n_tru = int(tru_rank.max()) + 1 if len(tru) else 0
        det_boxes = torch.zeros(len(images), n_det, 4, dtype=p_boxes.dtype)
        det_boxes[row_d, det_rank] = p_boxes[det]
        det_valid = torch.zeros(len(images), n_det, dtype=torch.bool)
        det_valid[row_d, det_rank] = True
        tru_boxes = torch.zeros(len(images), n_tru, 4, dtype=t_boxes.dtype)
        tru_boxes[row_t, tru_rank] = t_boxes[tru]
        tru_real = torch.zeros(len(images), n_tru, dtype=torch.bool)
        tru_real[row_t, tru_rank] = True
        tru_ignored = torch.zeros(len(images), n_tru, dtype=torch.bool)
        tru_ignored[row_t, tru_rank] = t_ignored[tru]

        iou = _coco_iou(det_boxes, tru_boxes)  # (I, D, G), once for every threshold
        iou = torch.where(tru_real[:, None, :], iou, -1.0)
        matched, on_ignored = _greedy_match(iou, det_valid, tru_ignored, iou_thresholds)
        outside = torch.zeros(len(images), n_det, dtype=torch.bool)
        outside[row_d, det_rank] = p_outside[det]
        ignored = on_ignored | (~matched & outside[:, None, :])

        # rank all of them: the per-image lists concatenated in image order, stable-sorted by score
        scores = torch.zeros(len(images), n_det, dtype=torch.float64)
        scores[row_d, det_rank] = p_scores[det]
        flat = det_valid.flatten()
        order = torch.sort(scores.flatten()[flat], descending=True, stable=True).indices
        n_thr = len(iou_thresholds)

        def ranked(flags: Tensor, flat: Tensor = flat, order: Tensor = order, n_thr: int = n_thr) -> Tensor:
            return flags.permute(1, 0, 2).reshape(n_thr, -1)[:, flat][:, order]

        tp, fp = ranked(matched & ~ignored), ranked(~matched & ~ignored)
        result[c] = _ranked_ap(tp, fp, num_truths, interpolation, recall_thresholds)
    return result


# --------------------------------------------------------------------------- public functions


def average_precision(scores: Tensor, is_true: Tensor, num_truths: int, interpolation: str = "all",
                      *, recall_thresholds: Sequence[float] = COCO_RECALL_THRESHOLDS) -> float:
    """AP of one class from its detections' ``scores (K,)`` and TP flags ``is_true (K,)``.

    Ties in score keep the given order (stable sort), as pycocotools does. ``recall_thresholds``
    are the points ``interpolation="coco"`` samples the envelope at.
    """
    _check_interpolation(interpolation)
    if num_truths <= 0:
        raise DivekitError(f"average_precision needs at least one ground-truth box, got {num_truths}")
    if scores.shape != is_true.shape or scores.dim() != 1:
        raise DivekitError(f"scores {tuple(scores.shape)} and is_true {tuple(is_true.shape)} "
                           "must be two vectors of one length")
    order = torch.sort(scores.detach().cpu().double(), descending=True, stable=True).indices
    flags = is_true.detach().cpu().bool()[order][None]
    return float(_ranked_ap(flags, ~flags, num_truths, interpolation,
                            _recall_thresholds(recall_thresholds))[0])


def match_detections(boxes: Tensor, scores: Tensor, truths: Tensor, iou_threshold: float) -> Tensor:
    """TP flags ``(K,)`` of one image's detections of one class against its truths ``(G, 4)``.

    Detections in decreasing score (ties by index) each take the unmatched truth they overlap
    most (the later one among equal IoUs, as pycocotools), if that IoU is ≥ ``iou_threshold``.
    """
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    iou = _coco_iou(boxes.detach().cpu()[order], truths.detach().cpu())[None]  # (1, K, G)
    matched, _ = _greedy_match(iou, torch.ones(1, len(order), dtype=torch.bool),
                               torch.zeros(1, len(truths), dtype=torch.bool),
                               _thresholds(iou_threshold, "iou_threshold"))
    is_true = torch.zeros(len(order), dtype=torch.bool)
    is_true[order] = matched[0, 0]
    return is_true


def mean_average_precision(
    preds: Sequence[Detections],
    targets: Sequence[Truths],
    iou_threshold: float = 0.5,
    *,
    interpolation: str = "all",
    max_detections: int | None = None,
    recall_thresholds: Sequence[float] = COCO_RECALL_THRESHOLDS,
) -> dict[str, object]:
    """mAP at one IoU threshold: ``preds[i]`` and ``targets[i]`` are image ``i``'s detections and truths.

    The dicts are torchmetrics' format. Returns ``{"map": float, "per_class": {class: AP}}``;
    ``map`` is NaN when no image has any truth. ``interpolation="coco"`` (with
    ``max_detections=100``, its default there, and COCO's area range) is torchmetrics'
    ``MeanAveragePrecision(iou_thresholds=[t])``; ``"all"`` is VOC's all-point AP, no cut.
    """
    _check_interpolation(interpolation)
    _check_max_detections(max_detections)
    coco = interpolation == "coco"
    if coco and max_detections is None:
        max_detections = 100
    per_class = _evaluate(
        preds, targets, _thresholds(iou_threshold, "iou_threshold"), interpolation=interpolation,
        max_detections=max_detections, recall_thresholds=_recall_thresholds(recall_thresholds),
        area_range=COCO_AREA_RANGE if coco else None,
    )
    aps = {c: float(ap[0]) for c, ap in per_class.items()}
    value = sum(aps.values()) / len(aps) if aps else float("nan")
    return {"map": value, "per_class": aps}


def coco_mean_average_precision(
    preds: Sequence[Detections],
    targets: Sequence[Truths],
    *,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    recall_thresholds: Sequence[float] = COCO_RECALL_THRESHOLDS,
    max_detections: int = 100,
) -> dict[str, object]:
    """COCO's summary AP: mAP averaged over IoU thresholds ``0.50:0.05:0.95``, and at 0.5 and 0.75.

    Returns ``{"map", "map_50", "map_75": float, "per_class": {class: AP averaged over the
    thresholds}, "per_threshold": [mAP at each threshold]}``: torchmetrics'
    ``MeanAveragePrecision()`` keys of the same names (``map_per_class`` for ``per_class``).
    ``map_50``/``map_75`` are NaN when 0.5/0.75 is not among ``iou_thresholds``, and everything
    is NaN when no image has any truth. The IoU of each image's detections and truths is computed
    once and every threshold is matched in the same pass.
    """
    _check_max_detections(max_detections)
    thresholds = _thresholds(iou_thresholds, "iou_thresholds")
    per_class = _evaluate(preds, targets, thresholds, interpolation="coco",
                          max_detections=max_detections,
                          recall_thresholds=_recall_thresholds(recall_thresholds),
                          area_range=COCO_AREA_RANGE)
    if not per_class:
        nan = float("nan")
        return {"map": nan, "map_50": nan, "map_75": nan, "per_class": {},
                "per_threshold": [nan] * len(thresholds)}
    table = torch.stack(list(per_class.values()))  # (C, T)
    per_threshold = table.mean(0)

    def at(t: float) -> float:
        (hit,) = torch.where(thresholds == t)
        return float(per_threshold[hit[0]]) if len(hit) else math.nan

    return {
        "map": float(table.mean()),
        "map_50": at(0.5),
        "map_75": at(0.75),
        "per_class": {c: float(ap.mean()) for c, ap in per_class.items()},
        "per_threshold": per_threshold.tolist(),
    }
