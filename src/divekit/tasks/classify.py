"""Image classification: data, model, cross-entropy and accuracy, on the engine's seam.

Python users train, evaluate and predict through the same calls the CLI makes::

    from divekit.tasks import train, evaluate, predict
    result = train({"model": "resnet18", "data": "digits", "epochs": 5})
    evaluate(result.run_dir)
    predict(result.run_dir, ["seven.png"], top_k=3)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data import dataset_info, load_dataset
from divekit.data.augment import Augment, BatchMix, SampleTransform
from divekit.data.batch_augment import BatchAugment
from divekit.data.loader import TensorBatchLoader
from divekit.data.vision import ImageClassificationData, load_image_batch, resize_images
from divekit.engine.batch_size import choose_batch_size
from divekit.engine.config import Check, TaskConfig, check_call
from divekit.engine.device import resolve_device
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import atomic_write_text
from divekit.models import create_model, model_info
from divekit.models.summary import layer_table
from divekit.models.surgery import TORCHVISION_PREFIX, torchvision_classifier

log = logging.getLogger(__name__)

MIN_SIZE = 28  # every zoo model takes 28×28 and up; smaller datasets are upsampled to this


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer or ``auto``."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise DivekitError(f"--batch-size must be a positive integer or auto, got {text!r}") from None


@dataclass(frozen=True)
class ClassifyConfig(TaskConfig):
    # test-time augmentation changes only how validation reads the model: free on --resume
    RESUME_FREE: ClassVar[frozenset[str]] = TaskConfig.RESUME_FREE | {"tta"}

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

    def checks(self) -> list[Check]:
        return super().checks() + [
            (self.resize is None or self.resize >= 1, f"--resize must be positive, got {self.resize}"),
            (self.workers >= 0, f"--workers must be 0 or more, got {self.workers}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix take α ≥ 0 (0 = off)"),
            (self.shots is None or self.shots >= 1, f"--shots must be at least 1, got {self.shots}"),
            (self.tta in ("none", "flip"), f"--tta must be none or flip, got {self.tta!r}"),
            (self.augment_mode in ("batch", "sample"),
             f"--augment-mode must be batch or sample, got {self.augment_mode!r}"),
            check_call(Augment, self.augment),
        ]


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


@dataclass(frozen=True)
class ClassifyPredictConfig:
    """``divekit predict``'s options for a classifier run."""

    top_k: int = option(3, "classes to show per image")


