"""Two-stage detectors, Faster R-CNN and Mask R-CNN, from torchvision (d2l 14.8).

R-CNNs (d2l 14.8.1–14.8.4) detect in two stages. A backbone CNN with a feature pyramid
(FPN) computes feature maps; a *region proposal network* (RPN, 14.8.3) slides a small conv
over them and, for every anchor box (14.4), scores "object or not" and regresses offsets,
keeping the few hundred best boxes after NMS as *proposals*. Then *RoI align* (14.8.4, the
bilinear refinement of RoI pooling, 14.8.2) cuts a fixed 7 × 7 feature window out of the
pyramid level matching each proposal's size, and a box head classifies it into C + 1 classes
(background included) and refines its box once more. Mask R-CNN adds a third branch: a
small FCN on a 14 × 14 RoI-aligned window predicting a 28 × 28 mask per class, trained with
per-pixel binary cross-entropy on the ground-truth mask cut out of the proposal.

The models here wrap torchvision's builders (``fasterrcnn_mobilenet_v3_large_fpn``,
``maskrcnn_resnet50_fpn``) behind :class:`~divekit.models.detector.Detector`:

* Labels ``(N, G, 5)`` rows ``[class, x1, y1, x2, y2]`` (normalised, padding −1) become
  torchvision's list of target dicts — ``boxes`` in pixels, ``labels`` 1..C (torchvision's
  class 0 is background, so our class c is its c + 1), ``masks`` ``(G, H, W)`` for Mask R-CNN,
  padding rows dropped (an image without objects gets ``boxes`` of shape ``(0, 4)``).
* Training: ``forward(x, labels[, masks])`` → ``(sum of torchvision's loss dict, metrics)``
  with every part (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
  ``loss_box_reg``, ``loss_mask``) detached in the metrics.
* Validation loss in ``eval()``: torchvision computes losses only in training mode, so the
  call switches the whole network to training mode *except its backbone*, runs it, and
  restores every module's mode. This is sound because all the BatchNorm layers (whose
  running statistics training mode would update) sit in the backbone — the RPN, box and
  mask heads and the FPN have none — and nothing here has dropout. The RPN and box head
  sample anchors and proposals at random for their losses, so that pass runs under a forked
  RNG seeded with 0: the validation loss is deterministic and the training run's random
  stream is untouched. Call it under ``torch.no_grad()`` (the task does).
* ``detect(x, nms_iou)`` → ``(N, K, 6)`` rows ``[class, score, x1, y1, x2, y2]``, normalised,
  K = ``box_detections_per_img``, padding rows ``[-1, 0, 0, 0, 0, 0]``; ``nms_iou`` is the box
  head's per-class NMS threshold. Mask R-CNN skips its mask branch there (boxes only);
  :meth:`TorchvisionRCNN.segment` also returns the masks.

Choices for small images (the ``shapes`` scenes are 64–256 px, torchvision's defaults are
for 800 px COCO photos), all overridable by keyword:

* ``min_size = max_size = image_size``: ``GeneralizedRCNNTransform`` rescales every image so
  that its short side is ``min_size`` (capped by ``max_size``); with both at the training size
  a square ``image_size`` input is left as it is (scale factor 1), never upscaled to 800 px.
* Anchors: torchvision's sizes (32…512 px for an 800 px image) scaled by
  ``image_size / 512``, so the largest anchor is the whole image and the smallest 1/16 of it
  (8 px at 128 px); aspect ratios 0.5, 1, 2. The number of anchors per location is kept, so
  the RPN head has torchvision's shape and torchvision's weights still load.
* Fewer proposals (torchvision's 320 px mobile model uses 150 at test time): 600 pre-NMS per
  level / 300 kept in training, 300 / 150 at test, and 64 sampled RoIs per image for the
  box head's loss (an image holds at most a few objects) — on the CPU, RoI align's backward
  and the box head's 12 544 → 1024 layer, both linear in the RoIs, dominate a training step. Detections need score ≥ 0.01 (torchvision: 0.05), so
  an early, unconfident model still produces ranked boxes for mAP.
* Mask R-CNN's mask logits layer starts at N(0, 0.001²) as in Detectron2 (torchvision's
  fan-out Kaiming init makes the first mask loss ≈ 10 with a few classes, and it diverges).

Weights: random initialisation by default (no download). ``weights=`` takes a torchvision
weights name (``"DEFAULT"``, ``"COCO_V1"`` or the full enum name) only when its file is
already in torch's hub cache, read by :mod:`divekit.weights` (sha256 checked against
the file name on every use, ``weights_only=True``; torchvision's own loader, which unpickles
anything, is never called), or the path of a saved state dict (``weights_only=True`` too);
the class-specific predictor layers are then replaced by fresh ones for C + 1 classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_fpn,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from divekit import weights as weight_files
from divekit.errors import DivekitError
from divekit.models.detector import ADAM_RECIPE, Detector
from divekit.models.registry import register_model

# From random initialisation on the CPU: Adam, as every detector here; Mask R-CNN's mask head
# wants the smaller step.
MASK_RCNN_RECIPE = {"*": {**ADAM_RECIPE["*"], "lr": 1e-4}}

# Keys of the class-specific layers, re-initialised when weights come from another class set.
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


def small_image_settings(image_size: int) -> dict[str, Any]:
    """torchvision constructor settings for ``image_size``-pixel square images (module docstring)."""
    return {
        "min_size": image_size, "max_size": image_size,
        "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
        "box_batch_size_per_image": 64, "box_score_thresh": 0.01, "box_detections_per_img": 100,
    }


def scaled_anchors(generator: AnchorGenerator, image_size: int) -> AnchorGenerator:
    """``generator``'s anchor sizes times ``image_size / 512`` (at least 2 px), same ratios and
    the same number of anchors per location."""
    scale = image_size / 512
    sizes = tuple(tuple(max(2.0, s * scale) for s in level) for level in generator.sizes)
    return AnchorGenerator(sizes, generator.aspect_ratios)


def labels_to_targets(labels: Tensor, image_size: tuple[int, int],
                      masks: Tensor | None = None) -> list[dict[str, Tensor]]:
    """``(N, G, 5)`` normalised labels (padding rows class −1) → one torchvision target per image:
    ``boxes (g, 4)`` in pixels of an ``(H, W)`` image, ``labels (g,)`` int64 = class + 1 (0 is
    torchvision's background), and with ``masks (N, G, H, W)`` also ``masks (g, H, W)`` uint8."""
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=labels.device)
    targets = []
    for i in range(labels.shape[0]):
        keep = labels[i, :, 0] >= 0
        rows = labels[i][keep].float()
        target = {"boxes": rows[:, 1:] * scale, "labels": rows[:, 0].round().long() + 1}
        if masks is not None:
            target["masks"] = masks[i][keep].to(torch.uint8)
        targets.append(target)
    return targets


