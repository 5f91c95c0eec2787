"""Image classification: data + model + cross-entropy, trained by the engine.

Python users call the same functions the CLI calls::

    from divekit.tasks import classify
    result = classify.train(classify.ClassifyConfig(model="resnet18", data="digits", epochs=6))
    classify.evaluate(result.run_dir)
    classify.predict(result.run_dir, ["seven.png"], top_k=3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data import dataset_info, load_dataset
from divekit.data.augment import Augment, BatchMix, SampleTransform
from divekit.data.batch_augment import BatchAugment
from divekit.data.loader import TensorBatchLoader
from divekit.data.vision import ImageClassificationData, load_image_file, resize_images
from divekit.engine.batch_size import choose_batch_size
from divekit.engine.checkpoint import load_weights
from divekit.io import atomic_write_text
from divekit.engine.device import resolve_device
from divekit.engine.finetune import TORCHVISION_PREFIX, torchvision_classifier
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


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise DivekitError(f"--batch-size must be a positive integer or auto, got {text!r}") from None


@dataclass
class ClassifyConfig(TrainConfig):
    model: str = option("lenet", "model name (see `divekit models`)", cli=False)
    data: str = option("digits", "dataset name (see `divekit datasets`)", metavar="NAME")
    batch_size: int | str = option(
        128, "minibatch size, or auto: the largest that fits in memory, capped at 10 × classes",
        type=parse_batch_size, metavar="N|auto",
    )
    memory_budget: str | None = option(
        None, "memory --batch-size auto may use: CPU RAM (default a quarter of free RAM) or CUDA "
        "memory (default all), e.g. 2GB", metavar="SIZE",
    )
    no_cap: bool = option(False, "--batch-size auto: skip the cap of 10 × the number of classes")
    resize: int | None = option(None, "resize images to N×N once, before training", metavar="N")
    data_dir: str | None = option(None, "folder with the dataset's files, when you have them", metavar="DIR")
    download: bool = option(False, "download missing files (hash-checked)")
    limit: int | None = option(None, "use only the first N training samples (quick runs)", metavar="N")
    workers: int = option(0, "data-loading processes for per-sample transforms", metavar="N")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    augment: str = option(
        "none", "training augmentation: a preset (none, flip, standard, strong) or a list such as "
        "hflip,crop:0.5-1,jitter:0.5 (see `divekit augment --help`); validation never augments",
        metavar="SPEC",
    )
    augment_mode: str = option(
        "batch", "where --augment runs: batch (whole minibatches at once with per-sample random "
        "parameters, on the training device; fast) or sample (torchvision transforms.v2 image by "
        "image in --workers loader processes)", choices=["batch", "sample"],
    )
    mixup: float = option(0.0, "mixup: blend image pairs and labels, λ ~ Beta(α, α); 0 = off", metavar="ALPHA")
    cutmix: float = option(0.0, "CutMix: paste a box from another image, λ ~ Beta(α, α); 0 = off", metavar="ALPHA")
    balance: bool = option(False, "draw classes equally often (weighted sampling with replacement)")
    class_weights: bool = option(False, "weight the loss by inverse class frequency, n / (K n_c)")
    tta: str = option("none", "test-time augmentation at evaluation: flip averages the "
                      "probabilities of the image and its mirror", choices=["none", "flip"])
    classes: str | None = option(
        None, "keep only these classes, by name or index (0-4, or 5,7,9), relabelled in order",
        metavar="LIST",
    )
    shots: int | None = option(None, "keep only N training images per class (few-shot, by --seed)", metavar="N")
    normalize: bool = option(True, "standardise inputs with the training set's mean and std", cli=False)
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
             f"--batch-size must be at least 1 or auto, got {self.batch_size!r}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.resize is None or self.resize >= 1, f"--resize must be positive, got {self.resize}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix take α ≥ 0 (0 = off)"),
            (self.shots is None or self.shots >= 1, f"--shots must be at least 1, got {self.shots}"),
            (self.tta in ("none", "flip"), f"--tta must be none or flip, got {self.tta!r}"),
            (self.augment_mode in ("batch", "sample"),
             f"--augment-mode must be batch or sample, got {self.augment_mode!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)
        Augment(self.augment)  # an unknown augmentation fails here, listing the valid ones


def load_data(cfg: ClassifyConfig) -> ImageClassificationData:
    """The dataset, decoded and resized once; inputs below 28×28 are upsampled to 28×28.

    ``--classes`` keeps a subset of the classes (relabelled 0..K-1 in the order given) and
    ``--shots`` keeps N training images per class, so a few-shot task is one option away.
    """
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
    if cfg.classes is not None:
        data = select_classes(data, parse_classes(cfg.classes, data.classes))
    if cfg.shots is not None:
        data = few_shot(data, cfg.shots, cfg.seed)
    return data


def parse_classes(spec: str, classes: Sequence[str]) -> list[int]:
    """``'0-4'``, ``'5,7,9'`` or class names → indices into ``classes``."""
    picked: list[int] = []
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        lo, sep, hi = item.partition("-")
        if item in classes:
            picked.append(list(classes).index(item))
        elif item.isdigit() and int(item) < len(classes):
            picked.append(int(item))
        elif sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) < len(classes):
            picked += range(int(lo), int(hi) + 1)
        else:
            raise DivekitError(
                f"--classes: {item!r} is neither a class nor an index range in 0..{len(classes) - 1}; "
                f"classes: {', '.join(classes)}"
            )
    if len(set(picked)) != len(picked) or len(picked) < 2:
        raise DivekitError(f"--classes must name at least 2 distinct classes, got {spec!r}")
    return picked


def _restat(data: ImageClassificationData) -> ImageClassificationData:
    x = data.train_images
    mean = x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x.double().std(dim=(0, 2, 3)) if len(x) > 1 else torch.ones_like(mean)
    data.mean = tuple(mean.tolist())
    data.std = tuple(torch.where(std > 1e-6, std, torch.ones_like(std)).tolist())
    return data


def select_classes(data: ImageClassificationData, keep: Sequence[int]) -> ImageClassificationData:
    """Only the samples of classes ``keep``, relabelled ``keep[i] → i``; statistics recomputed."""
    table = torch.full((len(data.classes),), -1, dtype=torch.int64)
    table[torch.tensor(list(keep))] = torch.arange(len(keep))
    tm, vm = table[data.train_labels] >= 0, table[data.val_labels] >= 0
    return _restat(ImageClassificationData(
        data.train_images[tm], table[data.train_labels[tm]], data.val_images[vm],
        table[data.val_labels[vm]], [data.classes[i] for i in keep], data.name, data.mean, data.std,
    ))


def few_shot(data: ImageClassificationData, shots: int, seed: int) -> ImageClassificationData:
    """``shots`` training images per class, drawn by ``seed``; validation is kept whole."""
    g = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(data.train_labels), generator=g)
    keep = torch.cat([order[data.train_labels[order] == c][:shots] for c in range(data.num_classes)])
    keep = keep.sort().values
    data.train_images, data.train_labels = data.train_images[keep], data.train_labels[keep]
    return _restat(data)


def build_classifier(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A zoo model, or ``torchvision:ARCH`` (a torchvision architecture split as the zoo's)."""
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_classifier(name, num_classes, in_channels)
    return create_model(name, num_classes=num_classes, in_channels=in_channels)


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes)


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


