"""Single Shot MultiBox Detection, the course's tiny SSD (d2l 14.7; Liu et al., 2016).

A base network of down-sampling blocks, more blocks halving height and width, then a global
max-pool: five feature maps of falling resolution. At every scale each pixel gets anchors
(``multibox_prior``) and two 3×3 convolutions predict, per anchor, the class scores (with
background as class 0) and the four offsets of the box from its anchor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.models.detector import ADAM_RECIPE, Detector
from divekit.models.registry import register_model
from divekit.ops.anchors import multibox_detection, multibox_prior, multibox_target

# The course's anchor sizes per scale (growing with the receptive field) and aspect ratios.
SIZES: list[list[float]] = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
RATIOS: list[list[float]] = [[1.0, 2.0, 0.5]] * 5


def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two (3×3 conv, BatchNorm, ReLU) then a 2×2 max-pool: height and width halve."""
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def base_net(in_channels: int = 3) -> nn.Sequential:
    """Three down-sampling blocks, channels in → 16 → 32 → 64: (N, C, H, W) → (N, 64, H/8, W/8)."""
    channels = [in_channels, 16, 32, 64]
    return nn.Sequential(*[down_sample_blk(a, b) for a, b in zip(channels, channels[1:])])


def cls_predictor(in_channels: int, num_anchors: int, num_classes: int) -> nn.Conv2d:
    """(N, in, h, w) → (N, a·(C+1), h, w): class scores of every anchor, background included."""
    return nn.Conv2d(in_channels, num_anchors * (num_classes + 1), kernel_size=3, padding=1)


def bbox_predictor(in_channels: int, num_anchors: int) -> nn.Conv2d:
    """(N, in, h, w) → (N, a·4, h, w): the four offsets of every anchor."""
    return nn.Conv2d(in_channels, num_anchors * 4, kernel_size=3, padding=1)


def flatten_pred(pred: Tensor) -> Tensor:
    """(N, a·k, h, w) → (N, h·w·a·k), channels last so an anchor's k values stay together."""
    return pred.permute(0, 2, 3, 1).flatten(start_dim=1)


def multibox_loss(cls_preds: Tensor, cls_labels: Tensor, bbox_preds: Tensor, bbox_labels: Tensor,
                  bbox_masks: Tensor) -> Tensor:
    """The course's SSD loss per image ``(N,)``: mean cross-entropy over anchors plus mean L1
    of the offsets of the anchors assigned to an object (``bbox_masks``)."""
    n, a, k = cls_preds.shape
    cls = F.cross_entropy(cls_preds.reshape(-1, k).float(), cls_labels.reshape(-1),
                          reduction="none").reshape(n, a).mean(dim=1)
    bbox = F.l1_loss(bbox_preds.float() * bbox_masks, bbox_labels * bbox_masks,
                     reduction="none").mean(dim=1)
    return cls + bbox


