"""YOLO v1 as a grid detector: one network pass, an S×S grid of box predictors (Redmon et al., 2016).

The course (d2l 14.7) builds SSD, which predicts offsets from anchor boxes at several scales;
YOLO ("You Only Look Once"), which the course cites beside it, is the anchor-free ancestor.
A conv backbone (3×3 conv, BatchNorm, LeakyReLU 0.1; stride-2 convs down-sample) maps the image
to an S×S grid, S = image_size / 16 by default. Each cell predicts

* B boxes, each ``(x, y, √w, √h, confidence)``: ``x, y`` the centre's offset inside the cell
  and ``√w, √h`` the square roots of the width and height as fractions of the image, all four
  through a sigmoid (so boxes are always inside the image's scale; ``w = sigmoid(t)²`` keeps the
  paper's square-root parametrisation, in which the same error counts more on small boxes),
  and the confidence ``Pr(object) · IoU`` through a sigmoid;
* C class scores, ``Pr(class | object)``, shared by the cell's B boxes.

Training targets (paper §2.2): the cell holding an object's centre is responsible for it (when
two centres fall into one cell, the object listed first keeps it, as YOLO v1 has one class per
cell); of that cell's B boxes, the one whose current prediction has the highest IoU with the
truth is responsible. The loss, summed over the grid and averaged over images, is

    λ_coord Σ_resp [(x − x̂)² + (y − ŷ)² + (√w − √ŵ)² + (√h − √ĥ)²]     "coord"
    + Σ_resp (C − IoU(pred, truth))²                                    "obj"
    + λ_noobj Σ_not-resp C²                                             "noobj"
    + Σ_cells-with-object CE(class scores, true class)                  "cls"

with λ_coord = 5 and λ_noobj = 0.5 as in the paper, and the confidence target the (detached)
IoU of the responsible box (``rescore=False``: 1). Coordinates and confidence are sum-squared
as in the paper; the class term is softmax cross-entropy instead of the paper's sum-squared
error on probabilities: squared error on a softmax has vanishing gradients where the softmax
is confidently wrong, while cross-entropy's gradient is ``p − y`` throughout, which suits a
budget of a few CPU epochs (on shapes at 96 px the class loss is near 0 after 2 epochs).

Decoding (paper §2): the class-specific score of box b in a cell is ``C_b · Pr(class | object)``
for every class; boxes are clipped to the image, per-class NMS drops duplicates and the best
``max_detections`` rows per image are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision  # type: ignore[import-untyped]
from torch import Tensor, nn

from divekit.config import option
from divekit.errors import DivekitError
from divekit.models.detector import ADAM_RECIPE, Detector, real_rows
from divekit.models.registry import register_model
from divekit.ops.boxes import box_center_to_corner, box_corner_to_center, box_iou

LAMBDA_COORD = 5.0
LAMBDA_NOOBJ = 0.5


def conv_bn(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
            kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows), BatchNorm, LeakyReLU(0.1) as in YOLO; stride 2 halves H, W."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                  dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1))


def check_images(x: Tensor, in_channels: int, model: str) -> None:
    """Refuse anything but an ``(N, in_channels, H, W)`` batch, in one line."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise DivekitError(f"{model} takes images (N, {in_channels}, H, W), got shape {tuple(x.shape)}")


def check_at_least(model: str, **sizes: tuple[int, int]) -> None:
    """Refuse a hyper-parameter below its least value, in one line: ``name=(value, least)``
    gives ``"<model> needs <name> >= <least>, got <value>"`` (the first offender, in order)."""
    for name, (value, least) in sizes.items():
        if value < least:
            raise DivekitError(f"{model} needs {name} >= {least}, got {value}")


def check_labels(labels: Tensor, batch: int, num_classes: int, model: str) -> None:
    """Refuse labels that are not ``(N, G, 5)`` rows for this batch, or name a class the model
    lacks (naming the first offending ``[image, row]``); class indexing would fail cryptically."""
    if labels.dim() != 3 or labels.shape[-1] != 5 or labels.shape[0] != batch:
        raise DivekitError(f"{model}: labels must be ({batch}, objects, 5) rows [class, x1, y1, x2, y2], "
                           f"got shape {tuple(labels.shape)}")
    cls = labels[..., 0]
    bad = real_rows(labels) & ((cls >= num_classes) | (cls != cls.round()))
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise DivekitError(f"{model}: labels[{i}, {j}] has class {float(cls[i, j]):g}; "
                           f"the model has classes 0..{num_classes - 1}")


