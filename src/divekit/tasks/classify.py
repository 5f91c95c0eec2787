"""Image classification: data + model + cross-entropy, trained by the engine.

Python users call the same functions the CLI calls::

    from divekit.tasks import classify
    result = classify.train(classify.ClassifyConfig(model="resnet18", data="digits", epochs=6))
    classify.evaluate(result.run_dir)
    classify.predict(result.run_dir, ["seven.png"], top_k=3)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data import dataset_info, load_dataset
from divekit.data.loader import TensorBatchLoader
from divekit.data.vision import ImageClassificationData, load_image_file, resize_images
from divekit.engine.checkpoint import load_weights
from divekit.engine.device import resolve_device
from divekit.engine.trainer import TrainConfig, Trainer, option
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.models.summary import layer_table
from divekit.tasks.common import (
    TrainResult,
    choose_run_dir,
    config_from_dict,
    latest_weights,
    load_run_config,
    save_run_config,
)

MIN_SIZE = 28  # every zoo model takes 28×28 and up; smaller datasets are upsampled to this


@dataclass
class ClassifyConfig(TrainConfig):
    model: str = option("lenet", "model name (see `divekit models`)", cli=False)
    data: str = option("digits", "dataset name (see `divekit datasets`)", metavar="NAME")
    batch_size: int = option(128, "minibatch size")
    resize: int | None = option(None, "resize images to N×N once, before training", metavar="N")
    data_dir: str | None = option(None, "folder with the dataset's files, when you have them", metavar="DIR")
    download: bool = option(False, "download missing files (hash-checked)")
    limit: int | None = option(None, "use only the first N training samples (quick runs)", metavar="N")
    workers: int = option(0, "data-loading processes for per-sample transforms", metavar="N")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    normalize: bool = option(True, "standardise inputs with the training set's mean and std", cli=False)
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.resize is None or self.resize >= 1, f"--resize must be positive, got {self.resize}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)


def load_data(cfg: ClassifyConfig) -> ImageClassificationData:
    """The dataset, decoded and resized once; inputs below 28×28 are upsampled to 28×28."""
    info = dataset_info(cfg.data)
    if info.task != "classify":
        raise DivekitError(f"dataset {cfg.data!r} is a {info.task} dataset, not a classification one")
    data = load_dataset(
        cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
        resize=cfg.resize, limit=cfg.limit,
    )
    if cfg.resize is None and min(data.image_size) < MIN_SIZE:
        data.train_images = resize_images(data.train_images, MIN_SIZE)
        data.val_images = resize_images(data.val_images, MIN_SIZE)
    return data


class ClassificationTask:
    """Cross-entropy on logits; accuracy as the metric."""

    def __init__(self, cfg: ClassifyConfig, data: ImageClassificationData | None = None):
        cfg.validate()
        info = model_info(cfg.model)
        if info.task != "classify":
            raise DivekitError(f"model {cfg.model!r} is a {info.task} model, not a classifier")
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg)
        d = self.data
        self.mean = torch.tensor(d.mean if cfg.normalize else (0.0,) * d.in_channels)
        self.std = torch.tensor(d.std if cfg.normalize else (1.0,) * d.in_channels)
        self.train_x = self.normalize(d.train_images)
        self.val_x = self.normalize(d.val_images)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)

    def model(self) -> nn.Module:
        model = create_model(
            self.cfg.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels
        )
        check_input_fits(model, self.cfg.model, (self.data.in_channels, *self.data.image_size))
        return model

    def train_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(
            self.train_x, self.data.train_labels, batch_size=self.cfg.batch_size, shuffle=True,
            seed=self.cfg.seed, workers=self.cfg.workers,
        )

    def val_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(
            self.val_x, self.data.val_labels, batch_size=max(self.cfg.batch_size, 256)
        )

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(dim=1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        n = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
            n += len(y)
        return {"loss": (loss_sum / n).item(), "acc": (correct / n).item()}


def check_input_fits(model: nn.Module, name: str, shape: tuple[int, int, int]) -> None:
    """Fail early, naming the layer, when a model cannot take the data's image size."""
    try:
        layer_table(model, shape)
    except DivekitError as e:
        default = model_info(name).input_shape
        hint = f"; pass --resize {default[1]} (the model's default input)" if default else ""
        raise DivekitError(f"{name}: {e}{hint}") from None


