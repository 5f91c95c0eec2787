"""Fine-tuning and the data-centric commands: ``divekit finetune``, ``divekit transfer``,
``divekit augment``.

``finetune(config)`` copies the feature extractor of a SOURCE, gives it a fresh head for the
target's classes and trains it through the classification task (so ``divekit evaluate`` and
``predict`` work on the run). SOURCE is one of:

* a divekit run directory (any zoo classifier);
* a torchvision weights file (a ``.pth`` state dict, loaded with ``weights_only=True`` so nothing
  in it runs): the architecture comes from ``--arch`` or the file name (``resnet18-f37072fd.pth``)
  and is built with torchvision's own builder, split into ``features`` stages and ``head``
  (:func:`divekit.engine.finetune.torchvision_classifier`). We do not map torchvision's names
  onto our zoo: the zoo follows the course, whose blocks differ (e.g. its ResNet shortcut conv);
* ``ARCH:WEIGHTS`` such as ``resnet18:IMAGENET1K_V1``: torchvision's published weights, which
  are downloaded once (never by the tests).

Grayscale targets use RGB sources by summing the first convolution's filters over the colour
channels; inputs are standardised with the source's statistics (ImageNet's for torchvision).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divekit.engine import finetune as ft
from divekit.io import atomic_write_text
from divekit.engine.trainer import option
from divekit.errors import DivekitError
from divekit.tasks import classify
from divekit.tasks.common import (
    TrainResult,
    choose_run_dir,
    config_from_dict,
    latest_weights,
    load_run_config,
)


@dataclass
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
def _from_run(path: Path, arch: str | None) -> Source:
    record = load_run_config(path)
    if record.get("task") != "classify":
        raise DivekitError(f"SOURCE {path} is a {record.get('task')!r} run, not a classifier")
    name = record["config"]["model"]
    if arch is not None and arch not in (name, name.removeprefix(ft.TORCHVISION_PREFIX)):
        raise DivekitError(f"SOURCE {path} trained {name!r}; --arch {arch!r} does not match")
    model = classify.build_classifier(name, len(record["classes"]), record["in_channels"])
    weights = latest_weights(path)
    from safetensors.torch import load_file

    ft.load_matching(model, load_file(str(weights)), f"SOURCE {weights} ({len(record['classes'])} classes)")
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
    state = enum[tag].get_state_dict(progress=True)  # downloads once into torch's hub cache
    return _from_state(arch, state, f"torchvision {spec}")


def resolve_source(spec: str, arch: str | None = None) -> Source:
    """A run directory, a weights file, or ``ARCH:WEIGHTS`` → :class:`Source`."""
    path = Path(spec)
    if path.is_dir():
        return _from_run(path, arch)
    if path.is_file():
        arch = (arch or _guess_arch(path)).removeprefix(ft.TORCHVISION_PREFIX)
        return _from_state(arch, ft.load_state_file(path), f"weights file {path} ({arch})")
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
    """Classification whose model starts from the source's features with a fresh head."""

    def __init__(self, cfg: FinetuneConfig, source: Source):
        self.source = source
        data = classify.load_data(cfg)
        super().__init__(cfg, data=data, norm=_norm_for(source, data.in_channels))

    def model(self) -> nn.Module:
        cfg, d = self.cfg, self.data
        target = classify.build_classifier(self.source.model_name, d.num_classes, d.in_channels)
        if self.source.in_channels != d.in_channels:
            ft.set_input_channels(self.source.model, d.in_channels)
        ft.transfer_features(self.source.model, target)
        ft.freeze_stages(target, cfg.freeze)  # type: ignore[attr-defined]
        classify.check_input_fits(target, self.source.model_name, (d.in_channels, *d.image_size))
        return target

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        cfg = self.cfg
        return ft.param_groups(model, cfg.lr, head_lr_mult=cfg.head_lr_mult,  # type: ignore[attr-defined]
                               lr_decay=cfg.lr_decay)  # type: ignore[attr-defined]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        ft.frozen_to_eval(getattr(model, "module", model), self.cfg.freeze)  # type: ignore[attr-defined]


def finetune(config: FinetuneConfig | dict[str, Any]) -> TrainResult:
    """Fine-tune SOURCE on ``config.data``; writes a classification run directory."""
    cfg = config if isinstance(config, FinetuneConfig) else config_from_dict(FinetuneConfig, config)
    if not cfg.source:
        raise DivekitError("finetune needs a SOURCE (run directory, weights file or ARCH:WEIGHTS)")
    source = resolve_source(cfg.source, cfg.arch)
    cfg.model = source.model_name
    if cfg.resize is None and source.image_size and source.image_size[0] == source.image_size[1]:
        cfg.resize = source.image_size[0]  # the size the features were trained at
    cfg.validate()
    short = cfg.model.removeprefix(ft.TORCHVISION_PREFIX)
    run_dir = choose_run_dir(cfg.out, f"{short}-{cfg.data}-finetune", cfg.resume)
    task = FinetuneTask(cfg, source)
    if not cfg.quiet:
        print(f"fine-tuning from {source.description}")
    return classify.fit(task, run_dir, {"source": source.description})


