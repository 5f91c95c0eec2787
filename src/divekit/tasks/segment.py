"""Semantic segmentation (d2l 14.9-14.11): per-pixel cross-entropy, pixel accuracy and IoU.

::

    from divekit.tasks import train, evaluate, predict
    result = train({"model": "fcn_resnet18", "data": "shapes-seg", "epochs": 8})
    evaluate(result.run_dir)                        # pixel_acc, mean_iou, per-class IoU
    predict(result.run_dir, ["street.jpg"], output_dir="seg/")   # colour overlays

The loss is the cross-entropy averaged over the labelled pixels (255 is ignored: VOC's object
borders). Validation sums one confusion matrix over all pixels; the metrics come from it:
pixel accuracy ``Σ_c n_cc / Σ n``, per-class ``IoU_c = n_cc / (Σ_j n_cj + Σ_i n_ic - n_cc)``
and their mean over the classes that occur in the labels or the predictions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data import dataset_info, load_dataset
from divekit.data.batch_augment import BatchAugment
from divekit.data.loader import TensorBatchLoader
from divekit.data.segmentation import (
    IGNORE_INDEX,
    VOC_CROP,
    SegmentationData,
    crop_batch,
    pad_batch,
    read_image_uint8,
)
from divekit.engine.config import Check, TaskConfig
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import atomic_write_text, plan_outputs
from divekit.models import create_model, model_info
from divekit.models.surgery import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_PREFIX,
    load_matching,
    set_input_channels,
    state_num_classes,
    torchvision_classifier,
)
from divekit.weights import load_state_file

log = logging.getLogger(__name__)


def parse_crop(text: str | None) -> tuple[int, int] | None:
    """``--crop``: ``HxW`` (or ``H,W``, or one number for a square) → ``(H, W)``; ``none``."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise DivekitError(f"--crop must be HxW with positive sizes (e.g. 320x480), got {text!r}")
    return hw  # type: ignore[return-value]


def _crop_check(text: str | None) -> Check:
    try:
        parse_crop(text)
    except DivekitError as e:
        return False, str(e)
    return True, ""


def _augment_check(spec: str) -> Check:
    try:
        BatchAugment(spec)
    except DivekitError as e:
        return False, str(e)
    return True, ""


