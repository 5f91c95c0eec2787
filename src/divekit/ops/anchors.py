"""Anchor boxes: generation, labelling with ground truth, offsets and prediction (d2l 14.4).

The signatures and results are the course's (``d2l.torch`` 1.0.3): ``multibox_prior``,
``assign_anchor_to_bbox``, ``offset_boxes``, ``offset_inverse``, ``multibox_target`` and
``multibox_detection``. The insides are vectorised: over the batch and the anchors, with the
greedy assignment looping only over the ground-truth boxes. Where the course's code has a bug we
keep its intent instead (each difference is noted where it happens): ``iou_threshold`` is
honoured, padding rows (class -1) are not ground truth, and with more truths than anchors the
greedy step stops when the anchors run out.

Anchors and boxes are in corner format ``(x1, y1, x2, y2)``, normalised to ``[0, 1]`` by the
image's width and height; offsets are in the course's centre parametrisation (see
``offset_boxes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.ops import _native_anchors
from divekit.ops._checks import number_list
from divekit.ops.boxes import (
    _batched_nms_per_group,
    box_center_to_corner,
    box_corner_to_center,
    box_iou,
    validate_boxes,
)

__all__ = [
    "assign_anchor_to_bbox",
    "multibox_detection",
    "multibox_prior",
    "multibox_target",
    "offset_boxes",
    "offset_inverse",
]


def _positive_numbers(values: Sequence[float], name: str) -> list[float]:
    return number_list(values, name, lambda v: math.isfinite(v) and v > 0, "a positive number")


def _real_number(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise DivekitError(f"{name} must be a number, got {value!r}")
    return float(value)


def _anchors_2d(anchors: Tensor) -> Tensor:
    """Accept the course's ``(1, A, 4)`` or plain ``(A, 4)`` anchors; return ``(A, 4)``."""
    if not isinstance(anchors, Tensor):
        raise DivekitError(
            f"anchors must be a tensor (A, 4) or (1, A, 4), got {type(anchors).__name__}"
        )
    if anchors.dim() == 3 and anchors.shape[0] == 1:
        anchors = anchors[0]
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise DivekitError(
            f"anchors must have shape (A, 4) or (1, A, 4), got {tuple(anchors.shape)}"
        )
    return validate_boxes(anchors, "anchors")


# --------------------------------------------------------------------------- generating anchors