def targets_to_labels(targets: list[dict[str, Tensor]], image_size: tuple[int, int],
                      max_objects: int) -> Tensor:
    """The inverse of :func:`labels_to_targets`: ``(N, max_objects, 5)`` normalised rows, the
    objects first in order, padding rows all −1."""
    h, w = image_size
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    out = torch.full((len(targets), max_objects, 5), -1.0, device=device)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
    for i, t in enumerate(targets):
        g = len(t["labels"])
        if g > max_objects:
            raise DivekitError(f"target {i} has {g} objects, more than max_objects={max_objects}")
        out[i, :g, 0] = t["labels"].float() - 1
        out[i, :g, 1:] = t["boxes"].float() / scale
    return out


def detections_to_rows(detections: list[dict[str, Tensor]], image_size: tuple[int, int],
                       k: int) -> Tensor:
    """torchvision's detections (pixel ``boxes``, ``labels`` 1..C, ``scores``) → ``(N, k, 6)``
    rows ``[class, score, x1, y1, x2, y2]`` normalised and clamped to [0, 1], best first;
    padding rows ``[-1, 0, 0, 0, 0, 0]``."""
    h, w = image_size
    device = detections[0]["boxes"].device if detections else torch.device("cpu")
    rows = torch.zeros(len(detections), k, 6, device=device)
    rows[:, :, 0] = -1
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
    for i, d in enumerate(detections):
        order = d["scores"].float().argsort(descending=True)[:k]
        n = len(order)
        rows[i, :n, 0] = d["labels"][order].float() - 1
        rows[i, :n, 1] = d["scores"][order].float()
        rows[i, :n, 2:] = (d["boxes"][order].float() / scale).clamp(0, 1)
    return rows


