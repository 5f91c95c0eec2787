"""Fine-tuning: ``divekit finetune SOURCE --data NAME``.

``finetune(config)`` copies the feature extractor of a SOURCE, gives it a fresh head for the
target's classes and trains it through the classification task (so ``divekit evaluate`` and
``predict`` work on the run). SOURCE is one of:

* a divekit run directory (any zoo classifier);
* a torchvision weights file (a ``.pth`` state dict, loaded with ``weights_only=True`` so nothing
  in it runs): the architecture comes from ``--arch`` or the file name (``resnet18-f37072fd.pth``)
  and is built with torchvision's own builder, split into ``features`` stages and ``head``
  (:func:`divekit.models.surgery.torchvision_classifier`). We do not map torchvision's names
  onto our zoo: the zoo follows the course, whose blocks differ (e.g. its ResNet shortcut conv);
* ``ARCH:WEIGHTS`` such as ``resnet18:IMAGENET1K_V1``: torchvision's published weights,
  downloaded once into torch's hub cache and read by :mod:`divekit.weights` (the
  file's sha256 checked against its name before every use, ``weights_only=True``), never by
  torchvision's own loader.

Grayscale targets use RGB sources by summing the first convolution's filters over the colour
channels; inputs are standardised with the source's statistics (ImageNet's for torchvision).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divekit import weights as weight_files
from divekit.config import config_from_dict, field_names, flag_name, option
from divekit.engine.checkpoint import load_weights
from divekit.engine.config import Check, finite
from divekit.engine.record import CONFIG, check_record, read_record, resume_values
from divekit.engine.run import train
from divekit.engine.task import Run, TrainResult
from divekit.errors import DivekitError
from divekit.models import surgery as ft
from divekit.tasks import classify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig(classify.ClassifyConfig):
    lr: float = option(0.01, "base learning rate (copied layers); the head gets --head-lr-mult × it")
    source: str = option("", "run directory, torchvision weights file, or ARCH:WEIGHTS", cli=False)
    arch: str | None = option(
        None, "torchvision architecture of a weights file (default: from its name, e.g. "
        "resnet18-f37072fd.pth)", metavar="NAME",
    )
    freeze: int = option(0, "freeze the first N stages of the copied features", metavar="N")
    head_lr_mult: float = option(10.0, "the new head's learning rate is this × --lr", metavar="X")
    lr_decay: float = option(
        1.0, "layer-wise decay: stage i of n learns at --lr × DECAY^(n-1-i); 1 = off", metavar="DECAY"
    )

    def checks(self) -> list[Check]:
        return super().checks() + [
            (self.freeze >= 0, f"--freeze must be 0 or more, got {self.freeze}"),
            (finite(self.head_lr_mult) and self.head_lr_mult > 0,
             f"--head-lr-mult must be positive, got {self.head_lr_mult}"),
            (finite(self.lr_decay) and 0 < self.lr_decay <= 1,
             f"--lr-decay must be in (0, 1], got {self.lr_decay}"),
        ]

    @property
    def run_name(self) -> str:
        return f"{self.model.removeprefix(ft.TORCHVISION_PREFIX)}-{self.data}-finetune"


@dataclass
class Source:
    """A pretrained classifier ready to give its features away."""

    model_name: str  # zoo name or torchvision:ARCH
    model: nn.Module
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int] | None
    description: str


# ----------------------------------------------------------------------------- sources
# what a classification run's config.json must hold to rebuild its classifier
_CLASSIFY_RECORD = {"classes": list, "in_channels": int, "image_size": list, "mean": list,
                    "std": list}


def _from_run(path: Path, arch: str | None) -> Source:
    record = read_record(path)
    if record.get("task") != "classify":
        raise DivekitError(f"SOURCE {path} is a {record.get('task')!r} run, not a classifier")
    check_record(record, {**_CLASSIFY_RECORD, "config": dict}, path / CONFIG)
    check_record(record["config"], {"model": str}, path / CONFIG)
    name = record["config"]["model"]
    if arch is not None and arch not in (name, name.removeprefix(ft.TORCHVISION_PREFIX)):
        raise DivekitError(f"SOURCE {path} trained {name!r}; --arch {arch!r} does not match")
    model = classify.build_classifier(name, len(record["classes"]), record["in_channels"])
    weights = Run(path, None).latest_weights()
    load_weights(model, weights, what=f"SOURCE {path}'s {CONFIG} ({len(record['classes'])} classes)")
    return Source(name, model, record["in_channels"], tuple(record["mean"]), tuple(record["std"]),
                  tuple(record["image_size"]), f"run {path} ({name}, classes {record['classes']})")


def _guess_arch(path: Path) -> str:
    import torchvision

    stem = path.name.split(".")[0].split("-")[0]
    if stem in torchvision.models.list_models(module=torchvision.models):
        return stem
    raise DivekitError(f"cannot tell the architecture of {path.name}; pass --arch (e.g. resnet18)")


def _from_state(arch: str, state: dict[str, torch.Tensor], what: str) -> Source:
    model = ft.torchvision_classifier(arch, ft.state_num_classes(state), 3, state)
    return Source(ft.TORCHVISION_PREFIX + arch, model, 3, ft.IMAGENET_MEAN, ft.IMAGENET_STD, None, what)


def _from_torchvision_name(spec: str) -> Source:
    import torchvision

    arch, _, tag = spec.partition(":")
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise DivekitError(f"unknown torchvision model {arch!r} in SOURCE {spec!r}") from None
    if tag not in enum.__members__:
        raise DivekitError(f"unknown weights {tag!r} for {arch}; choose one of: {', '.join(enum.__members__)}")
    # divekit's loader, never torchvision's: hash checked on every use, weights_only=True
    state = weight_files.torchvision_state(enum[tag])
    return _from_state(arch, state, f"torchvision {spec}")


def is_image_source(spec: str | None) -> bool:
    """Whether SOURCE names an image classifier to fine-tune: a divekit run directory (its
    ``config.json`` a run's record), a weights file, or ``ARCH:WEIGHTS``. Only what the name
    and the files say is looked at (nothing is loaded): ``divekit finetune`` picks its path by
    this and :func:`divekit.tasks.bert_finetune.is_bert_source`."""
    if not spec:
        return False
    path = Path(spec)
    if path.is_dir():
        try:
            record = read_record(path)
        except DivekitError:
            return False
        return "task" in record
    return path.is_file() or (":" in spec and "/" not in spec)


def resolve_source(spec: str, arch: str | None = None) -> Source:
    """A run directory, a weights file, or ``ARCH:WEIGHTS`` → :class:`Source`."""
    path = Path(spec)
    if path.is_dir():
        return _from_run(path, arch)
    if path.is_file():
        arch = (arch or _guess_arch(path)).removeprefix(ft.TORCHVISION_PREFIX)
        return _from_state(arch, weight_files.load_state_file(path), f"weights file {path} ({arch})")
    if ":" in spec and "/" not in spec:
        return _from_torchvision_name(spec)
    raise DivekitError(
        f"SOURCE {spec!r} is neither a run directory, a weights file, nor torchvision weights "
        "such as resnet18:IMAGENET1K_V1"
    )


def _norm_for(source: Source, in_channels: int) -> tuple[list[float], list[float]]:
    mean, std = list(source.mean), list(source.std)
    if in_channels == len(mean):
        return mean, std
    avg = lambda v: [sum(v) / len(v)] * in_channels  # noqa: E731
    return avg(mean), avg(std)


# ----------------------------------------------------------------------------- the task
class FinetuneTask(classify.ClassificationTask):
    """Classification whose model starts from the source's features with a fresh head; its
    runs are classification runs (``divekit evaluate``/``predict`` open them as such)."""

    def __init__(self, config: FinetuneConfig, source: Source, record: dict[str, Any] | None = None):
        self.source = source
        super().__init__(config, record)

    def input_norm(self) -> tuple[list[float], list[float]]:  # the source's statistics
        return _norm_for(self.source, self.data.in_channels)

    def build_model(self) -> nn.Module:
        cfg, d = self.config, self.data
        target = classify.build_classifier(self.source.model_name, d.num_classes, d.in_channels)
        if self.source.in_channels != d.in_channels:
            ft.set_input_channels(self.source.model, d.in_channels)
        ft.transfer_features(self.source.model, target)
        ft.freeze_stages(target, cfg.freeze)
        classify.check_input_fits(target, self.source.model_name, (d.in_channels, *d.image_size))
        return target

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        cfg = self.config
        return ft.param_groups(model, cfg.lr, head_lr_mult=cfg.head_lr_mult, lr_decay=cfg.lr_decay)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        ft.frozen_to_eval(getattr(model, "module", model), self.config.freeze)

    def run_record(self) -> dict[str, Any]:
        """The classification run's record, plus where its features came from: the source's
        description and, for a run directory or a weights file, the SHA-256 of the weights
        file read (``source_sha256``; the run holds its whole weights, so it never needs the
        source again: the hash says which one it was)."""
        record = {**super().run_record(), "source": self.source.description}
        digest = source_sha256(self.config.source)
        return {**record, "source_sha256": digest} if digest else record


def source_sha256(spec: str | None) -> str | None:
    """SHA-256 (hex) of the weights a SOURCE names: a run directory's newest
    ``model.safetensors`` or a weights file; None for zoo and torchvision names."""
    import hashlib

    from divekit.engine.checkpoint import CheckpointDir

    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        latest = CheckpointDir(path).latest()
        path = latest / "model.safetensors" if latest is not None else path
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def for_source(cfg: FinetuneConfig, source: Source) -> FinetuneConfig:
    """The config with the source's model, and its input size unless --resize says otherwise."""
    resize = cfg.resize
    if resize is None and source.image_size and source.image_size[0] == source.image_size[1]:
        resize = source.image_size[0]  # the size the features were trained at
    return dataclasses.replace(cfg, model=source.model_name, resize=resize)


def finetune(config: FinetuneConfig) -> TrainResult:
    """Fine-tune SOURCE on ``config.data``; writes a classification run directory."""
    if not config.source:
        raise DivekitError("finetune needs a SOURCE (run directory, weights file or ARCH:WEIGHTS)")
    source = resolve_source(config.source, config.arch)
    log.info("fine-tuning from %s", source.description)
    return train(FinetuneTask(for_source(config, source), source))


def finetune_config(typed: dict[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of what was typed (``source`` and the options), over the
    run's own options with ``--resume`` (:func:`~divekit.engine.record.resume_values`).
    Options of text fine-tuning are refused in one line naming them."""
    foreign = sorted(k for k in typed if k not in field_names(FinetuneConfig))
    if foreign:
        flags = ", ".join(flag_name(k) for k in foreign)
        raise DivekitError(f"{flags} apply to text fine-tuning (a BERT SOURCE such as minilm), "
                           f"not to image fine-tuning of {typed.get('source') or 'SOURCE'}")
    if typed.get("resume"):
        probe = config_from_dict(FinetuneConfig, typed)
        name = "" if typed.get("out") or not probe.source else for_source(
            probe, resolve_source(probe.source, probe.arch)).run_name
        typed = resume_values(FinetuneConfig, typed, name)
    config = config_from_dict(FinetuneConfig, typed)
    config.validate()
    return config