def pack_detections(boxes: Tensor, scores: Tensor, classes: Tensor, num_classes: int, nms_iou: float,
                    max_detections: int, min_score: float = 0.0) -> Tensor:
    """Candidates → the detector interface's ``(N, K, 6)`` rows ``[class, score, x1, y1, x2, y2]``.

    ``boxes (N, M, 4)`` normalised corners, ``scores (N, M)`` in [0, 1], ``classes (N, M)`` int.
    Boxes are clipped to [0, 1]; candidates scoring at most ``min_score`` are dropped; per-class
    NMS at ``nms_iou`` (none when ``nms_iou >= 1``) runs on all images at once, each image and
    class its own group (``torchvision.ops.batched_nms``). The ``K = max_detections`` best rows
    by score follow; the rest (dropped, suppressed, or fewer than K candidates) are padding rows
    ``[-1, 0, 0, 0, 0, 0]``.
    """
    n, m = scores.shape
    boxes = torch.nan_to_num(boxes.float(), nan=0.0).clamp(0, 1)
    scores = torch.nan_to_num(scores.float(), nan=0.0)
    keep = scores > min_score
    if nms_iou < 1:
        candidates = keep.flatten().nonzero().squeeze(1)
        groups = (torch.arange(n, device=scores.device)[:, None] * num_classes + classes).flatten()
        kept = torchvision.ops.batched_nms(boxes.reshape(-1, 4)[candidates], scores.flatten()[candidates],
                                           groups[candidates], float(nms_iou))
        keep = torch.zeros(n * m, dtype=torch.bool, device=scores.device)
        keep[candidates[kept]] = True
        keep = keep.view(n, m)
    k = min(max_detections, m)
    order = torch.where(keep, scores, -1.0).topk(k, dim=1).indices  # dropped ones rank last
    valid = keep.gather(1, order)
    rows = torch.zeros(n, max_detections, 6, device=scores.device)
    rows[..., 0] = -1
    rows[:, :k, 0] = torch.where(valid, classes.gather(1, order).float(), -1.0)
    rows[:, :k, 1] = torch.where(valid, scores.gather(1, order), 0.0)
    rows[:, :k, 2:] = torch.where(valid[..., None], boxes.gather(1, order[..., None].expand(-1, -1, 4)), 0.0)
    return rows