def train(config: ClassifyConfig | dict[str, Any]) -> TrainResult:
    """Train a classifier; writes a run directory and returns its history and model."""
    cfg = config if isinstance(config, ClassifyConfig) else config_from_dict(ClassifyConfig, config)
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, f"{cfg.model}-{cfg.data}", cfg.resume)
    task = ClassificationTask(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    d = task.data
    save_run_config(
        run_dir, "classify", cfg,
        {
            "classes": d.classes, "in_channels": d.in_channels, "image_size": list(d.image_size),
            "mean": task.mean.tolist(), "std": task.std.tolist(),
            "train_samples": len(d.train_labels), "val_samples": len(d.val_labels),
        },
    )
    trainer = Trainer(task, cfg, run_dir)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory with its newest weights, and the run's saved record."""
    record = load_run_config(run_dir)
    if record.get("task") != "classify":
        raise DivekitError(f"{run_dir} is a {record.get('task')!r} run, not a classification run")
    cfg = record["config"]
    model = create_model(
        cfg["model"], num_classes=len(record["classes"]), in_channels=record["in_channels"]
    )
    load_weights(model, latest_weights(run_dir))
    return model.to(resolve_device(device)).eval(), record


def evaluate(run_dir: str | Path, *, data_dir: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Validation loss, accuracy and per-class accuracy of a run's newest checkpoint."""
    model, record = load_trained(run_dir, device)
    values = dict(record["config"])
    values.update(resume=False, out=None, device=device)
    if data_dir is not None:
        values["data_dir"] = data_dir
    cfg = config_from_dict(ClassifyConfig, values)
    task = ClassificationTask(cfg)
    metrics: dict[str, Any] = task.evaluate(model, task.val_data())
    predictions = predict_tensor(model, task.val_x)
    labels = task.data.val_labels
    per_class = {}
    for c, name in enumerate(task.data.classes):
        mask = labels == c
        if mask.any():
            per_class[name] = (predictions[mask] == c).float().mean().item()
    metrics["per_class_acc"] = per_class
    return metrics


@torch.no_grad()
def predict_tensor(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def predict(
    run_dir: str | Path, images: Sequence[str | Path], *, top_k: int = 3, device: str = "auto"
) -> list[dict[str, Any]]:
    """Classify image files of any size and mode, converted as training did."""
    if not images:
        raise DivekitError("no image files given")
    if top_k < 1:
        raise DivekitError(f"--top-k must be at least 1, got {top_k}")
    model, record = load_trained(run_dir, device)
    classes = record["classes"]
    size = tuple(record["image_size"])
    x = torch.stack([load_image_file(p, record["in_channels"], size) for p in images])
    mean = torch.tensor(record["mean"]).view(-1, 1, 1)
    std = torch.tensor(record["std"]).view(-1, 1, 1)
    with torch.no_grad():
        probs = model(((x - mean) / std).to(next(model.parameters()).device)).float().softmax(1).cpu()
    k = min(top_k, len(classes))
    top = probs.topk(k, dim=1)
    return [
        {
            "image": str(path),
            "predictions": [(classes[i], p) for p, i in zip(top.values[r].tolist(), top.indices[r].tolist())],
        }
        for r, path in enumerate(images)
    ]


Config = ClassifyConfig


def cli_evaluate(args) -> None:
    metrics = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
    per_class = metrics.pop("per_class_acc", {})
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if per_class:
        print("per-class accuracy: " + ", ".join(f"{c}: {a:.3f}" for c, a in per_class.items()))


def cli_predict(args) -> None:
    for item in predict(args.run_dir, args.inputs, top_k=args.top_k, device=args.device):
        shown = ", ".join(f"{c} {p:.3f}" for c, p in item["predictions"])
        print(f"{item['image']}: {shown}")