class TinySSD(Detector):
    """``forward(x (N, C, H, W))`` → ``(anchors (1, A, 4), cls_preds (N, A, C+1), bbox_preds (N, A·4))``;
    ``forward(x, labels)`` → the multibox loss (class error and box MAE as metrics).

    Anchors are in normalised corner coordinates, ordered scale by scale, pixel by pixel,
    as the predictions are.
    """

    # What ``raw`` returns, named for ``divekit export`` (the ONNX outputs); the anchors depend
    # on the image size only, so they are one (1, A, 4) tensor whatever the batch.
    raw_outputs = ("anchors", "cls_preds", "bbox_preds")
    batch_free_outputs = ("anchors",)

    # Adam 1e-3 (its recipe) reaches mAP@0.5 0.99 on shapes in 8 epochs; the course's SGD 0.2
    # (``--optimizer sgd --lr 0.2 --momentum 0 --weight-decay 5e-4``) trains too, to 0.70.

    def __init__(self, num_classes: int, in_channels: int = 3,
                 sizes: Sequence[Sequence[float]] = SIZES, ratios: Sequence[Sequence[float]] = RATIOS):
        super().__init__()
        if num_classes < 1:
            raise DivekitError(f"tiny_ssd needs num_classes >= 1, got {num_classes}")
        if len(sizes) != 5 or len(ratios) != 5:
            raise DivekitError(
                f"tiny_ssd has 5 scales: give 5 lists of sizes and of ratios, got {len(sizes)} and {len(ratios)}"
            )
        self.num_classes = num_classes
        self.sizes = [list(map(float, s)) for s in sizes]
        self.ratios = [list(map(float, r)) for r in ratios]
        for i, (s, r) in enumerate(zip(self.sizes, self.ratios)):
            if not s or not r:
                raise DivekitError(f"scale {i}: sizes and ratios must not be empty")
        in_per_scale = [64, 128, 128, 128, 128]
        self.blocks = nn.ModuleList([
            base_net(in_channels), down_sample_blk(64, 128), down_sample_blk(128, 128),
            down_sample_blk(128, 128), nn.AdaptiveMaxPool2d((1, 1)),
        ])
        anchors_per_pixel = [len(s) + len(r) - 1 for s, r in zip(self.sizes, self.ratios)]
        self.cls_predictors = nn.ModuleList(
            cls_predictor(c, a, num_classes) for c, a in zip(in_per_scale, anchors_per_pixel))
        self.bbox_predictors = nn.ModuleList(
            bbox_predictor(c, a) for c, a in zip(in_per_scale, anchors_per_pixel))

    # the base net halves an image 3 times and the next two blocks twice more: below 64 pixels
    # the fourth block would have no pixel left to pool (a raw RuntimeError deep in the forward)
    MIN_IMAGE_SIZE = 64

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() == 4 and min(x.shape[-2:]) < self.MIN_IMAGE_SIZE:
            raise DivekitError(f"tiny_ssd needs images of at least {self.MIN_IMAGE_SIZE}×"
                               f"{self.MIN_IMAGE_SIZE} pixels (--image-size {self.MIN_IMAGE_SIZE} "
                               f"or more), got {x.shape[-2]}×{x.shape[-1]}")
        anchors, cls_preds, bbox_preds = [], [], []
        for i, block in enumerate(self.blocks):
            x = block(x)  # (N, c_i, h_i, w_i)
            anchors.append(multibox_prior(x, self.sizes[i], self.ratios[i]))  # (1, h·w·a, 4)
            cls_preds.append(flatten_pred(self.cls_predictors[i](x)))
            bbox_preds.append(flatten_pred(self.bbox_predictors[i](x)))
        all_anchors = torch.cat(anchors, dim=1).to(x.dtype)
        cls = torch.cat(cls_preds, dim=1).reshape(x.shape[0], -1, self.num_classes + 1)
        return all_anchors, cls, torch.cat(bbox_preds, dim=1)

    def compute_loss(self, outputs: tuple[Tensor, Tensor, Tensor], labels: Tensor,
                     masks: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        anchors, cls_preds, bbox_preds = outputs
        bbox_labels, bbox_masks, cls_labels = multibox_target(
            anchors.detach().float(), labels.float(), num_classes=self.num_classes)
        loss = multibox_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).mean()
        class_err = (cls_preds.detach().argmax(dim=-1) != cls_labels).float().mean()
        bbox_mae = ((bbox_labels - bbox_preds.detach().float()) * bbox_masks).abs().mean()
        return loss, {"loss": loss.detach(), "class_err": class_err, "bbox_mae": bbox_mae}

    def decode(self, outputs: tuple[Tensor, Tensor, Tensor], nms_iou: float = 0.5) -> Tensor:
        anchors, cls_preds, bbox_preds = outputs
        probs = F.softmax(cls_preds.float(), dim=2).permute(0, 2, 1)  # (N, C+1, A)
        return multibox_detection(probs, bbox_preds.float(), anchors.float(), nms_threshold=nms_iou)


@register_model("tiny_ssd", input_shape=(3, 256, 256), task="detect", recipes=ADAM_RECIPE)
def tiny_ssd(*, num_classes: int = 1, in_channels: int = 3,
             sizes: Sequence[Sequence[float]] = SIZES,
             ratios: Sequence[Sequence[float]] = RATIOS) -> TinySSD:
    """Tiny SSD (d2l 14.7): 5 scales, 4 anchors per pixel, class and box predictors per scale."""
    return TinySSD(num_classes, in_channels, sizes, ratios)