@contextmanager
def _rng_forked(device: torch.device, seed: int = 0) -> Iterator[None]:
    """Run a block with the CPU (and ``device``'s CUDA) RNG seeded with ``seed``, then restore both."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class TorchvisionRCNN(Detector):
    """A torchvision ``GeneralizedRCNN`` (``self.net``) speaking divekit's detection interface.

    ``forward(x (N, 3, H, W))`` in ``eval()`` → torchvision's detections (a list of dicts,
    pixel boxes, labels 1..C); ``forward(x, labels[, masks])`` → ``(loss, metrics)`` in both
    modes (see the module docstring for the validation loss).
    """

    def __init__(self, net: GeneralizedRCNN, num_classes: int, *, with_masks: bool = False):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.needs_masks = with_masks

    def _images(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise DivekitError(f"{type(self).__name__} takes (N, 3, H, W) images, got shape {tuple(x.shape)}")
        return list(x)

    def forward(self, x: Tensor, labels: Tensor | None = None, masks: Tensor | None = None) -> Any:
        images = self._images(x)
        if labels is None:
            if self.training:
                raise DivekitError("in training mode an R-CNN needs labels (call .eval() to detect)")
            return self.net(images)
        if labels.dim() != 3 or labels.shape[0] != x.shape[0] or labels.shape[-1] != 5:
            raise DivekitError(f"labels must be ({x.shape[0]}, objects, 5) rows [class, x1, y1, x2, y2], "
                               f"got shape {tuple(labels.shape)}")
        if self.needs_masks:
            expected = (*labels.shape[:2], *x.shape[-2:])
            if masks is None or tuple(masks.shape) != expected:
                got = None if masks is None else tuple(masks.shape)
                raise DivekitError(f"Mask R-CNN needs masks of shape {expected} (one per label row), got {got}")
        targets = labels_to_targets(labels, tuple(x.shape[-2:]), masks if self.needs_masks else None)
        if self.training:
            losses = self.net(images, targets)
        else:
            losses = self._eval_losses(images, targets, x.device)
        loss = sum(losses.values(), x.new_zeros(()).float())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def _eval_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]],
                     device: torch.device) -> dict[str, Tensor]:
        """torchvision's losses with the backbone (every BatchNorm) in eval mode (module docstring)."""
        modes = {m: m.training for m in self.modules()}
        try:
            self.net.train()
            self.net.backbone.eval()
            with _rng_forked(device):
                return self.net(images, targets)
        finally:
            for m, mode in modes.items():
                m.training = mode

    @contextmanager
    def _inference(self, nms_iou: float, with_masks: bool) -> Iterator[None]:
        """Eval mode, the box head's NMS at ``nms_iou`` and (unless ``with_masks``) no mask
        branch, for one block; everything restored after."""
        if not 0 < nms_iou <= 1:
            raise DivekitError(f"nms_iou must be in (0, 1], got {nms_iou}")
        heads = self.net.roi_heads
        modes = {m: m.training for m in self.modules()}
        old_nms, mask_pool = heads.nms_thresh, heads.mask_roi_pool
        self.eval()
        heads.nms_thresh = float(nms_iou)
        if not with_masks:
            heads.mask_roi_pool = None  # roi_heads.has_mask() is then False
        try:
            yield
        finally:
            heads.nms_thresh, heads.mask_roi_pool = old_nms, mask_pool
            for m, mode in modes.items():
                m.training = mode

    def detect(self, x: Tensor, nms_iou: float = 0.5) -> Tensor:
        """``(N, K, 6)`` rows ``[class, score, x1, y1, x2, y2]`` (normalised; class −1: padding).
        Runs in eval mode whatever the module's mode (restored after)."""
        images = self._images(x)
        with self._inference(nms_iou, with_masks=False):
            found = self.net(images)
        return detections_to_rows(found, tuple(x.shape[-2:]), self.net.roi_heads.detections_per_img)

    def segment(self, x: Tensor, nms_iou: float = 0.5, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
        """Mask R-CNN: the rows of :meth:`detect` and ``(N, K, H, W)`` bool masks, one per row
        (the mask head's probability ≥ ``threshold`` pasted into the image; empty on padding)."""
        if not self.needs_masks:
            raise DivekitError(f"{type(self).__name__} has no mask branch; use maskrcnn")
        images = self._images(x)
        with self._inference(nms_iou, with_masks=True):
            found = self.net(images)
        k = self.net.roi_heads.detections_per_img
        rows = detections_to_rows(found, tuple(x.shape[-2:]), k)
        out = torch.zeros(x.shape[0], k, *x.shape[-2:], dtype=torch.bool, device=x.device)
        for i, d in enumerate(found):
            order = d["scores"].argsort(descending=True)[:k]
            out[i, : len(order)] = d["masks"][order, 0] >= threshold
        return rows, out


def _weights_enum(enum: Any, name: str) -> Any:
    short = name.split(".")[-1]
    if name != short and name.split(".")[0] != enum.__name__:
        raise DivekitError(f"weights {name!r} are not {enum.__name__} weights")
    try:
        return enum[short]
    except KeyError:
        raise DivekitError(f"unknown weights {name!r}; choose DEFAULT or one of: "
                           f"{', '.join(m.name for m in enum)}, or a state-dict file") from None


def _pretrained_net(enum: Any, name: str, settings: dict[str, Any]) -> GeneralizedRCNN:
    """The network torchvision's builder makes for its weights ``name`` — FrozenBatchNorm2d in
    the backbone (default eps, as the builder passes ``norm_layer`` bare), all but the top
    ``trainable_backbone_layers`` (default 3) backbone stages frozen, its class count — with the
    weights read by :func:`divekit.weights.torchvision_state` (hash checked on every
    use, ``weights_only=True``), never by torchvision's loader."""
    weights = _weights_enum(enum, name)
    settings = dict(settings)
    trainable = settings.pop("trainable_backbone_layers", 3)
    classes = len(weights.meta["categories"])
    if enum is MaskRCNN_ResNet50_FPN_Weights:
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                       norm_layer=FrozenBatchNorm2d, trainable_layers=trainable)
        net: GeneralizedRCNN = MaskRCNN(backbone, classes, **settings)
    else:
        backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                      norm_layer=FrozenBatchNorm2d, trainable_layers=trainable)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        net = FasterRCNN(backbone, classes, rpn_anchor_generator=anchors, **settings)
    net.load_state_dict(weight_files.torchvision_state(weights, download_missing=False))
    if weights == MaskRCNN_ResNet50_FPN_Weights.COCO_V1:
        overwrite_eps(net, 0.0)  # as torchvision's builder: these legacy weights were trained so
    return net