def yolo_targets(labels: Tensor, grid_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which cell is responsible for which object (paper §2.2).

    ``labels (N, G, 5)`` → ``has_object (N, S, S)`` bool, ``boxes (N, S, S, 4)`` the responsible
    object's normalised corner box, ``classes (N, S, S)`` long (−1 where no object). Grid index
    ``[n, row, col]``: ``row = ⌊cy·S⌋``, ``col = ⌊cx·S⌋`` (clamped to S − 1 for a centre on the
    image's far edge). When centres share a cell, the first listed object keeps it.
    """
    n, g, _ = labels.shape
    s, device = grid_size, labels.device
    has_object = torch.zeros(n, s, s, dtype=torch.bool, device=device)
    boxes = torch.zeros(n, s, s, 4, device=device)
    classes = torch.full((n, s, s), -1, dtype=torch.long, device=device)
    real = real_rows(labels)
    centres = box_corner_to_center(labels[..., 1:].float())
    cells = (centres[..., :2] * s).floor().long().clamp(0, s - 1)  # (N, G, 2): col, row
    images = torch.arange(n, device=device)
    for j in reversed(range(g)):  # the first listed object writes last, so it keeps a shared cell
        i = images[real[:, j]]
        col, row = cells[i, j, 0], cells[i, j, 1]
        has_object[i, row, col] = True
        boxes[i, row, col] = labels[i, j, 1:].float()
        classes[i, row, col] = labels[i, j, 0].long()
    return has_object, boxes, classes


def responsible_boxes(pred_boxes: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Of each cell's B predicted corner boxes ``(N, S, S, B, 4)``, the one with the highest IoU
    with the cell's truth ``(N, S, S, 4)``: returns ``(index (N, S, S), IoUs (N, S, S, B))``
    (ties: the lower index)."""
    ious = box_iou(pred_boxes, truth[..., None, :]).squeeze(-1)
    return ious.argmax(dim=-1), ious


class YoloGrid(Detector):
    """``forward(x (N, C, H, W))`` → ``(N, S, S, B·5 + classes)``: per cell, B groups of
    ``(x, y, √w, √h, confidence)`` logits then the class logits; ``forward(x, labels)`` → the
    YOLO v1 loss with its parts ``coord``, ``obj``, ``noobj``, ``cls`` as metrics.

    The backbone down-samples 16× (four stride-2 convs, channels 16 → 32 → 64 → 128 → 256); if
    that does not give an S×S map (another ``grid_size``, or a different input size) the
    features are adaptively average-pooled to S×S, so the grid is always the configured one.
    """

    raw_outputs = ("grid",)  # what ``raw`` returns, named for export

    def __init__(self, num_classes: int, in_channels: int = 3, grid_size: int = 8, boxes_per_cell: int = 2,
                 *, rescore: bool = True, max_detections: int = 100, min_score: float = 1e-3):
        super().__init__()
        check_at_least("yolo_grid", num_classes=(num_classes, 1), max_detections=(max_detections, 1))
        if grid_size < 2:
            raise DivekitError(f"yolo_grid needs a grid of at least 2×2 cells, got grid_size {grid_size}")
        if boxes_per_cell < 1:
            raise DivekitError(f"yolo_grid needs at least 1 box per cell, got boxes_per_cell {boxes_per_cell}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.grid_size, self.boxes_per_cell = grid_size, boxes_per_cell
        self.rescore, self.max_detections, self.min_score = rescore, max_detections, min_score
        widths = [16, 32, 64, 128, 256]
        layers = [conv_bn(in_channels, widths[0])]
        for a, b in zip(widths, widths[1:]):
            layers += [conv_bn(a, b, stride=2), conv_bn(b, b)]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Sequential(conv_bn(256, 256),
                                  nn.Conv2d(256, boxes_per_cell * 5 + num_classes, kernel_size=1))

    def raw(self, x: Tensor) -> Tensor:
        check_images(x, self.in_channels, "yolo_grid")
        features = self.backbone(x)
        if tuple(features.shape[-2:]) != (self.grid_size, self.grid_size):
            features = F.adaptive_avg_pool2d(features, self.grid_size)
        return self.head(features).permute(0, 2, 3, 1)  # (N, S, S, B·5 + C)

    def split(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw outputs → ``xy (N, S, S, B, 2)`` cell offsets, ``sqrt_wh (N, S, S, B, 2)``,
        ``confidence (N, S, S, B)`` (all after the sigmoid) and class logits ``(N, S, S, C)``."""
        n, s = outputs.shape[0], outputs.shape[1]
        b = self.boxes_per_cell
        box = torch.sigmoid(outputs[..., :5 * b].float()).reshape(n, s, s, b, 5)
        return box[..., :2], box[..., 2:4], box[..., 4], outputs[..., 5 * b:].float()

    def corner_boxes(self, xy: Tensor, sqrt_wh: Tensor) -> Tensor:
        """Cell offsets and square-root sizes → normalised corner boxes ``(N, S, S, B, 4)``."""
        s = xy.shape[1]
        steps = torch.arange(s, device=xy.device, dtype=xy.dtype)
        cx = (steps[None, None, :, None] + xy[..., 0]) / s  # the column runs along dim 2
        cy = (steps[None, :, None, None] + xy[..., 1]) / s
        wh = sqrt_wh ** 2
        return box_center_to_corner(torch.stack((cx, cy, wh[..., 0], wh[..., 1]), dim=-1))

    def compute_loss(self, outputs: Tensor, labels: Tensor,
                     masks: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        n, s = outputs.shape[0], outputs.shape[1]
        check_labels(labels, n, self.num_classes, "yolo_grid")
        xy, sqrt_wh, conf, cls_logits = self.split(outputs)
        has_object, truth, truth_cls = yolo_targets(labels, s)
        best, ious = responsible_boxes(self.corner_boxes(xy, sqrt_wh).detach(), truth)
        resp = F.one_hot(best, self.boxes_per_cell).bool() & has_object[..., None]  # (N, S, S, B)

        centre = box_corner_to_center(truth)  # (N, S, S, 4)
        steps = torch.arange(s, device=outputs.device, dtype=centre.dtype)
        t_xy = torch.stack((centre[..., 0] * s - steps[None, None, :], centre[..., 1] * s - steps[:, None]), -1)
        t_sqrt_wh = centre[..., 2:].clamp(min=0).sqrt()
        coord_err = ((xy - t_xy[..., None, :]) ** 2 + (sqrt_wh - t_sqrt_wh[..., None, :]) ** 2).sum(-1)
        coord = LAMBDA_COORD * (coord_err * resp).sum() / n
        conf_target = ious.detach() if self.rescore else torch.ones_like(conf)
        obj = (((conf - conf_target) ** 2) * resp).sum() / n
        noobj = LAMBDA_NOOBJ * ((conf ** 2) * ~resp).sum() / n
        cls = F.cross_entropy(cls_logits[has_object], truth_cls[has_object], reduction="sum") / n
        loss = coord + obj + noobj + cls
        metrics = {"loss": loss.detach(), "coord": coord.detach(), "obj": obj.detach(),
                   "noobj": noobj.detach(), "cls": cls.detach()}
        return loss, metrics

    def decode(self, outputs: Tensor, nms_iou: float = 0.5) -> Tensor:
        n = outputs.shape[0]
        xy, sqrt_wh, conf, cls_logits = self.split(outputs)
        boxes = self.corner_boxes(xy, sqrt_wh)  # (N, S, S, B, 4)
        probs = F.softmax(cls_logits, dim=-1)  # (N, S, S, C)
        scores = conf[..., :, None] * probs[..., None, :]  # (N, S, S, B, C): class-specific confidence
        c = self.num_classes
        classes = torch.arange(c, device=outputs.device).expand_as(scores)
        boxes = boxes[..., None, :].expand(*scores.shape, 4)
        return pack_detections(boxes.reshape(n, -1, 4), scores.reshape(n, -1), classes.reshape(n, -1),
                               c, nms_iou, self.max_detections, self.min_score)


@dataclass(frozen=True)
class YoloConfig:
    """``yolo_grid``'s hyper-parameters, named as the builder's arguments (``--grid-size``,
    ``--boxes-per-cell`` on ``divekit train yolo_grid``)."""

    grid_size: int | None = option(None, "cells per side of the grid, S (default: image size / 16)",
                                   metavar="S")
    boxes_per_cell: int = option(2, "boxes each grid cell predicts, B", metavar="B")

    def __post_init__(self) -> None:
        s, b = self.grid_size, self.boxes_per_cell
        if s is not None and not (isinstance(s, int) and s >= 2):
            raise DivekitError(f"--grid-size must be an integer of at least 2, got {s!r}")
        if not (isinstance(b, int) and b >= 1):
            raise DivekitError(f"--boxes-per-cell must be an integer of at least 1, got {b!r}")


@register_model("yolo_grid", input_shape=(3, 128, 128), task="detect", config=YoloConfig,
                recipes=ADAM_RECIPE)
def yolo_grid(*, num_classes: int = 1, in_channels: int = 3, image_size: int = 128,
              grid_size: int | None = None, boxes_per_cell: int = 2, rescore: bool = True) -> YoloGrid:
    """YOLO v1-style grid detector: S×S cells (S = image_size / 16), B boxes and class scores per cell."""
    if image_size < 32:
        raise DivekitError(f"yolo_grid needs image_size >= 32, got {image_size}")
    s = grid_size if grid_size is not None else max(2, image_size // 16)
    return YoloGrid(num_classes, in_channels, s, boxes_per_cell, rescore=rescore)