class ClassificationTask:
    """Cross-entropy on logits (hard or soft targets); accuracy as the metric.

    ``norm`` overrides the data's own ``(mean, std)`` (a fine-tuned model keeps its source's).
    """

    def __init__(self, cfg: ClassifyConfig, data: ImageClassificationData | None = None,
                 norm: tuple[Sequence[float], Sequence[float]] | None = None):
        cfg.validate()
        if not cfg.model.startswith(TORCHVISION_PREFIX):
            info = model_info(cfg.model)
            if info.task != "classify":
                raise DivekitError(f"model {cfg.model!r} is a {info.task} model, not a classifier")
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg)
        d = self.data
        mean, std = norm if norm is not None else (d.mean, d.std)
        self.mean = torch.tensor(mean if cfg.normalize else (0.0,) * d.in_channels, dtype=torch.float32)
        self.std = torch.tensor(std if cfg.normalize else (1.0,) * d.in_channels, dtype=torch.float32)
        self.train_x = self.normalize(d.train_images)
        self.val_x = self.normalize(d.val_images)
        self.augment = Augment(cfg.augment, train=True)
        # batched augmentation runs in step(), on the device, before normalisation
        self.batch_augment = (BatchAugment(cfg.augment) if cfg.augment_mode == "batch"
                              and not self.augment.is_identity else None)
        self.mix = BatchMix(d.num_classes, cfg.mixup, cfg.cutmix)
        counts = class_counts(d.train_labels, d.num_classes).double()
        # w_c = n / (K n_c), sklearn's "balanced"; a class absent from training gets weight 0
        w = torch.where(counts > 0, counts.sum() / (d.num_classes * counts.clamp(min=1)), 0.0)
        self.loss_weight = w.float() if cfg.class_weights else None

    def normalize(self, x: Tensor, device: torch.device | None = None) -> Tensor:
        mean, std = self.mean.view(-1, 1, 1), self.std.view(-1, 1, 1)
        if device is not None:
            mean, std = mean.to(device), std.to(device)
        return (x - mean) / std

    def _normalize_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return self.normalize(batch[0]), batch[1]

    def model(self) -> nn.Module:
        model = build_classifier(self.cfg.model, self.data.num_classes, self.data.in_channels)
        check_input_fits(model, self.cfg.model, (self.data.in_channels, *self.data.image_size))
        return model

    def train_data(self) -> TensorBatchLoader:
        cfg, labels = self.cfg, self.data.train_labels
        weights = None
        if cfg.balance:  # each class drawn with probability 1/K: weight 1 / n_c per sample
            weights = 1.0 / class_counts(labels, self.data.num_classes).double()[labels]
        common = dict(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, weights=weights)
        if self.augment.is_identity:
            return TensorBatchLoader(self.train_x, labels, **common)  # the fast path
        if self.batch_augment is not None:  # raw [0, 1] images; step() augments and normalises
            return TensorBatchLoader(self.data.train_images, labels, **common)
        return TensorBatchLoader(
            self.data.train_images, labels, **common, workers=cfg.workers,
            sample_transform=SampleTransform(self.augment), batch_transform=self._normalize_batch,
        )

    def val_data(self) -> TensorBatchLoader:
        bs = self.cfg.batch_size if isinstance(self.cfg.batch_size, int) else 256
        return TensorBatchLoader(self.val_x, self.data.val_labels, batch_size=max(bs, 256))

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        if self.batch_augment is not None:
            channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            x = self.normalize(self.batch_augment(x), device=x.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if self.mix.enabled:
            x, y = self.mix(x, y)  # soft targets (N, K)
        logits = model(x)
        weight = self.loss_weight.to(logits.device) if self.loss_weight is not None else None
        loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=self.cfg.label_smoothing)
        hard = y.argmax(dim=1) if y.is_floating_point() else y
        acc = (logits.argmax(dim=1) == hard).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        n = 0
        predictions, labels = [], []
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            scores = class_scores(model, x, self.cfg.tta)
            loss_sum += F.cross_entropy(scores, y, reduction="sum")
            predictions.append(scores.argmax(dim=1))
            labels.append(y)
            correct += (predictions[-1] == y).sum()
            n += len(y)
        # kept for the class report, so the last epoch does not run the validation set twice
        self.last_eval = (torch.cat(predictions).cpu(), torch.cat(labels).cpu())
        return {"loss": (loss_sum / n).item(), "acc": (correct / n).item()}

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path) -> None:
        if epoch == self.cfg.epochs:
            predictions, labels = getattr(self, "last_eval", (None, None))
            if predictions is None or len(predictions) != len(self.data.val_labels):
                predictions = predict_tensor(model, self.val_x, tta=self.cfg.tta)
                labels = self.data.val_labels
            report = class_report(predictions, labels, self.data.classes)
            write_class_report(report, run_dir, self.data.classes)