class ClassificationTask(Task, name="classify"):
    """Cross-entropy on logits (hard or soft targets); accuracy, per-class accuracy and the
    confusion matrix as the metrics.

    Rebuilt from a run (``record``), the classes, input size and the training set's
    normalisation come from the record, so evaluating or predicting loads no training data
    (evaluate loads the validation split only). ``norm`` overrides the data's own
    ``(mean, std)``: a fine-tuned model keeps its source's.
    """

    Config = ClassifyConfig
    PredictConfig = ClassifyPredictConfig
    # what a run's config.json must hold for evaluate/predict (checked by engine.run.load_run)
    record_keys = {"classes": list, "in_channels": int, "image_size": list, "mean": list,
                   "std": list}

    def __init__(self, config: ClassifyConfig, record: dict[str, Any] | None = None, *,
                 norm: tuple[Sequence[float], Sequence[float]] | None = None):
        super().__init__(config, record)
        if not config.model.startswith(TORCHVISION_PREFIX):
            info = model_info(config.model)
            if info.task != "classify":
                raise DivekitError(f"model {config.model!r} is a {info.task} model, not a classifier")
        self._norm = norm
        self.batch_augment = (BatchAugment(config.augment) if config.augment_mode == "batch"
                              and not Augment(config.augment).is_identity else None)

    # ------------------------------------------------------------ data (loaded on first use)
    @cached_property
    def data(self) -> ImageClassificationData:
        return load_data(self.config)

    @cached_property
    def facts(self) -> dict[str, Any]:
        """Classes, channels, image size and normalisation: from the run, else from the data."""
        if self.record.get("classes") is not None:
            return {k: self.record[k] for k in ("classes", "in_channels", "image_size", "mean", "std")}
        d = self.data
        mean, std = self.input_norm() or (d.mean, d.std)
        if not self.config.normalize:
            mean, std = (0.0,) * d.in_channels, (1.0,) * d.in_channels
        return {"classes": list(d.classes), "in_channels": d.in_channels,
                "image_size": list(d.image_size), "mean": list(mean), "std": list(std)}

    def input_norm(self) -> tuple[Sequence[float], Sequence[float]] | None:
        """``(mean, std)`` to standardise inputs with, if not the training data's own."""
        return self._norm

    @property
    def normalizes(self) -> bool:
        """Whether :meth:`normalize` changes anything: False where every channel's mean is 0
        and std 1 (``normalize=False``, or data already standardised)."""
        f = self.facts
        return any(m != 0 for m in f["mean"]) or any(s != 1 for s in f["std"])

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel; ``x`` itself (no copy) where that is the identity."""
        if not self.normalizes:
            return x
        mean = torch.tensor(self.facts["mean"], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.facts["std"], dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def _normalize_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """A loader's batch standardised in place: its images are a fresh tensor (gathered by
        index, or collated), so no second one is allocated (the same numbers as
        :meth:`normalize`: the same two elementwise operations)."""
        x = batch[0]
        if self.normalizes:
            f = self.facts
            x.sub_(torch.tensor(f["mean"], dtype=x.dtype, device=x.device).view(-1, 1, 1))
            x.div_(torch.tensor(f["std"], dtype=x.dtype, device=x.device).view(-1, 1, 1))
        return x, batch[1]

    @cached_property
    def _loader_normalizes(self) -> bool:
        """Whether the training loader standardises its batches: only the per-sample
        augmentation's (its transforms need the [0, 1] images). Every other batch is
        standardised on the device, in :meth:`pipeline_split` and :meth:`validation_step`, and
        the loaders hold ``data``'s own images: a normalised copy of the whole set would sit in
        memory beside them. The numbers are the same: ``(x - mean) / std`` is elementwise, so
        batch by batch it is bit-identical to the whole set at once."""
        return (self.batch_augment is None
                and not Augment(self.config.augment, train=True).is_identity)

    def train_data(self) -> TensorBatchLoader:
        cfg, labels = self.config, self.data.train_labels
        weights = None
        if cfg.balance:  # each class drawn with probability 1/K: weight 1 / n_c per sample
            weights = 1.0 / class_counts(labels, self.data.num_classes).double()[labels]
        common = dict(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, weights=weights)
        augment = Augment(cfg.augment, train=True)
        if augment.is_identity:
            return TensorBatchLoader(self.data.train_images, labels, **common)
        if self.batch_augment is not None:  # raw [0, 1] images; training_step augments them
            return TensorBatchLoader(self.data.train_images, labels, **common)
        return TensorBatchLoader(
            self.data.train_images, labels, **common, workers=cfg.workers,
            sample_transform=SampleTransform(augment), batch_transform=self._normalize_batch,
        )

    def val_data(self) -> TensorBatchLoader:
        self._check_data_fits_record()
        bs = self.config.batch_size if isinstance(self.config.batch_size, int) else 256
        return TensorBatchLoader(self.data.val_images, self.data.val_labels,
                                 batch_size=max(bs, 256))

    def load_extras(self, run_dir: Any) -> None:
        """A reopened run's facts in its ``config.json`` are checked before a model is built
        from them or an image converted with them: ``in_channels`` at least 1, ``image_size``
        two sides in [1, 8192], ``mean`` and ``std`` one finite number per channel, ``std``
        positive (a tampered ``in_channels 0`` or a text in ``std`` was a raw error; a zero
        ``std`` would print nan probabilities). One line naming the file and the key."""
        if self.record.get("classes") is None:
            return
        path, f = Path(run_dir) / "config.json", self.facts
        channels, size = f["in_channels"], f["image_size"]
        if not 1 <= channels <= 4096:
            raise DivekitError(f"{path}: 'in_channels' must be in [1, 4096], got {channels}")
        if (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                      and 1 <= v <= 8192 for v in size)):
            raise DivekitError(f"{path}: 'image_size' must be two sides in [1, 8192], got {size}")
        for key in ("mean", "std"):
            values = f[key]
            if len(values) != channels or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    and (key == "mean" or v > 0) for v in values):
                what = "finite number" if key == "mean" else "positive finite number"
                raise DivekitError(f"{path}: {key!r} must hold a {what} per channel "
                                   f"({channels}), got {str(values)[:80]}")

    def _check_data_fits_record(self) -> None:
        """A reopened run's data, loaded from its config (``--data``, ``--resize``, ``--classes``),
        must be what its record says the model was trained on: one line naming both (a
        tampered ``resize`` fed 7×7 images to a LeNet trained on 28×28, a raw RuntimeError)."""
        if self.record.get("classes") is None:
            return
        f, d = self.facts, self.data
        trained = (f["in_channels"], *f["image_size"], len(f["classes"]))
        loaded = (d.in_channels, *d.image_size, len(d.classes))
        if tuple(trained) != tuple(loaded):
            raise DivekitError(
                f"the run's data ({self.config.data!r} as its config.json reads it) is "
                f"{loaded[0]}×{loaded[1]}×{loaded[2]} images of {loaded[3]} classes, but its "
                f"record says the model was trained on {trained[0]}×{trained[1]}×{trained[2]} "
                f"images of {trained[3]} classes")

    # ------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        f = self.facts
        model = build_classifier(self.config.model, len(f["classes"]), f["in_channels"])
        check_input_fits(model, self.config.model, (f["in_channels"], *f["image_size"]))
        return model

    def prepare(self) -> None:
        """``--batch-size auto`` → the largest batch that fits, logged with the reason."""
        cfg, d = self.config, self.data
        if cfg.batch_size != "auto":
            return
        choice = choose_batch_size(
            self.build_model(), (d.in_channels, *d.image_size), d.num_classes,
            device=resolve_device(cfg.device), memory_budget=cfg.memory_budget, cap=not cfg.no_cap,
            max_batch=max(2, len(d.train_labels)), optimizer=cfg.optimizer,
        )
        log.info("--batch-size auto: %d (%s)", choice.batch_size, choice.reason)
        self.config = dataclasses.replace(cfg, batch_size=choice.batch_size)

    def run_record(self) -> dict[str, Any]:
        d = self.data
        return {**self.facts, "train_samples": len(d.train_labels), "val_samples": len(d.val_labels)}

    # ------------------------------------------------------------ steps
    @cached_property
    def mix(self) -> BatchMix:
        return BatchMix(len(self.facts["classes"]), self.config.mixup, self.config.cutmix)

    @cached_property
    def loss_weight(self) -> Tensor | None:
        """``w_c = n / (K n_c)``, sklearn's "balanced"; a class absent from training gets 0."""
        if not self.config.class_weights:
            return None
        k = self.data.num_classes
        counts = class_counts(self.data.train_labels, k).double()
        return torch.where(counts > 0, counts.sum() / (k * counts.clamp(min=1)), 0.0).float()

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        (x,), y = self.pipeline_split(batch)
        return self.pipeline_loss(model(x), y)

    def pipeline_split(self, batch: tuple[Tensor, Tensor]) -> tuple[tuple[Tensor], Tensor]:
        """The augmented (and mixed) images, and their hard or soft targets."""
        x, y = batch
        if self.batch_augment is not None:
            channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            x = self.normalize(self.batch_augment(x))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        elif not self._loader_normalizes:
            x = self.normalize(x)  # on the device (_loader_normalizes); keeps channels_last
        if self.mix.enabled:
            x, y = self.mix(x, y)  # soft targets (N, K)
        return (x,), y

    def pipeline_loss(self, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        weight = self.loss_weight.to(logits.device) if self.loss_weight is not None else None
        loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=self.config.label_smoothing)
        hard = y.argmax(dim=1) if y.is_floating_point() else y
        acc = (logits.argmax(dim=1) == hard).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Any]:
        x, y = batch
        scores = class_scores(model, self.normalize(x), self.config.tta)
        predicted = scores.argmax(dim=1)
        return {"loss": F.cross_entropy(scores, y, reduction="sum"),
                "correct": (predicted == y).sum(), "count": len(y),
                "predictions": [predicted.cpu()], "labels": [y.cpu()]}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        n = max(sums["count"], 1)
        return {"loss": float(sums["loss"]) / n, "acc": float(sums["correct"]) / n,
                "predictions": torch.cat(sums["predictions"]), "labels": torch.cat(sums["labels"])}

    # ------------------------------------------------------------ reports and inference
    def on_epoch_end(self, model: nn.Module, epoch: int, run: Any, metrics: dict[str, Any]) -> None:
        if epoch == self.config.epochs and "predictions" in metrics:
            self.on_evaluate(model, run, metrics)

    def on_evaluate(self, model: nn.Module, run: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """``per_class.csv`` and ``confusion_matrix.png`` in the run directory."""
        classes = self.facts["classes"]
        report = class_report(metrics["predictions"], metrics["labels"], classes)
        picture = write_class_report(report, Path(run.dir), classes)
        return {"per_class_acc": report["per_class_acc"], "confusion_matrix_png": str(picture)}

    def predict(self, model: nn.Module, inputs: Sequence[Any], *, top_k: int = 3) -> list[dict[str, Any]]:
        """Top-k classes of image files of any size and mode, converted as training did."""
        if top_k < 1:
            raise DivekitError(f"--top-k must be at least 1, got {top_k}")
        f = self.facts
        x = load_image_batch(inputs, f["in_channels"], tuple(f["image_size"]))
        device = next(model.parameters()).device
        with torch.inference_mode():
            probs = class_scores(model, self.normalize(x.to(device)), self.config.tta).softmax(1).cpu()
        if not torch.isfinite(probs).all():
            raise DivekitError("the model's outputs are not finite (its weights hold NaN or inf); "
                               "retrain it or resume from an earlier checkpoint")
        top = probs.topk(min(top_k, len(f["classes"])), dim=1)
        return [{"image": str(path),
                 "predictions": [(f["classes"][i], p) for p, i in
                                 zip(top.values[r].tolist(), top.indices[r].tolist())]}
                for r, path in enumerate(inputs)]

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """The numbers on one line, then the per-class accuracy and the confusion matrix's
        picture when :meth:`on_evaluate` made them."""
        per_class = metrics.get("per_class_acc") or {}
        lines = [", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))]
        if per_class:
            lines.append("per-class accuracy: "
                         + ", ".join(f"{c}: {a:.3f}" for c, a in per_class.items()))
        if metrics.get("confusion_matrix_png"):
            lines.append(f"confusion matrix: {metrics['confusion_matrix_png']}")
        return "\n".join(lines)

    def format_prediction(self, item: dict[str, Any]) -> str:
        """``seven.png: 7 0.981, 1 0.012, 9 0.004``."""
        shown = ", ".join(f"{c} {p:.3f}" for c, p in item["predictions"])
        return f"{item['image']}: {shown}"

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


