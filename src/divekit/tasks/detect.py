"""Object detection (d2l 14.7–14.8): boxes and classes of objects, on the engine's seam.

Every detector speaks :class:`~divekit.models.detector.Detector`'s interface, so this one task
trains, validates and runs all of them::

    from divekit.tasks import train, evaluate, predict
    result = train({"model": "tiny_ssd", "data": "shapes", "epochs": 8, "image_size": 96})
    evaluate(result.run_dir)          # the loss parts, map50 (VOC, IoU 0.5), map (COCO)
    predict(result.run_dir, ["street.jpg"], output="out/")
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divekit.config import option
from divekit.data import dataset_info, load_dataset
from divekit.data.detection import DetectionData
from divekit.data.loader import TensorBatchLoader
from divekit.data.vision import load_image_file, resize_images
from divekit.engine.config import Check, TaskConfig, finite
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import plan_outputs
from divekit.models import create_model, list_models, model_info
from divekit.ops.map import coco_mean_average_precision, mean_average_precision

PICTURE_THRESHOLD = 0.5  # the validation pictures draw boxes scoring at least this


@dataclass(frozen=True)
class DetectConfig(TaskConfig):
    model: str = option("tiny_ssd", "model name (see `divekit models`)", cli=False)
    data: str = option("shapes", "dataset name (see `divekit datasets`)", metavar="NAME")
    batch_size: int = option(32, "minibatch size (per worker)", metavar="N")
    image_size: int = option(128, "train and predict on N×N images (shapes are drawn at N)", metavar="N")
    nms_iou: float = option(0.5, "evaluation: IoU above which NMS drops the weaker box")
    pictures: int = option(4, "validation pictures with boxes written each epoch", metavar="N")

    def checks(self) -> list[Check]:
        return super().checks() + [
            (isinstance(self.image_size, int) and self.image_size >= 32,
             f"--image-size must be at least 32, got {self.image_size}"),
            (finite(self.nms_iou) and 0 < self.nms_iou <= 1, f"--nms-iou must be in (0, 1], got {self.nms_iou}"),
            (isinstance(self.pictures, int) and self.pictures >= 0,
             f"--pictures must be 0 or more, got {self.pictures}"),
        ]


def load_data(cfg: DetectConfig) -> DetectionData:
    """The dataset at ``image_size × image_size``, decoded once."""
    info = dataset_info(cfg.data)
    if info.task != "detect":
        raise DivekitError(f"dataset {cfg.data!r} is a {info.task} dataset, not a detection one")
    data = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                        size=cfg.image_size, limit=cfg.limit)
    return data.resized(cfg.image_size)


def check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    """Refuse labels a detector cannot learn from, naming the first offending entry: every real
    row (padding rows are all -1) has a whole class in 0..num_classes-1 and finite corners with
    x1 < x2 and y1 < y2 inside the image (normalised, so in [0, 1])."""
    if labels.dim() != 3 or labels.shape[-1] != 5:
        raise DivekitError(f"{name} must be (images, objects, 5) rows [class, x1, y1, x2, y2], "
                           f"got shape {tuple(labels.shape)}")
    cls, boxes = labels[..., 0], labels[..., 1:]
    real = ~(labels == -1).all(dim=-1)

    def first(bad: Tensor) -> tuple[int, int] | None:
        bad = bad & real
        if not bool(bad.any()):
            return None
        i, j = (int(v) for v in bad.nonzero()[0])
        return i, j

    def row(i: int, j: int) -> str:
        return "[" + ", ".join(f"{v:g}" for v in labels[i, j].tolist()) + "]"

    if (where := first(~torch.isfinite(labels).all(dim=-1))) is not None:
        raise DivekitError(f"{name}[{where[0]}, {where[1]}] is {row(*where)}: coordinates must be finite numbers")
    if (where := first((cls < 0) | (cls >= num_classes) | (cls != cls.round()))) is not None:
        raise DivekitError(f"{name}[{where[0]}, {where[1]}] has class {float(cls[where]):g}; "
                           f"the model has classes 0..{num_classes - 1}")
    if (where := first((boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1]))) is not None:
        raise DivekitError(f"{name}[{where[0]}, {where[1]}] is {row(*where)}: a box needs x1 < x2 and y1 < y2")
    if (where := first(((boxes < -1e-6) | (boxes > 1 + 1e-6)).any(dim=-1))) is not None:
        raise DivekitError(f"{name}[{where[0]}, {where[1]}] is {row(*where)}: corners are fractions of "
                           "the image's width and height, in [0, 1]")


def detections(model: nn.Module, x: Tensor, nms_iou: float = 0.5) -> Tensor:
    """``(N, K, 6)`` rows ``[class, confidence, x1, y1, x2, y2]`` (class -1: none)."""
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    return inner.detect(x, nms_iou)


def boxes_above(rows: Tensor, threshold: float) -> Tensor:
    """Rows ``[class, score, x1, y1, x2, y2]`` of one image with class ≥ 0 and score ≥ threshold."""
    return rows[(rows[:, 0] >= 0) & (rows[:, 1] >= threshold)]


def picture_paths(images: Sequence[str | Path], output: str | Path,
                  overwrite: bool = False) -> list[Path]:
    """``output/<stem>.pred.png`` per image; a name already taken (two inputs with one stem, or
    an input file itself) gets ``<stem>-2.pred.png``, ``-3``, ...: no input is ever replaced,
    and an existing picture only with ``overwrite`` (:func:`divekit.io.plan_outputs`)."""
    return plan_outputs(images, output, ".pred.png", overwrite=overwrite)


@dataclass(frozen=True)
class DetectPredictConfig:
    """``divekit predict``'s options for a detection run."""

    threshold: float = option(0.5, "minimum confidence to draw a box")
    nms_iou: float = option(0.5, "IoU above which NMS drops the weaker box")
    output: str | None = option(None, "folder for the pictures with their boxes, STEM.pred.png "
                                "(a second input with the same STEM gets STEM-2, the next -3; "
                                "an input file is never replaced)", aliases=["-o"], metavar="DIR")
    overwrite: bool = option(False, "replace pictures that already exist in -o (default: refuse)")


