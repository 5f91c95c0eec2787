"""Object detection with anchor boxes (d2l 14.7): data + tiny SSD + multibox loss, by the engine.

::

    from divekit.tasks import detect
    result = detect.train(detect.DetectConfig(model="tiny_ssd", data="shapes", epochs=20))
    detect.evaluate(result.run_dir)          # loss, class_err, bbox_mae, map50
    detect.predict(result.run_dir, ["street.jpg"], output="out/")
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divekit.data import dataset_info, load_dataset
from divekit.data.detection import DetectionData
from divekit.data.loader import TensorBatchLoader
from divekit.data.vision import load_image_file, resize_images
from divekit.engine.checkpoint import load_weights
from divekit.engine.device import resolve_device
from divekit.engine.trainer import TrainConfig, Trainer, option
from divekit.errors import DivekitError
from divekit.models import create_model, list_models, model_info
from divekit.ops.map import coco_mean_average_precision, mean_average_precision
from divekit.tasks.common import (
    TrainResult,
    choose_run_dir,
    config_from_dict,
    latest_weights,
    load_run_config,
    save_run_config,
)


@dataclass
class DetectConfig(TrainConfig):
    model: str = option("tiny_ssd", "model name (see `divekit models`)", cli=False)
    data: str = option("shapes", "dataset name (see `divekit datasets`)", metavar="NAME")
    batch_size: int = option(32, "minibatch size")
    image_size: int = option(128, "train and predict on N×N images (shapes are drawn at N)", metavar="N")
    limit: int | None = option(None, "use only the first N training images (quick runs)", metavar="N")
    data_dir: str | None = option(None, "folder with the dataset's files, when you have them", metavar="DIR")
    download: bool = option(False, "download missing files (hash-checked)")
    optimizer: str | None = option(None, "optimizer (default: the model's own; adam for every detector so far)",
                                   choices=["sgd", "adam", "adamw"])
    lr: float | None = option(None, "learning rate (default: the model's own: 1e-3, maskrcnn 1e-4)")
    weight_decay: float | None = option(None, "L2 weight decay (default: the model's own)")
    nms_iou: float = option(0.5, "evaluation: IoU above which NMS drops the weaker box")
    pictures: int = option(4, "validation pictures with boxes written each epoch", metavar="N")
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0,
             f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            (self.image_size >= 32, f"--image-size must be at least 32, got {self.image_size}"),
            (self.limit is None or self.limit >= 1, f"--limit must be at least 1, got {self.limit}"),
            (0 < self.nms_iou <= 1, f"--nms-iou must be in (0, 1], got {self.nms_iou}"),
            (self.pictures >= 0, f"--pictures must be 0 or more, got {self.pictures}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)


Config = DetectConfig
FALLBACK_HYPERPARAMETERS = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}


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
    padding = (labels == -1).all(dim=-1)
    real = ~padding

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


def build_detector(name: str, classes: Sequence[str], image_size: int) -> nn.Module:
    """A registered detector for ``classes`` on ``image_size``-pixel square images."""
    info = model_info(name)
    if info.task != "detect":
        raise DivekitError(f"model {name!r} is a {info.task} model, not a detector "
                           f"(detectors: {', '.join(list_models('detect'))})")
    kwargs: dict[str, Any] = {"num_classes": len(classes), "in_channels": 3}
    if "image_size" in inspect.signature(info.builder).parameters:
        kwargs["image_size"] = image_size
    return create_model(name, **kwargs)


def detections(model: nn.Module, x: Tensor, nms_iou: float = 0.5) -> Tensor:
    """``(N, K, 6)`` rows ``[class, confidence, x1, y1, x2, y2]`` (class -1: none)."""
    return _unwrap(model).detect(x, nms_iou)


def _unwrap(model: nn.Module) -> Any:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def as_prediction_dicts(rows: Tensor) -> list[dict[str, Tensor]]:
    """``(N, A, 6)`` detections → torchmetrics-style dicts, one per image."""
    out = []
    for r in rows.cpu():
        keep = r[:, 0] >= 0
        out.append({"boxes": r[keep, 2:], "scores": r[keep, 1], "labels": r[keep, 0].long()})
    return out


def as_target_dicts(labels: Tensor) -> list[dict[str, Tensor]]:
    out = []
    for y in labels.cpu():
        keep = y[:, 0] >= 0
        out.append({"boxes": y[keep, 1:], "labels": y[keep, 0].long()})
    return out


class DetectionTask:
    """Multibox loss; training metrics class error and box MAE; evaluation adds mAP@0.5."""

    def __init__(self, cfg: DetectConfig, data: DetectionData | None = None):
        cfg.validate()
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg)
        check_labels(self.data.train_labels, self.data.num_classes, "train labels")
        check_labels(self.data.val_labels, self.data.num_classes, "val labels")
        self._model: nn.Module | None = build_detector(cfg.model, self.data.classes, cfg.image_size)
        self.needs_masks = bool(getattr(self._model, "needs_masks", False))
        # hyper-parameters left unset take the detector's own (SGD 0.2 suits tiny SSD, not an R-CNN)
        for key, value in {**FALLBACK_HYPERPARAMETERS, **getattr(self._model, "train_defaults", {})}.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if self.needs_masks and self.data.train_masks is None:
            raise DivekitError(f"model {cfg.model!r} learns instance masks, and dataset "
                               f"{self.data.name!r} has none (use --data shapes)")

    def model(self) -> nn.Module:
        model, self._model = self._model, None
        return model if model is not None else build_detector(self.cfg.model, self.data.classes,
                                                              self.cfg.image_size)

    def _tensors(self, split: str) -> tuple[Tensor, ...]:
        images, labels = getattr(self.data, f"{split}_images"), getattr(self.data, f"{split}_labels")
        masks = getattr(self.data, f"{split}_masks") if self.needs_masks else None
        return (images, labels) if masks is None else (images, labels, masks)

    def train_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._tensors("train"), batch_size=self.cfg.batch_size,
                                 shuffle=True, seed=self.cfg.seed)

    def val_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._tensors("val"), batch_size=max(self.cfg.batch_size, 64))

    def step(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y, *masks = batch
        return model(x, y, *masks)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        n = 0
        preds: list[dict[str, Tensor]] = []
        targets: list[dict[str, Tensor]] = []
        for batch in loader:
            x, y, *masks = (t.to(device) for t in batch)
            _, metrics = model(x, y, *masks)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
            n += len(x)
            preds += as_prediction_dicts(detections(model, x, self.cfg.nms_iou))
            targets += as_target_dicts(y)
        result = {k: v / max(n, 1) for k, v in sums.items()}
        result["map50"] = float(mean_average_precision(preds, targets, 0.5)["map"])
        result["map"] = float(coco_mean_average_precision(preds, targets)["map"])  # COCO @[.5:.95]
        return result

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path) -> None:
        k = min(self.cfg.pictures, len(self.data.val_images))
        if k == 0:
            return
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            rows = detections(model, self.data.val_images[:k].to(device), self.cfg.nms_iou).cpu()
        from divekit.viz import plot_detections

        plot_detections(self.data.val_images[:k], [_boxes_above(r, 0.5) for r in rows],
                        self.data.classes, run_dir / "pictures" / f"val-epoch-{epoch:04d}.png")


def _boxes_above(rows: Tensor, threshold: float) -> Tensor:
    """Rows ``[class, score, x1, y1, x2, y2]`` of one image with class ≥ 0 and score ≥ threshold."""
    return rows[(rows[:, 0] >= 0) & (rows[:, 1] >= threshold)]


def train(config: DetectConfig | dict[str, Any], data: DetectionData | None = None) -> TrainResult:
    """Train a detector (on ``data`` when given, else ``config.data``); writes a run directory
    and returns its history and model."""
    cfg = config if isinstance(config, DetectConfig) else config_from_dict(DetectConfig, config)
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, f"{cfg.model}-{cfg.data}", cfg.resume)
    task = DetectionTask(cfg, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, "detect", cfg, {
        "classes": task.data.classes, "image_size": cfg.image_size,
        "train_samples": len(task.data.train_images), "val_samples": len(task.data.val_images),
    })
    trainer = Trainer(task, cfg, run_dir)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The detector of a run directory with its newest weights, and the run's record."""
    record = load_run_config(run_dir)
    if record.get("task") != "detect":
        raise DivekitError(f"{run_dir} is a {record.get('task')!r} run, not a detection run")
    model = build_detector(record["config"]["model"], record["classes"], int(record["image_size"]))
    load_weights(model, latest_weights(run_dir))
    return model.to(resolve_device(device)).eval(), record