def multibox_prior(data: Tensor, sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Anchors centred on every pixel of ``data (..., h, w)`` -> ``(1, h*w*(n+m-1), 4)``, corner.

    With sizes ``s_1..s_n`` and ratios ``r_1..r_m`` each pixel gets the ``n + m - 1`` anchors
    ``(s_i, r_1)`` and ``(s_1, r_j)``: width ``s·√r``, height ``s/√r``, as fractions of the image
    height, so the width is multiplied by ``h / w`` to normalise it by the image width (the
    course's handling of rectangular inputs). Anchors of one pixel are consecutive, pixels in
    row-major order, exactly as ``d2l.multibox_prior`` lays them out. The dtype is ``data``'s if it
    is floating point (d2l always gives float32), else the default.
    """
    if not isinstance(data, Tensor) or data.dim() < 2:
        raise DivekitError("data must be a tensor whose last two dimensions are (height, width)")
    sizes, ratios = _positive_numbers(sizes, "sizes"), _positive_numbers(ratios, "ratios")
    in_height, in_width = data.shape[-2:]
    device = data.device
    dtype = data.dtype if data.is_floating_point() else torch.get_default_dtype()
    size_tensor = torch.tensor(sizes, device=device, dtype=dtype)
    ratio_tensor = torch.tensor(ratios, device=device, dtype=dtype)
    # Pixel centres, normalised: a pixel is 1 wide, so its centre is at +0.5.
    center_h = (torch.arange(in_height, device=device, dtype=dtype) + 0.5) * (1.0 / in_height)
    center_w = (torch.arange(in_width, device=device, dtype=dtype) + 0.5) * (1.0 / in_width)
    shift_y, shift_x = torch.meshgrid(center_h, center_w, indexing="ij")  # (h, w) each
    centers = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(
        -1, 1, 4
    )  # (h*w, 1, 4)

    # Widths and heights of the n + m - 1 shapes, each (n+m-1,).
    w = torch.cat(
        (size_tensor * torch.sqrt(ratio_tensor[0]), sizes[0] * torch.sqrt(ratio_tensor[1:]))
    )
    w = w * in_height / in_width  # normalise by the width, not the height
    h = torch.cat(
        (size_tensor / torch.sqrt(ratio_tensor[0]), sizes[0] / torch.sqrt(ratio_tensor[1:]))
    )
    half = torch.stack((-w, -h, w, h), dim=-1) / 2  # (n+m-1, 4)
    return (centers + half).reshape(1, -1, 4)  # (1, h*w*(n+m-1), 4)


# --------------------------------------------------------------------------- labelling anchors


def _assign_batched(iou: Tensor, valid: Tensor, iou_threshold: float,
                    may_be_nan: bool = True) -> Tensor:
    """The greedy assignment for a batch: ``iou (B, G, A)`` (truths x anchors), ``valid (B, G)``.

    Returns ``(B, A)``: the truth assigned to each anchor, or -1. Ties go to the smaller anchor
    index, then the smaller truth index, as the course's row-major ``argmax`` over its anchors x
    truths matrix does. (The matrix is kept truths-first so its long rows run over the anchors.)
    ``iou`` is overwritten. ``may_be_nan=False`` says no IoU is NaN (every anchor has a positive
    area, so every union does), which saves a pass over the matrix.
    """
    batch, num_truths, num_anchors = iou.shape
    if num_truths == 0:
        return torch.full((batch, num_anchors), -1, dtype=torch.long, device=iou.device)
    # NaN (two empty boxes) means no overlap: only possible when both boxes have zero area, so
    # the caller says whether a pass over the matrix is needed. Invalid truths (padding) get
    # -1, the course's "deleted" marker, so they are never picked.
    if may_be_nan:
        iou = iou.nan_to_num_(0.0)
    if not bool(valid.all()):
        iou.masked_fill_(~valid[:, :, None], -1.0)
    # Step 2 of the course: every anchor takes its best truth if the IoU reaches the threshold.
    # (Done first; the greedy pairs below overwrite it, as in d2l.) max gives the first of
    # equal truths, i.e. the smaller index.
    best, truth_of = iou.max(dim=1)  # (B, A) each
    assigned = torch.where(best >= max(iou_threshold, 0.0), truth_of, -1)
    # Step 1: repeatedly pair the largest remaining IoU's anchor and truth, then delete that
    # anchor's column and that truth's row. One round per truth, all images at once; an image
    # whose entries are all deleted (max < 0) has run out of truths or anchors and sits out.
    rows = torch.arange(batch, device=iou.device)
    for _ in range(min(num_truths, num_anchors)):
        largest, anchor = iou.amax(dim=1).max(dim=1)  # (B,): the first anchor holding the maximum
        truth = (iou[rows, :, anchor] == largest[:, None]).to(torch.uint8).argmax(dim=1)  # (B,)
        active = largest >= 0
        assigned[rows, anchor] = torch.where(active, truth, assigned[rows, anchor])
        iou[rows, :, anchor] = -1.0
        iou[rows, truth, :] = -1.0
    return assigned


def assign_anchor_to_bbox(
    ground_truth: Tensor,
    anchors: Tensor,
    device: torch.device | str | None = None,
    iou_threshold: float = 0.5,
) -> Tensor:
    """Assign ground-truth boxes ``(G, 4)`` to anchors ``(A, 4)`` (both corner) -> ``(A,)`` int64.

    The course's greedy algorithm on the ``A × G`` IoU matrix: take its largest entry, pair that
    anchor with that truth, delete the row and the column, repeat until the truths (or anchors)
    are used up; then every other anchor takes its best truth if their IoU is at least
    ``iou_threshold``. Unassigned anchors get -1. The result is on ``device`` (default: the
    anchors' device).
    """
    validate_boxes(ground_truth, "ground_truth")
    anchors = _anchors_2d(anchors)
    if ground_truth.dim() != 2:
        raise DivekitError(f"ground_truth must have shape (G, 4), got {tuple(ground_truth.shape)}")
    iou_threshold = _real_number(iou_threshold, "iou_threshold")
    ground_truth = ground_truth.to(anchors.device)
    iou = box_iou(ground_truth, anchors)[None]  # (1, G, A)
    valid = torch.ones(1, ground_truth.shape[0], dtype=torch.bool, device=anchors.device)
    assigned = _assign_batched(iou, valid, iou_threshold)[0]
    return assigned.to(device if device is not None else anchors.device)


def _offset_planes(
    anchor: Sequence[Tensor], box: Sequence[Tensor], eps: float
) -> tuple[Tensor, ...]:
    """``offset_boxes`` on coordinate planes: corner ``(x1, y1, x2, y2)`` tensors in, 4 out."""
    ax, ay = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    bx, by = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    bw, bh = box[2] - box[0], box[3] - box[1]
    return (
        10 * (bx - ax) / aw,
        10 * (by - ay) / ah,
        5 * torch.log(eps + bw / aw),
        5 * torch.log(eps + bh / ah),
    )


def offset_boxes(anchors: Tensor, assigned_bb: Tensor, eps: float = 1e-6) -> Tensor:
    """Offsets of boxes from their anchors, both corner ``(..., 4)`` -> ``(..., 4)``.

    With anchor centre ``(x_a, y_a)``, size ``(w_a, h_a)`` and box ``(x_b, y_b, w_b, h_b)``:
    ``(10 (x_b - x_a) / w_a, 10 (y_b - y_a) / h_a, 5 log(eps + w_b / w_a), 5 log(eps + h_b / h_a))``
    — the course's normalisation (means 0, standard deviations 0.1 and 0.2).
    """
    return torch.stack(_offset_planes(anchors.unbind(-1), assigned_bb.unbind(-1), eps), dim=-1)


def offset_inverse(anchors: Tensor, offset_preds: Tensor) -> Tensor:
    """Boxes from anchors (corner ``(..., 4)``) and predicted offsets ``(..., 4)`` -> corner boxes.

    The inverse of ``offset_boxes`` (up to its ``eps``).
    """
    anc = box_corner_to_center(anchors)
    pred_bbox_xy = (offset_preds[..., :2] * anc[..., 2:] / 10) + anc[..., :2]
    pred_bbox_wh = torch.exp(offset_preds[..., 2:] / 5) * anc[..., 2:]
    return box_center_to_corner(torch.cat((pred_bbox_xy, pred_bbox_wh), dim=-1))


def _check_labels(labels: Tensor, num_classes: int | None) -> None:
    """Labels ``(B, G, 5)`` rows ``[class, x1, y1, x2, y2]``; class -1 marks a padding row."""
    if not isinstance(labels, Tensor) or labels.dim() != 3 or labels.shape[-1] != 5:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise DivekitError(
            f"labels must have shape (batch, max_objects, 5) with rows [class, x1, y1, x2, y2], got {shape}"
        )
    if labels.numel() == 0:
        return
    cls = labels[..., 0]
    bad = ~torch.isfinite(cls) | (cls != torch.round(cls)) | (cls < -1)
    if num_classes is not None:
        bad |= cls >= num_classes
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        valid = f"0..{num_classes - 1}" if num_classes is not None else "a whole number >= 0"
        raise DivekitError(
            f"labels[{b}, {j}] has class {float(cls[b, j]):g}; expected {valid}, or -1 for a padding row"
        )
    # Padding rows may hold anything; check only real objects' boxes.
    boxes = torch.where((cls < 0)[..., None], torch.zeros_like(labels[..., 1:]), labels[..., 1:])
    validate_boxes(boxes, "labels")


def multibox_target(
    anchors: Tensor,
    labels: Tensor,
    *,
    iou_threshold: float = 0.5,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Label anchors ``(1, A, 4)`` or ``(A, 4)`` (corner) with the truths in ``labels (B, G, 5)``.

    ``labels`` rows are ``[class, x1, y1, x2, y2]`` (corner, normalised), class -1 for padding.
    Returns ``(bbox_offset (B, A*4), bbox_mask (B, A*4), class_labels (B, A))``: the offsets of
    each anchor's assigned truth (``offset_boxes``; 0 where unassigned), a 1/0 mask of assigned
    anchors repeated 4 times, and ``class + 1`` per anchor with 0 for background. ``num_classes``,
    when given, bounds the classes allowed. (The course treats padding rows as truths and always
    uses the threshold 0.5; here padding is ignored and ``iou_threshold`` is honoured.)
    """
    anchors = _anchors_2d(anchors)
    _check_labels(labels, num_classes)
    iou_threshold = _real_number(iou_threshold, "iou_threshold")
    labels = labels.to(device=anchors.device, dtype=anchors.dtype)
    batch, num_anchors = labels.shape[0], anchors.shape[0]
    truth_boxes, truth_classes = labels[..., 1:], labels[..., 0]  # (B, G, 4), (B, G)
    if truth_boxes.shape[1] == 0:  # no objects at all: every anchor is background
        zeros = torch.zeros(batch, num_anchors * 4, dtype=anchors.dtype, device=anchors.device)
        return (
            zeros,
            zeros.clone(),
            torch.zeros(batch, num_anchors, dtype=torch.long, device=anchors.device),
        )

    if num_anchors > 0 and _native_anchors.usable(anchors):  # float32 on the CPU: one C pass
        class_labels, bbox_mask, positive, truth = _native_anchors.assign_anchors(
            anchors, labels, iou_threshold)
        image, anchor = positive // num_anchors, positive % num_anchors
        bbox_offset = torch.zeros(batch, num_anchors, 4, dtype=anchors.dtype)
        bbox_offset.view(-1, 4)[positive] = offset_boxes(anchors[anchor], truth_boxes[image, truth])
        return bbox_offset.reshape(batch, -1), bbox_mask, class_labels

    iou = box_iou(truth_boxes, anchors)  # (B, G, A)
    # a union is 0 (IoU NaN) only when both boxes are empty: not with anchors of positive area
    empty_anchor = not bool(((anchors[:, 2] > anchors[:, 0]) & (anchors[:, 3] > anchors[:, 1])).all())
    assigned = _assign_batched(iou, truth_classes >= 0, iou_threshold, empty_anchor)  # (B, A)
    # Only the few positive anchors need a class, offsets and mask; the rest stay 0.
    image, anchor = (assigned >= 0).nonzero(as_tuple=True)  # (P,) each
    truth = assigned[image, anchor]
    class_labels = torch.zeros(batch, num_anchors, dtype=torch.long, device=anchors.device)
    class_labels[image, anchor] = truth_classes[image, truth].long() + 1
    bbox_offset = torch.zeros(batch, num_anchors, 4, dtype=anchors.dtype, device=anchors.device)
    bbox_offset[image, anchor] = offset_boxes(anchors[anchor], truth_boxes[image, truth])
    bbox_mask = torch.zeros_like(bbox_offset)
    bbox_mask[image, anchor] = 1.0
    return bbox_offset.reshape(batch, -1), bbox_mask.reshape(batch, -1), class_labels


# --------------------------------------------------------------------------- predicting boxes


def _check_detection_inputs(cls_probs: Tensor, offset_preds: Tensor, anchors: Tensor) -> None:
    if not isinstance(cls_probs, Tensor) or cls_probs.dim() != 3 or cls_probs.shape[1] < 2:
        shape = (
            tuple(cls_probs.shape) if isinstance(cls_probs, Tensor) else type(cls_probs).__name__
        )
        raise DivekitError(
            f"cls_probs must have shape (batch, num_classes + 1, num_anchors) with a background row, got {shape}"
        )
    batch, _, num_anchors = cls_probs.shape
    if num_anchors != anchors.shape[0]:
        raise DivekitError(
            f"cls_probs has {num_anchors} anchors but anchors has {anchors.shape[0]}"
        )
    if not isinstance(offset_preds, Tensor) or offset_preds.numel() != batch * num_anchors * 4:
        shape = (
            tuple(offset_preds.shape)
            if isinstance(offset_preds, Tensor)
            else type(offset_preds).__name__
        )
        raise DivekitError(
            f"offset_preds must have shape ({batch}, {num_anchors * 4}), got {shape}"
        )


def multibox_detection(
    cls_probs: Tensor,
    offset_preds: Tensor,
    anchors: Tensor,
    nms_threshold: float = 0.5,
    pos_threshold: float = 0.009,
    *,
    class_agnostic: bool = True,
) -> Tensor:
    """Predicted boxes from class probabilities and offsets, after NMS -> ``(B, A, 6)``.

    ``cls_probs (B, C+1, A)`` (row 0 is background), ``offset_preds (B, A*4)``, anchors
    ``(1, A, 4)`` or ``(A, 4)`` corner. Each output row is ``[class, confidence, x1, y1, x2, y2]``
    (corner): class -1 for an anchor suppressed by NMS or whose confidence is below
    ``pos_threshold`` (its confidence is then ``1 - confidence``, as in the course). Rows are in
    the course's order: the kept boxes by decreasing confidence, then the others by anchor index.
    NMS is the course's class-agnostic one by default; ``class_agnostic=False`` suppresses only
    within a class (``batched_nms``).
    """
    anchors = _anchors_2d(anchors)
    _check_detection_inputs(cls_probs, offset_preds, anchors)
    nms_threshold = _real_number(nms_threshold, "nms_threshold")
    pos_threshold = _real_number(pos_threshold, "pos_threshold")
    batch, _, num_anchors = cls_probs.shape
    device = cls_probs.device
    anchors = anchors.to(device)

    conf, class_id = torch.max(cls_probs[:, 1:], dim=1)  # (B, A) each, background excluded
    predicted_bb = offset_inverse(anchors, offset_preds.reshape(batch, num_anchors, 4))  # (B, A, 4)

    # NMS for the whole batch at once: images (and, per class, classes) are separate groups, each
    # through torchvision's kernel on its own unshifted boxes, so the result is exactly that of
    # per-image NMS. (Predicted boxes are not validated: a diverged model's NaNs pass through.)
    image = torch.arange(batch, device=device)[:, None].expand(batch, num_anchors)  # (B, A)
    group = image if class_agnostic else image * (cls_probs.shape[1] - 1) + class_id
    flat_boxes, flat_conf = predicted_bb.reshape(-1, 4), conf.reshape(-1)
    keep = _batched_nms_per_group(
        flat_boxes, flat_conf, group.reshape(-1), nms_threshold, fast=True
    )
    # The kept indices come by decreasing confidence, ties by index; a stable sort by image
    # keeps that order within each image.
    keep = keep[torch.sort(keep // num_anchors, stable=True).indices]

    # Sort key per anchor: a kept one's rank among its image's kept, others A + anchor index.
    kept_image = keep // num_anchors
    counts = torch.bincount(kept_image, minlength=batch)
    first = torch.cumsum(counts, 0) - counts  # where each image's kept run starts in `keep`
    key = (num_anchors + torch.arange(num_anchors, device=device)).repeat(batch, 1)  # (B, A)
    key.view(-1)[keep] = torch.arange(keep.numel(), device=device) - first[kept_image]
    order = torch.argsort(key, dim=1)  # (B, A)

    is_kept = torch.zeros(batch * num_anchors, dtype=torch.bool, device=device)
    is_kept[keep] = True
    class_id = torch.where(is_kept.view(batch, num_anchors), class_id, -1)
    class_id, conf = class_id.gather(1, order), conf.gather(1, order)
    predicted_bb = predicted_bb.gather(1, order[..., None].expand(-1, -1, 4))
    below = conf < pos_threshold  # not confident enough to be an object
    class_id = torch.where(below, -1, class_id)
    conf = torch.where(below, 1 - conf, conf)
    return torch.cat((class_id[..., None].to(conf.dtype), conf[..., None], predicted_bb), dim=-1)