# ----------------------------------------------------------------------------- the experiment
def _train(task: classify.ClassificationTask, run_dir: Path | None,
           extra: dict[str, Any] | None = None) -> tuple[nn.Module, float]:
    """Train ``task`` in ``run_dir`` (a full run directory) or in memory when None."""
    if run_dir is not None:
        choose_run_dir(str(run_dir), run_dir.name, resume=False)  # never overwrite a run
        result = classify.fit(task, run_dir, extra)
        return result.model, result.final["val_acc"]
    from divekit.engine.trainer import Trainer

    classify.resolve_batch_size(task)
    trainer = Trainer(task, task.cfg)
    return trainer.model, trainer.fit()[-1]["val_acc"]


def transfer_experiment(
    *, model: str = "lenet_bn", data: str = "digits", source_classes: str = "0-4",
    target_classes: str = "5-9", shots: int = 3, source_epochs: int = 10, epochs: int = 20,
    lr: float = 0.01, source_lr: float = 0.05, batch_size: int = 10, freeze: int = 0,
    head_lr_mult: float = 10.0, seed: int = 0, out: str | Path | None = "runs/transfer",
    device: str = "cpu", quiet: bool = True, threads: int | None = None,
) -> dict[str, Any]:
    """Pretrain on ``source_classes``, then train a ``shots``-per-class split of
    ``target_classes`` twice with the same budget (epochs, batch size, seed): once fine-tuned
    from the source, once from scratch. As in the course, the fine-tuned copy learns at ``lr``
    (its new head at ``head_lr_mult × lr``) and the scratch network at ``head_lr_mult × lr``
    throughout. ``out=None`` trains in memory (no run directories). Returns both validation
    accuracies and the table for the README."""
    root = Path(out) if out is not None else None
    where = (lambda name: root / name) if root is not None else (lambda name: None)  # noqa: E731
    common = dict(model=model, data=data, seed=seed, device=device, quiet=quiet, threads=threads)
    src_cfg = classify.ClassifyConfig(**common, classes=source_classes, epochs=source_epochs,
                                      batch_size=64, lr=source_lr, out=None)
    src_task = classify.ClassificationTask(src_cfg)
    src_model, src_acc = _train(src_task, where("source"))
    d = src_task.data
    source = Source(model, src_model.cpu(), d.in_channels, tuple(src_task.mean.tolist()),
                    tuple(src_task.std.tolist()), d.image_size, f"classes {source_classes}")
    target = dict(common, classes=target_classes, shots=shots, epochs=epochs, batch_size=batch_size)
    scratch_cfg = classify.ClassifyConfig(**target, lr=lr * head_lr_mult)
    _, scratch_acc = _train(classify.ClassificationTask(scratch_cfg), where("scratch"))
    tuned_cfg = FinetuneConfig(**target, lr=lr, source=str(where("source") or "memory"),
                               freeze=freeze, head_lr_mult=head_lr_mult)
    _, tuned_acc = _train(FinetuneTask(tuned_cfg, source), where("finetune"), {"source": source.description})
    result = {
        "source_val_acc": src_acc, "scratch_val_acc": scratch_acc, "finetune_val_acc": tuned_acc,
        "shots": shots, "epochs": epochs, "model": model, "data": data, "seed": seed, "lr": lr,
        "head_lr_mult": head_lr_mult,
    }
    result["table"] = transfer_table(result, source_classes, target_classes)
    if root is not None:
        atomic_write_text(root / "transfer.md", result["table"] + "\n")
        atomic_write_text(root / "transfer.json", json.dumps(result, indent=2) + "\n")
    return result


def transfer_table(r: dict[str, Any], source_classes: str, target_classes: str) -> str:
    return "\n".join([
        f"| {r['model']} on {r['data']} {target_classes}, {r['shots']} images per class, "
        f"{r['epochs']} epochs, seed {r['seed']} | val accuracy |",
        "| --- | ---: |",
        f"| from scratch (lr {r['lr'] * r['head_lr_mult']:g}) | {r['scratch_val_acc']:.3f} |",
        f"| fine-tuned from classes {source_classes} (lr {r['lr']:g}, head "
        f"{r['lr'] * r['head_lr_mult']:g}; source val acc {r['source_val_acc']:.3f}) "
        f"| {r['finetune_val_acc']:.3f} |",
    ])