def class_scores(model: nn.Module, x: Tensor, tta: str = "none") -> Tensor:
    """Logits; with ``tta='flip'`` the log of the mean of the image's and its mirror's
    probabilities, ``log((softmax(f(x)) + softmax(f(flip(x)))) / 2)`` (a valid input to the
    cross-entropy, whose log-softmax leaves log-probabilities unchanged)."""
    logits = model(x).float()
    if tta == "none":
        return logits
    mirrored = model(x.flip(-1)).float()
    return torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)


def check_input_fits(model: nn.Module, name: str, shape: tuple[int, int, int]) -> None:
    """Fail early, naming the layer, when a model cannot take the data's image size."""
    try:
        layer_table(model, shape)
    except DivekitError as e:
        default = None if name.startswith(TORCHVISION_PREFIX) else model_info(name).input_shape
        hint = f"; pass --resize {default[1]} (the model's default input)" if default else ""
        raise DivekitError(f"{name}: {e}{hint}") from None


def resolve_batch_size(task: ClassificationTask) -> None:
    """``--batch-size auto`` → a number, printed with the reason; stored in the config."""
    cfg, d = task.cfg, task.data
    if cfg.batch_size != "auto":
        return
    choice = choose_batch_size(
        task.model(), (d.in_channels, *d.image_size), d.num_classes,
        device=resolve_device(cfg.device), memory_budget=cfg.memory_budget, cap=not cfg.no_cap,
        max_batch=max(2, len(d.train_labels)), optimizer=cfg.optimizer,
    )
    print(f"--batch-size auto: {choice.batch_size} ({choice.reason})")
    cfg.batch_size = choice.batch_size


def run_record(task: ClassificationTask) -> dict[str, Any]:
    d = task.data
    return {
        "classes": d.classes, "in_channels": d.in_channels, "image_size": list(d.image_size),
        "mean": task.mean.tolist(), "std": task.std.tolist(),
        "train_samples": len(d.train_labels), "val_samples": len(d.val_labels),
    }


