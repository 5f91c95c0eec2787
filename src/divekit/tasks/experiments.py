"""The course's experiments that are more than one training run: fine-tuning against
training from scratch on a few images (``divekit transfer``), and a picture of what an
augmentation does (``divekit augment``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divekit.engine.run import train
from divekit.engine.trainer import Trainer
from divekit.errors import DivekitError
from divekit.io import atomic_write_text, check_output
from divekit.tasks import classify
from divekit.tasks.finetune import FinetuneConfig, FinetuneTask, Source


def _train(task: classify.ClassificationTask, run_dir: Path | None) -> tuple[nn.Module, float]:
    """Train ``task`` in ``run_dir`` (a full run directory) or in memory when None."""
    if run_dir is not None:
        task.config = dataclasses.replace(task.config, out=str(run_dir))
        result = train(task)
        return result.model, result.final["val_acc"]
    task.prepare()
    trainer = Trainer(task, task.config)
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
    if root is not None and root.exists() and not root.is_dir():
        raise DivekitError(f"--out {str(root)!r} exists and is not a folder")
    where = (lambda name: root / name) if root is not None else (lambda name: None)  # noqa: E731
    common = dict(model=model, data=data, seed=seed, device=device, quiet=quiet, threads=threads)
    src_cfg = classify.ClassifyConfig(**common, classes=source_classes, epochs=source_epochs,
                                      batch_size=64, lr=source_lr, out=None)
    src_task = classify.ClassificationTask(src_cfg)
    src_model, src_acc = _train(src_task, where("source"))
    d, facts = src_task.data, src_task.facts
    source = Source(model, src_model.cpu(), d.in_channels, tuple(facts["mean"]),
                    tuple(facts["std"]), d.image_size, f"classes {source_classes}")
    target = dict(common, classes=target_classes, shots=shots, epochs=epochs, batch_size=batch_size)
    scratch_cfg = classify.ClassifyConfig(**target, lr=lr * head_lr_mult)
    _, scratch_acc = _train(classify.ClassificationTask(scratch_cfg), where("scratch"))
    tuned_cfg = FinetuneConfig(**target, lr=lr, source=str(where("source") or "memory"),
                               freeze=freeze, head_lr_mult=head_lr_mult)
    _, tuned_acc = _train(FinetuneTask(tuned_cfg, source), where("finetune"))
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
MAX_AUGMENT_COPIES = 100  # pictures in one grid; more are unreadable anyway
def augment_grid(image: str | Path, spec: str = "standard", *, n: int = 8, out: str | Path = "grid.png",
                 seed: int = 0, max_side: int = 256, overwrite: bool = False) -> Path:
    """The original image and ``n`` augmented copies in one PNG grid (``out``: never ``image``
    itself; an existing file only with ``overwrite``)."""
    from PIL import Image

    from divekit.data.augment import Augment
    from divekit.data.vision import load_image_file, resize_images
    from divekit.viz import plot_image_grid

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_AUGMENT_COPIES:
        raise DivekitError(f"--n must be in [1, {MAX_AUGMENT_COPIES}], got {n!r}")
    aug = Augment(spec)
    check_output(out, [image], overwrite=overwrite)
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