# ----------------------------------------------------------------------------- augment grid
def augment_grid(image: str | Path, spec: str = "standard", *, n: int = 8, out: str | Path = "grid.png",
                 seed: int = 0, max_side: int = 256) -> Path:
    """The original image and ``n`` augmented copies in one PNG grid."""
    from PIL import Image

    from divekit.data.augment import Augment
    from divekit.data.vision import load_image_file, resize_images
    from divekit.viz import plot_image_grid

    if n < 1:
        raise DivekitError(f"--n must be at least 1, got {n}")
    aug = Augment(spec)
    try:
        with Image.open(image) as im:
            channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except OSError as e:
        raise DivekitError(f"cannot read image {str(image)!r}: {e}") from None
    x = load_image_file(image, channels)
    h, w = x.shape[-2:]
    if max(h, w) > max_side:
        x = resize_images(x, (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w)))))
    torch.manual_seed(seed)
    images = [x] + [aug(x) for _ in range(n)]
    titles = ["original"] + [f"{spec} #{i + 1}" for i in range(n)]
    return plot_image_grid(images, out, titles, ncols=3 if n + 1 <= 9 else 4)


# ----------------------------------------------------------------------------- the CLI
def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.cli import add_config_options
    from divekit.data.augment import describe_ops

    p = sub.add_parser(
        "augment", parents=[parent], help="draw an image and N augmented copies in a grid",
        description="Apply a training augmentation N times to IMAGE and save the grid. "
        + describe_ops(),
    )
    p.add_argument("image", help="an image file of any size or mode")
    p.add_argument("--preset", default="standard", metavar="SPEC",
                   help="a preset (none, flip, standard, strong) or a list such as hflip,crop:0.5-1,jitter:0.5 (default: standard)")
    p.add_argument("--n", type=int, default=8, help="augmented copies (default: 8)")
    p.add_argument("-o", "--out", default="grid.png", help="output PNG (default: grid.png)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(handler=lambda a: print(augment_grid(a.image, a.preset, n=a.n, out=a.out, seed=a.seed)))

    p = sub.add_parser(
        "finetune", parents=[parent], help="fine-tune a pretrained classifier on a dataset",
        description="Copy SOURCE's feature extractor, give it a fresh head for --data's classes, "
        "and train: the head at --head-lr-mult × --lr, the copied stages at --lr (times "
        "--lr-decay per stage down), the first --freeze stages not at all. SOURCE: a divekit run "
        "directory, a torchvision weights file (.pth state dict; --arch or its file name says the "
        "architecture), or ARCH:WEIGHTS such as resnet18:IMAGENET1K_V1 (downloads once).",
    )
    p.add_argument("source", help="run directory, torchvision weights file, or ARCH:WEIGHTS")
    add_config_options(p, FinetuneConfig)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser(
        "transfer", parents=[parent], help="the offline transfer experiment: fine-tuning vs scratch",
        description="Pretrain on some classes of a dataset, then learn the other classes from a "
        "few images each, fine-tuned and from scratch with the same budget; prints the table.",
    )
    p.add_argument("--model", default="lenet_bn", help="zoo classifier (default: lenet_bn)")
    p.add_argument("--data", default="digits", help="dataset (default: digits)")
    p.add_argument("--source-classes", default="0-4", help="pretraining classes (default: 0-4)")
    p.add_argument("--target-classes", default="5-9", help="target classes (default: 5-9)")
    p.add_argument("--shots", type=int, default=3, help="target images per class (default: 3)")
    p.add_argument("--source-epochs", type=int, default=10, help="pretraining epochs (default: 10)")
    p.add_argument("--epochs", type=int, default=20, help="target epochs, both arms (default: 20)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning base learning rate; the "
                   "head and the scratch network get 10 × it (default: 0.01)")
    p.add_argument("--freeze", type=int, default=0, help="stages frozen when fine-tuning (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda (default: cpu)")
    p.add_argument("--out", default="runs/transfer", help="folder for the three runs (default: runs/transfer)")
    p.set_defaults(handler=_cmd_transfer)


def _cmd_finetune(args: argparse.Namespace) -> None:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "handler")}
    if given.get("resume") and given.get("out"):
        saved = load_run_config(given["out"])["config"]
        given = {**saved, **given}
    result = finetune(config_from_dict(FinetuneConfig, given))
    final = result.final
    if final:
        print(f"epoch {final['epoch']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in final.items() if k.startswith(("train_", "val_"))))
    print(f"run directory: {result.run_dir}")


def _cmd_transfer(args: argparse.Namespace) -> None:
    result = transfer_experiment(
        model=args.model, data=args.data, source_classes=args.source_classes,
        target_classes=args.target_classes, shots=args.shots, source_epochs=args.source_epochs,
        epochs=args.epochs, lr=args.lr, freeze=args.freeze, seed=args.seed, out=args.out,
        device=args.device, quiet=False,
    )
    print(result["table"])