def fit(task: ClassificationTask, run_dir: Path, extra: dict[str, Any] | None = None) -> TrainResult:
    """Write the run's config, then train ``task`` in ``run_dir`` (resuming if asked)."""
    cfg = task.cfg
    resolve_batch_size(task)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(run_dir, "classify", cfg, {**run_record(task), **(extra or {})})
    trainer = Trainer(task, cfg, run_dir)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


def train(config: ClassifyConfig | dict[str, Any]) -> TrainResult:
    """Train a classifier; writes a run directory and returns its history and model."""
    cfg = config if isinstance(config, ClassifyConfig) else config_from_dict(ClassifyConfig, config)
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, f"{cfg.model}-{cfg.data}", cfg.resume)
    return fit(ClassificationTask(cfg), run_dir)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory with its newest weights, and the run's saved record."""
    record = load_run_config(run_dir)
    if record.get("task") != "classify":
        raise DivekitError(f"{run_dir} is a {record.get('task')!r} run, not a classification run")
    model = build_classifier(record["config"]["model"], len(record["classes"]), record["in_channels"])
    load_weights(model, latest_weights(run_dir))
    return model.to(resolve_device(device)).eval(), record


def run_config(record: dict[str, Any], **overrides: Any) -> ClassifyConfig:
    """The run's saved options as a ClassifyConfig (a fine-tuning run's extra ones dropped)."""
    names = {f.name for f in dataclasses.fields(ClassifyConfig)}
    values = {k: v for k, v in record["config"].items() if k in names}
    return config_from_dict(ClassifyConfig, {**values, **overrides})


def class_report(predictions: Tensor, labels: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Per-class accuracy (recall) and the confusion matrix of predicted against true labels."""
    matrix = confusion_matrix(labels, predictions, len(classes))
    per_class = {
        name: (matrix[c, c] / matrix[c].sum()).item()
        for c, name in enumerate(classes) if matrix[c].sum() > 0
    }
    return {"per_class_acc": per_class, "confusion_matrix": matrix.tolist()}


def write_class_report(report: dict[str, Any], run_dir: Path, classes: Sequence[str]) -> Path:
    """``per_class.csv`` and ``confusion_matrix.png`` in the run directory."""
    from divekit.viz import plot_confusion_matrix

    matrix = report["confusion_matrix"]
    lines = ["class,samples,accuracy"] + [
        f"{name},{sum(matrix[c])},{report['per_class_acc'].get(name, float('nan')):.6g}"
        for c, name in enumerate(classes)
    ]
    atomic_write_text(run_dir / "per_class.csv", "\n".join(lines) + "\n")
    return plot_confusion_matrix(matrix, classes, run_dir / "confusion_matrix.png")


def evaluate(run_dir: str | Path, *, data_dir: str | None = None, device: str = "auto",
             tta: str | None = None) -> dict[str, Any]:
    """Validation loss, accuracy and per-class accuracy of a run's newest checkpoint; writes
    ``per_class.csv`` and ``confusion_matrix.png`` into the run directory."""
    model, record = load_trained(run_dir, device)
    overrides: dict[str, Any] = {"resume": False, "out": None, "device": device, "augment": "none",
                                 "batch_size": 256, "mixup": 0.0, "cutmix": 0.0}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if tta is not None:
        overrides["tta"] = tta
    cfg = run_config(record, **overrides)
    task = ClassificationTask(cfg, norm=(record["mean"], record["std"]))
    metrics: dict[str, Any] = task.evaluate(model, task.val_data())
    report = class_report(*task.last_eval, task.data.classes)
    metrics["per_class_acc"] = report["per_class_acc"]
    metrics["confusion_matrix_png"] = str(write_class_report(report, Path(run_dir), task.data.classes))
    return metrics


@torch.no_grad()
def predict_tensor(model: nn.Module, x: Tensor, batch_size: int = 512, tta: str = "none") -> Tensor:
    device = next(model.parameters()).device
    model.eval()
    out = [class_scores(model, x[i : i + batch_size].to(device), tta).argmax(1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


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
    tta = record["config"].get("tta", "none")
    with torch.no_grad():
        scores = class_scores(model, ((x - mean) / std).to(next(model.parameters()).device), tta)
        probs = scores.softmax(1).cpu()
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
    metrics = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device,
                       tta=getattr(args, "tta", None))
    per_class = metrics.pop("per_class_acc", {})
    picture = metrics.pop("confusion_matrix_png", None)
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if per_class:
        print("per-class accuracy: " + ", ".join(f"{c}: {a:.3f}" for c, a in per_class.items()))
    if picture:
        print(f"confusion matrix: {picture}")


def cli_predict(args) -> None:
    for item in predict(args.run_dir, args.inputs, top_k=args.top_k, device=args.device):
        shown = ", ".join(f"{c} {p:.3f}" for c, p in item["predictions"])
        print(f"{item['image']}: {shown}")