def evaluate(run_dir: str | Path, *, data_dir: str | None = None, device: str = "auto") -> dict[str, float]:
    """Validation loss (and its parts), mAP@0.5 and COCO mAP@[.5:.95] of a run's newest checkpoint."""
    model, record = load_trained(run_dir, device)
    values = {**record["config"], "resume": False, "out": None, "device": device}
    if data_dir is not None:
        values["data_dir"] = data_dir
    task = DetectionTask(config_from_dict(DetectConfig, values))
    return task.evaluate(model, task.val_data())


def predict(run_dir: str | Path, images: Sequence[str | Path], *, threshold: float = 0.5,
            nms_iou: float = 0.5, output: str | Path | None = None,
            device: str = "auto") -> list[dict[str, Any]]:
    """Detect objects in image files; with ``output`` draw each image's labelled boxes and
    scores into ``output/<name>.png``. Boxes are in the image's pixels."""
    if not images:
        raise DivekitError("no image files given")
    if not 0 <= threshold <= 1:
        raise DivekitError(f"--threshold must be in [0, 1], got {threshold}")
    if not 0 < nms_iou <= 1:
        raise DivekitError(f"--nms-iou must be in (0, 1], got {nms_iou}")
    model, record = load_trained(run_dir, device)
    classes, size = record["classes"], int(record["image_size"])
    originals = [load_image_file(p, 3) for p in images]
    x = torch.stack([resize_images(img, size) for img in originals])
    with torch.no_grad():
        rows = detections(model, x.to(next(model.parameters()).device), nms_iou).cpu()
    results = []
    for path, img, r in zip(images, originals, rows):
        kept = _boxes_above(r, threshold)
        h, w = img.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=kept.dtype)
        item: dict[str, Any] = {"image": str(path), "detections": [
            (classes[int(c)], float(s), [round(v, 1) for v in (b * scale).tolist()])
            for c, s, b in zip(kept[:, 0], kept[:, 1], kept[:, 2:])
        ]}
        if output is not None:
            from divekit.viz import plot_detections

            item["picture"] = str(plot_detections([img], [kept], classes,
                                                  Path(output) / f"{Path(path).stem}.png", ncols=1))
        results.append(item)
    return results


def cli_evaluate(args) -> None:
    metrics = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def cli_predict(args) -> None:
    for item in predict(args.run_dir, args.inputs, threshold=args.threshold, nms_iou=args.nms_iou,
                        output=args.output, device=args.device):
        shown = "; ".join(f"{c} {s:.3f} at {b}" for c, s, b in item["detections"]) or "no objects"
        print(f"{item['image']}: {shown}" + (f" -> {item['picture']}" if "picture" in item else ""))