class DetectionTask(Task, name="detect"):
    """The detector's own loss (its parts logged as metrics); validation adds mAP@0.5 (VOC
    all-point) and COCO mAP@[.5:.95] over the images' detections.

    Rebuilt from a run (``record``), the classes come from the record, so predicting loads no
    data. ``data`` trains on a :class:`DetectionData` already in memory instead of
    ``config.data``.
    """

    Config = DetectConfig
    PredictConfig = DetectPredictConfig

    def __init__(self, config: DetectConfig, record: dict[str, Any] | None = None, *,
                 data: DetectionData | None = None):
        super().__init__(config, record)
        info = model_info(config.model)
        if info.task != "detect":
            raise DivekitError(f"model {config.model!r} is a {info.task} model, not a detector "
                               f"(detectors: {', '.join(list_models('detect'))})")
        if data is not None:
            self.__dict__["data"] = self._checked(data)

    # ------------------------------------------------------------ data (loaded on first use)
    @cached_property
    def data(self) -> DetectionData:
        return self._checked(load_data(self.config))

    def _checked(self, data: DetectionData) -> DetectionData:
        check_labels(data.train_labels, data.num_classes, "train labels")
        check_labels(data.val_labels, data.num_classes, "val labels")
        if self.needs_masks and data.train_masks is None:
            raise DivekitError(f"model {self.config.model!r} learns instance masks, and dataset "
                               f"{data.name!r} has none (use --data shapes)")
        return data

    @cached_property
    def classes(self) -> list[str]:
        if self.record.get("classes") is not None:
            return list(self.record["classes"])
        return list(self.data.classes)

    @cached_property
    def needs_masks(self) -> bool:
        """Whether the detector learns instance masks (Mask R-CNN); asked of a model built on
        the meta device, which allocates nothing and draws no random numbers."""
        with torch.device("meta"):
            return bool(getattr(self._build(num_classes=1), "needs_masks", False))

    def _tensors(self, split: str) -> list[Tensor]:
        d = self.data
        masks = getattr(d, f"{split}_masks") if self.needs_masks else None
        tensors = [getattr(d, f"{split}_images"), getattr(d, f"{split}_labels")]
        return tensors if masks is None else [*tensors, masks]

    def train_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._tensors("train"), batch_size=self.config.batch_size,
                                 shuffle=True, seed=self.config.seed)

    def val_data(self) -> TensorBatchLoader:
        """Validation batches end with each image's index, so the detections come back in the
        images' order however the batches were shared among workers."""
        tensors = self._tensors("val")
        return TensorBatchLoader(*tensors, torch.arange(len(tensors[0])),
                                 batch_size=max(self.config.batch_size, 64))

    def run_record(self) -> dict[str, Any]:
        d = self.data
        return {"classes": list(d.classes), "image_size": self.config.image_size,
                "train_samples": len(d.train_images), "val_samples": len(d.val_images)}

    # ------------------------------------------------------------ model
    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        """The builder's arguments: the model's options, ``num_classes``, 3 channels, and the
        image size where the network depends on it (``divekit export`` records them so the
        model's ``decode`` can be rebuilt beside an ONNX file)."""
        info = model_info(self.config.model)
        kwargs: dict[str, Any] = {**info.model_options(self.config.model_options),
                                  "num_classes": num_classes, "in_channels": 3}
        if "image_size" in inspect.signature(info.builder).parameters:  # YOLO's grid, R-CNN's anchors
            kwargs["image_size"] = self.config.image_size
        return kwargs

    def _build(self, num_classes: int) -> nn.Module:
        return create_model(self.config.model, **self.model_kwargs(num_classes))

    def build_model(self) -> nn.Module:
        return self._build(len(self.classes))

    # ------------------------------------------------------------ steps
    def training_step(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y, *masks = batch
        return model(x, y, *masks)

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, ...]) -> dict[str, Any]:
        """The loss parts summed over the batch, and each image's detections and ground truth."""
        x, y, *masks, index = batch
        _, parts = model(x, y, *masks)
        n = len(x)
        rows = detections(model, x, self.config.nms_iou).float().cpu()
        y = y.cpu()
        return {**{k: v.detach().float() * n for k, v in parts.items()}, "count": n,
                "index": [index.cpu()],
                "detections": [r[r[:, 0] >= 0] for r in rows],
                "truths": [t[t[:, 0] >= 0] for t in y]}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Mean loss parts, ``map50`` (IoU 0.5, VOC all-point) and ``map`` (COCO @[.5:.95]);
        ``detections``: each validation image's rows, in the images' order."""
        lists = ("index", "detections", "truths")
        n = max(float(sums.get("count", 0)), 1.0)
        metrics: dict[str, Any] = {k: float(v) / n for k, v in sums.items()
                                   if k not in lists and k != "count"}
        order = torch.cat(sums["index"]).argsort().tolist() if sums.get("index") else []
        dets = [sums["detections"][i] for i in order]
        truths = [sums["truths"][i] for i in order]
        preds = [{"boxes": d[:, 2:], "scores": d[:, 1], "labels": d[:, 0].long()} for d in dets]
        targets = [{"boxes": t[:, 1:], "labels": t[:, 0].long()} for t in truths]
        metrics["map50"] = float(mean_average_precision(preds, targets, 0.5)["map"])
        metrics["map"] = float(coco_mean_average_precision(preds, targets)["map"])
        metrics["detections"] = dets
        return metrics

    # ------------------------------------------------------------ pictures and inference
    def on_epoch_end(self, model: nn.Module, epoch: int, run: Any, metrics: dict[str, Any]) -> None:
        """``pictures/val-epoch-NNNN.png``: the first validation images with their boxes."""
        k = min(self.config.pictures, len(metrics.get("detections", [])))
        if k == 0:
            return
        from divekit.viz import plot_detections

        rows = [boxes_above(r, PICTURE_THRESHOLD) for r in metrics["detections"][:k]]
        plot_detections(self.data.val_images[:k], rows, self.classes,
                        Path(run.dir) / "pictures" / f"val-epoch-{epoch:04d}.png")

    def predict(self, model: nn.Module, inputs: Sequence[Any], *, threshold: float = 0.5,
                nms_iou: float = 0.5, output: str | Path | None = None,
                overwrite: bool = False) -> list[dict[str, Any]]:
        """Objects in image files of any size: ``{"image", "detections": [(class, score,
        [x1, y1, x2, y2] in the image's pixels)], "picture"}``; with ``output`` each image with
        its labelled boxes goes to ``output/<stem>.pred.png`` (see :func:`picture_paths`)."""
        if not inputs:
            raise DivekitError("no image files given")
        if not (finite(threshold) and 0 <= threshold <= 1):
            raise DivekitError(f"--threshold must be in [0, 1], got {threshold}")
        if not (finite(nms_iou) and 0 < nms_iou <= 1):
            raise DivekitError(f"--nms-iou must be in (0, 1], got {nms_iou}")
        pictures = picture_paths(inputs, output, overwrite) if output is not None else [None] * len(inputs)
        originals = [load_image_file(p, 3) for p in inputs]
        x = torch.stack([resize_images(img, self.config.image_size) for img in originals])
        with torch.inference_mode():
            # a model without parameters (an ONNX file's stand-in, divekit.export) runs on the CPU
            rows = detections(model, x.to(next(model.parameters(), x).device), nms_iou).float().cpu()
        results = []
        for path, img, r, picture in zip(inputs, originals, rows, pictures):
            kept = boxes_above(r, threshold)
            h, w = img.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=kept.dtype)
            found = [(self.classes[int(c)], float(s), [round(v, 1) for v in (b * scale).tolist()])
                     for c, s, b in zip(kept[:, 0], kept[:, 1], kept[:, 2:])]
            if picture is not None:
                from divekit.viz import plot_detections

                picture = plot_detections([img], [kept], self.classes, picture, ncols=1)
            results.append({"image": str(path), "detections": found,
                            "picture": None if picture is None else str(picture)})
        return results

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``loss 0.1234, class_err 0.0100, ..., map50 0.9890, map 0.6210``: every number the
        validation gave (the per-image detections are left out)."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                         if isinstance(v, int | float) and not isinstance(v, bool))

    def format_prediction(self, item: dict[str, Any]) -> str:
        """``photo.jpg: disc 0.912 at [12.0, 30.5, 70.2, 88.0]; ... -> out/photo.pred.png``."""
        shown = "; ".join(f"{c} {s:.3f} at {b}" for c, s, b in item["detections"]) or "no objects"
        picture = item.get("picture")
        return f"{item['image']}: {shown}" + (f" -> {picture}" if picture else "")