@dataclass(frozen=True)
class SegmentConfig(TaskConfig):
    model: str = option("fcn_resnet18", "model name (see `divekit models`)", cli=False)
    data: str = option("shapes-seg", "dataset name: shapes-seg (generated) or voc", metavar="NAME")
    batch_size: int = option(32, "minibatch size (per worker)", metavar="N")
    limit: int | None = option(None, "use only the first N training images (quick runs); "
                               "validation keeps N/5 of its images, at least 16", metavar="N")
    crop: str | None = option(
        None, "random training crop HxW, cut from image and label alike; smaller images are "
        "dropped (default: 320x480 for voc, whole images for shapes-seg)", metavar="HxW")
    augment: str = option(
        "hflip", "batch augmentation on the training device; labels follow the geometric ops "
        "(nearest, never interpolated), e.g. hflip or hflip,crop:0.5-1,jitter:0.3", metavar="SPEC")
    backbone: str = option(
        "resnet18", "the body: a classifier of `divekit models` whose features follow the "
        "input size (resnet*, vgg11, googlenet, densenet121; not lenet), or torchvision:ARCH",
        metavar="NAME")
    backbone_weights: str | None = option(
        None, "start the body from a divekit classification run directory or a weights file "
        "(.safetensors, or a torchvision .pth loaded with weights_only=True)", metavar="PATH")
    image_size: int = option(128, "shapes-seg: the generated scenes' side in pixels", metavar="N")

    def checks(self) -> list[Check]:
        return super().checks() + [
            _crop_check(self.crop),
            _augment_check(self.augment),
            (isinstance(self.image_size, int) and self.image_size >= 32,
             f"--image-size must be at least 32, got {self.image_size}"),
        ]


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` pixel counts, row = true class, column = predicted; 255 labels left out."""
    valid = labels != IGNORE_INDEX
    flat = labels[valid].long() * num_classes + predictions[valid].long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def iou_metrics(matrix: Tensor) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU (NaN for a class absent from labels and predictions) and
    mean IoU over the present classes, from a confusion matrix."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    present = union > 0
    return {
        "pixel_acc": float(tp.sum() / m.sum().clamp(min=1)),
        "mean_iou": float(iou[present].mean()) if present.any() else math.nan,
        "iou": iou.tolist(),
    }


@dataclass(frozen=True)
class SegmentPredictConfig:
    """``divekit predict``'s options for a segmentation run."""

    output: str | None = option(None, "folder for the colour overlays, STEM.seg.png (a second "
                                "input with the same STEM gets STEM-2, the next -3; an input "
                                "file is never replaced)", aliases=["-o"], metavar="DIR")
    overwrite: bool = option(False, "replace pictures that already exist in -o (default: refuse)")


class SegmentationTask(Task, name="segment"):
    """FCN-style segmentation: per-pixel cross-entropy with ignore index 255; pixel accuracy,
    per-class IoU and mean IoU. Rebuilt from a run, the classes, colours and input
    normalisation come from the record (no data loaded for predict)."""

    Config = SegmentConfig
    PredictConfig = SegmentPredictConfig

    def __init__(self, config: SegmentConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        info = model_info(config.model)
        if info.task != "segment":
            raise DivekitError(f"model {config.model!r} is a {info.task} model, not a segmentation one")
        self.batch_augment = BatchAugment(config.augment)

    # ------------------------------------------------------------ data (loaded on first use)
    @cached_property
    def crop(self) -> tuple[int, int] | None:
        crop = parse_crop(self.config.crop)
        return VOC_CROP if crop is None and self.config.data == "voc" else crop

    @cached_property
    def data(self) -> SegmentationData:
        cfg = self.config
        info = dataset_info(cfg.data)
        if info.task != "segment":
            raise DivekitError(f"dataset {cfg.data!r} is a {info.task} dataset, not a segmentation one")
        data = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                            limit=cfg.limit, size=cfg.image_size)
        if self.crop is not None:
            data.filter_by_crop(self.crop)
        return data

    @cached_property
    def facts(self) -> dict[str, Any]:
        if self.record.get("classes") is not None:
            return {k: self.record[k] for k in ("classes", "colormap", "mean", "std")}
        d = self.data
        return {"classes": list(d.classes), "colormap": [list(c) for c in d.colormap],
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def run_record(self) -> dict[str, Any]:
        d = self.data
        return {**self.facts, "ignore_index": IGNORE_INDEX, "crop": list(self.crop or []) or None,
                "train_samples": len(d.train_images), "val_samples": len(d.val_images),
                "dropped_train_images": d.dropped.get("train", 0)}

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``(N, 3, H, W)`` → float, standardised with the body's (ImageNet) statistics."""
        f = self.facts
        mean = torch.tensor(f["mean"], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(f["std"], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return (x - mean) / std

    def _train_batch(self, batch: tuple[Tensor]) -> tuple[Tensor, Tensor]:
        d = self.data
        return crop_batch(d.train_images, d.train_labels, batch[0].tolist(), self.crop)

    def _val_batch(self, batch: tuple[Tensor]) -> tuple[Tensor, Tensor]:
        d = self.data
        return pad_batch(d.val_images, d.val_labels, batch[0].tolist())

    def train_data(self) -> TensorBatchLoader:
        cfg = self.config
        return TensorBatchLoader(torch.arange(len(self.data.train_images)), batch_size=cfg.batch_size,
                                 shuffle=True, seed=cfg.seed, batch_transform=self._train_batch)

    def val_data(self) -> TensorBatchLoader | None:
        d = self.data
        if not d.val_images:
            return None
        # whole images, grouped by size so that a batch pads little
        order = sorted(range(len(d.val_images)), key=lambda i: tuple(d.val_images[i].shape[1:]))
        return TensorBatchLoader(torch.tensor(order), batch_size=self.config.batch_size,
                                 batch_transform=self._val_batch)

    # ------------------------------------------------------------ model
    def prepare(self) -> None:
        """A zoo ``--backbone`` of an FCN is probed (shapes only) before the run's files are
        written: one whose features cannot be a body (lenet's end in adaptive pooling) is
        refused in one line naming the classifiers that fit."""
        cfg = self.config
        if cfg.model.startswith("fcn") and not cfg.backbone.startswith(TORCHVISION_PREFIX):
            from divekit.models.fcn import check_backbone

            check_backbone(cfg.backbone)

    def build_model(self) -> nn.Module:
        cfg = self.config
        k = len(self.facts["classes"])
        if cfg.backbone.startswith(TORCHVISION_PREFIX) or (cfg.backbone_weights and not self.record):
            # a run rebuilt for evaluate/predict gets all weights from its checkpoint
            body = pretrained_body(cfg.backbone, None if self.record else cfg.backbone_weights)
            return create_model(cfg.model, num_classes=k, backbone=body)
        return create_model(cfg.model, num_classes=k, backbone=cfg.backbone)

    # ------------------------------------------------------------ steps
    def _augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels through the same geometric ops. Labels are shifted by one so that
        pixels a rotation brings in from outside (mask value 0) become ignored (255)."""
        if self.batch_augment.is_identity:
            return x, y
        x, m = self.batch_augment(x, y.long() + 1)
        return x, torch.where(m == 0, IGNORE_INDEX, m - 1)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        x, y = self._augment(x.float() / 255, y)
        x = self.normalize(x).contiguous(memory_format=_memory_format(model))
        logits = model(x)  # (N, K, H, W)
        y = y.long()
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        valid = y != IGNORE_INDEX
        acc = (pixel_classes(logits)[valid] == y[valid]).float().mean()
        return loss, {"loss": loss.detach(), "pixel_acc": acc.detach()}

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Any]:
        x, y = batch
        x = self.normalize(x).contiguous(memory_format=_memory_format(model))
        logits = model(x).float()
        y = y.long()
        k = logits.shape[1]
        return {"loss": F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"),
                "confusion": confusion_matrix(y, pixel_classes(logits), k),
                "count": int((y != IGNORE_INDEX).sum())}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        matrix = sums["confusion"].cpu().long()
        metrics = iou_metrics(matrix)
        classes = self.facts["classes"]
        return {"loss": float(sums["loss"]) / max(int(sums["count"]), 1),
                "pixel_acc": metrics["pixel_acc"], "mean_iou": metrics["mean_iou"],
                "iou": dict(zip(classes, metrics["iou"])), "confusion_matrix": matrix}

    # ------------------------------------------------------------ reports and inference
    def on_epoch_end(self, model: nn.Module, epoch: int, run: Any, metrics: dict[str, Any]) -> None:
        if epoch == self.config.epochs and "confusion_matrix" in metrics:
            self.on_evaluate(model, run, metrics)

    def on_evaluate(self, model: nn.Module, run: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """``per_class_iou.csv`` and ``confusion_matrix.png`` in the run directory."""
        from divekit.viz_dense import plot_pixel_confusion

        classes, matrix = self.facts["classes"], metrics["confusion_matrix"]
        lines = ["class,pixels,iou"] + [
            f"{name},{int(matrix[c].sum())},{metrics['iou'][name]:.6g}" for c, name in enumerate(classes)]
        atomic_write_text(Path(run.dir) / "per_class_iou.csv", "\n".join(lines) + "\n")
        picture = plot_pixel_confusion(matrix, classes, Path(run.dir) / "confusion_matrix.png",
                                       title=f"pixel confusion (mean IoU {metrics['mean_iou']:.3f})")
        return {"iou": metrics["iou"], "confusion_matrix_png": str(picture)}

    def predict(self, model: nn.Module, inputs: Sequence[Any], *,
                output_dir: str | Path | None = None, output: str | Path | None = None,
                alpha: float = 0.5, overwrite: bool = False) -> list[dict[str, Any]]:
        """Each image's class map (``label_map``, ``(H, W)``) and class shares; with
        ``output_dir`` (``output``, the CLI's ``-o``) a colour overlay with a legend per image,
        ``<stem>.seg.png`` (numbered when two inputs share a name; never an input file)."""
        output_dir = output_dir if output_dir is not None else output
        if not inputs:
            raise DivekitError("no image files given")
        if not 0 <= alpha <= 1:
            raise DivekitError(f"--alpha must be in [0, 1], got {alpha}")
        f = self.facts
        images = [read_image_uint8(p) for p in inputs]  # every file checked before any work
        outputs = overlay_paths(inputs, output_dir, overwrite) if output_dir is not None else [None] * len(inputs)
        device = next(model.parameters()).device
        results = []
        for path, image, out in zip(inputs, images, outputs):
            with torch.inference_mode():
                x = self.normalize(image[None].to(device)).contiguous(memory_format=_memory_format(model))
                classes_map = pixel_classes(model(x).float())[0].cpu()  # (H, W)
            counts = torch.bincount(classes_map.flatten(), minlength=len(f["classes"]))
            item: dict[str, Any] = {
                "image": str(path), "label_map": classes_map,
                "fractions": {f["classes"][c]: float(n) / classes_map.numel()
                              for c, n in enumerate(counts.tolist()) if n},
            }
            if out is not None:
                from divekit.viz_dense import plot_overlay

                item["overlay"] = str(plot_overlay(image, classes_map, f["classes"],
                                                   [tuple(c) for c in f["colormap"]], out, alpha=alpha))
            results.append(item)
        return results

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``loss 0.21, pixel_acc 0.9612, mean_iou 0.7810; IoU background 0.95, square 0.80,
        ...``."""
        head = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                         if isinstance(v, int | float) and not isinstance(v, bool))
        iou = metrics.get("iou") or {}
        per_class = ", ".join(f"{name} {v:.3f}" for name, v in iou.items() if not math.isnan(v))
        picture = metrics.get("confusion_matrix_png")
        return head + (f"; IoU {per_class}" if per_class else "") + (f"; {picture}" if picture else "")

    def format_prediction(self, item: dict[str, Any]) -> str:
        """``photo.jpg: background 81.2%, cat 18.8% -> out/photo.seg.png``."""
        shares = sorted(item["fractions"].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares)
        overlay = item.get("overlay")
        return f"{item['image']}: {shown}" + (f" -> {overlay}" if overlay else "")


def pretrained_body(backbone: str, weights: str | Path | None) -> nn.Module:
    """The classifier ``backbone``'s ``features`` for 3-channel input, started from
    ``weights``: a divekit classification run directory (its newest checkpoint), a torchvision
    state file for ``torchvision:ARCH``, or a zoo classifier's state file."""
    if weights is not None and Path(weights).is_dir():
        from divekit.engine.run import load_run

        run = load_run(weights, "cpu")
        trained = run.config.model
        if trained != backbone:
            raise DivekitError(f"--backbone-weights {str(weights)!r} trained {trained!r}; "
                               f"pass --backbone {trained}")
        model = run.model
    elif backbone.startswith(TORCHVISION_PREFIX):
        state = load_state_file(weights) if weights is not None else None
        classes = state_num_classes(state) if state is not None else 1000
        model = torchvision_classifier(backbone, classes, 3, state)
    else:
        if weights is None:
            return create_model(backbone, num_classes=2, in_channels=3).features
        state = load_state_file(weights)
        first = next((v for k, v in state.items() if v.ndim == 4), None)
        if first is None:
            raise DivekitError(f"{weights} holds no convolution weights for {backbone!r}")
        model = create_model(backbone, num_classes=state_num_classes(state),
                             in_channels=int(first.shape[1]))
        load_matching(model, state, f"the weights in {weights}")
    assert model is not None
    set_input_channels(model, 3)
    return model.features


def pixel_classes(logits: Tensor) -> Tensor:
    """Each pixel's highest-scoring class: ``(N, K, H, W)`` scores to ``(N, H, W)`` indices.

    ``logits.max(1).indices``, which equals ``logits.argmax(1)`` (the first maximum on a tie)
    and on the CPU runs 3-9x faster for dense maps: ``argmax`` over a dimension that is not
    the innermost one takes a slow strided path (8x21x160x224 scores: 64 ms against 18 ms in
    NCHW, 26 against 16 ms in NHWC; 32x21x320x480: 1.2 s against 0.37 s, one thread)."""
    return logits.detach().max(1).indices


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's first convolution is stored so (the Trainer's choice)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last) \
            and not conv.weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def overlay_paths(inputs: Sequence[Any], output_dir: str | Path,
                  overwrite: bool = False) -> list[Path]:
    """``output_dir/<stem>.seg.png`` per input; a second input of the same name gets ``-2``,
    a name that is one of the inputs is skipped, so no input is ever overwritten, and an
    existing overlay is replaced only with ``overwrite`` (:func:`divekit.io.plan_outputs`)."""
    return plan_outputs(inputs, output_dir, ".seg.png", overwrite=overwrite)