def _is_path(weights: str) -> bool:
    """A file path (an existing file, a name with a folder, or a ``.pt``/``.pth`` file), not a
    torchvision weights name like ``COCO_V1``."""
    return (Path(weights).is_file() or "/" in weights or os.sep in weights
            or weights.endswith((".pt", ".pth", ".ckpt")))


def load_state_file(net: nn.Module, path: str | Path) -> None:
    """Load a saved state dict (torchvision's, or a divekit R-CNN's) into ``net``: every tensor
    but the class-specific predictors must fit; those that do not fit are left as initialised."""
    path = Path(path)
    if not path.is_file():
        raise DivekitError(f"weights file {path} does not exist")
    state = weight_files.load_state_file(path)  # weights_only=True; a pickle asking more: one line
    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    for key, value in own.items():
        if key in fitting or key.startswith(PREDICTOR_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        got = f"shape {tuple(state[key].shape)}" if key in state else "missing"
        raise DivekitError(f"{path}: {key} is {got}, the model needs {tuple(value.shape)}")
    net.load_state_dict(fitting, strict=False)


def _build(builder: Callable[..., GeneralizedRCNN], enum: Any, name: str, num_classes: int,
           in_channels: int, image_size: int, weights: str | None, with_masks: bool,
           overrides: dict[str, Any]) -> TorchvisionRCNN:
    if num_classes < 1:
        raise DivekitError(f"{name} needs num_classes >= 1, got {num_classes}")
    if in_channels != 3:
        raise DivekitError(f"{name} takes RGB images (in_channels=3), got in_channels={in_channels}")
    if image_size < 32:
        raise DivekitError(f"{name} needs image_size >= 32, got {image_size}")
    settings = {**small_image_settings(image_size), **overrides}
    named = weights is not None and not _is_path(weights)
    if named:
        net = _pretrained_net(enum, str(weights), settings)
    else:
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **settings)
    net.rpn.anchor_generator = scaled_anchors(net.rpn.anchor_generator, image_size)
    heads = net.roi_heads
    if heads.box_predictor.cls_score.out_features != num_classes + 1:
        heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes + 1)
    if with_masks and (not named or heads.mask_predictor.mask_fcn_logits.out_channels != num_classes + 1):
        heads.mask_predictor = MaskRCNNPredictor(heads.mask_predictor.conv5_mask.in_channels, 256,
                                                 num_classes + 1)
        # torchvision's Kaiming (fan-out) init of this 1×1 conv has variance 2 / (C + 1): with a
        # few classes the initial mask logits are ±20 and the mask loss starts near 10 and
        # diverges. Detectron2's mask head starts the logits layer at N(0, 0.001²) instead.
        nn.init.normal_(heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(heads.mask_predictor.mask_fcn_logits.bias)
    if weights is not None and not named:
        load_state_file(net, weights)
    return TorchvisionRCNN(net, num_classes, with_masks=with_masks)


@register_model("fasterrcnn_mobilenet", input_shape=(3, 128, 128), task="detect", recipes=ADAM_RECIPE)
def fasterrcnn_mobilenet(*, num_classes: int = 1, in_channels: int = 3, image_size: int = 128,
                         weights: str | None = None, **overrides: Any) -> TorchvisionRCNN:
    """Faster R-CNN, MobileNetV3-Large FPN backbone (torchvision; d2l 14.8.3), for small images."""
    return _build(fasterrcnn_mobilenet_v3_large_fpn, FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                  "fasterrcnn_mobilenet", num_classes, in_channels, image_size, weights, False, overrides)


@register_model("maskrcnn", input_shape=(3, 128, 128), task="detect", recipes=MASK_RCNN_RECIPE)
def maskrcnn(*, num_classes: int = 1, in_channels: int = 3, image_size: int = 128,
             weights: str | None = None, **overrides: Any) -> TorchvisionRCNN:
    """Mask R-CNN, ResNet-50 FPN backbone (torchvision; d2l 14.8.4): boxes and instance masks."""
    return _build(maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights, "maskrcnn", num_classes,
                  in_channels, image_size, weights, True, overrides)
