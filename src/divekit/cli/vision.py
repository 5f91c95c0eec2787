"""Image classification on the command line: how `evaluate` and `predict` print a
classifier's results, and the commands `divekit augment`, `finetune` and `transfer`."""

from __future__ import annotations

import argparse
from typing import Any

from divekit.config import add_config_options, typed_options

TASKS = ("classify",)


def format_metrics(metrics: dict[str, Any]) -> str:
    per_class = metrics.get("per_class_acc") or {}
    lines = [", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))]
    if per_class:
        lines.append("per-class accuracy: " + ", ".join(f"{c}: {a:.3f}" for c, a in per_class.items()))
    if metrics.get("confusion_matrix_png"):
        lines.append(f"confusion matrix: {metrics['confusion_matrix_png']}")
    return "\n".join(lines)


def format_prediction(item: dict[str, Any]) -> str:
    shown = ", ".join(f"{c} {p:.3f}" for c, p in item["predictions"])
    return f"{item['image']}: {shown}"


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.cli import bert_finetune as text_finetune
    from divekit.config import field_names
    from divekit.data.augment import describe_ops
    from divekit.tasks.experiments import MAX_AUGMENT_COPIES
    from divekit.tasks.finetune import FinetuneConfig

    p = sub.add_parser(
        "augment", parents=[parent], help="draw an image and N augmented copies in a grid",
        description="Apply a training augmentation N times to IMAGE and save the grid. "
        + describe_ops(),
    )
    p.add_argument("image", help="an image file of any size or mode")
    p.add_argument("--preset", default="standard", metavar="SPEC",
                   help="a preset (none, flip, standard, strong) or a list such as "
                   "hflip,crop:0.5-1,jitter:0.5 (default: standard)")
    p.add_argument("--n", type=int, default=8,
                   help=f"augmented copies, 1 to {MAX_AUGMENT_COPIES} (default: 8)")
    p.add_argument("-o", "--out", default="grid.png",
                   help="output PNG, never IMAGE itself (default: grid.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(handler=_cmd_augment)

    p = sub.add_parser(
        "finetune", parents=[parent], help="fine-tune a pretrained classifier on a dataset",
        description="Copy SOURCE's feature extractor, give it a fresh head for --data's classes, "
        "and train: the head at --head-lr-mult × --lr, the copied stages at --lr (times "
        "--lr-decay per stage down), the first --freeze stages not at all. SOURCE: a divekit run "
        "directory, a torchvision weights file (.pth state dict; --arch or its file name says the "
        "architecture), or ARCH:WEIGHTS such as resnet18:IMAGENET1K_V1 (downloads once). "
        "With --task, SOURCE is a BERT and the text path runs (see below).",
        epilog=text_finetune.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="run directory, torchvision weights file, or ARCH:WEIGHTS; "
                   "with --task: a BERT checkpoint directory, pretraining run, or minilm")
    add_config_options(p, FinetuneConfig)
    text_finetune.add_text_options(p, skip=field_names(FinetuneConfig))
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


def _cmd_augment(args: argparse.Namespace) -> None:
    from divekit.tasks.experiments import augment_grid

    print(augment_grid(args.image, args.preset, n=args.n, out=args.out, seed=args.seed,
                       overwrite=args.overwrite))


def _cmd_finetune(args: argparse.Namespace) -> None:
    from divekit.cli import bert_finetune as text_finetune

    if getattr(args, "task", None) is not None:  # --task classify|pair|tag|qa: a BERT
        text_finetune.cmd_finetune_text(args)
        return
    from divekit.cli import print_final
    from divekit.config import config_from_dict
    from divekit.engine.record import read_record, saved_options
    from divekit.tasks.finetune import FinetuneConfig, finetune

    given = typed_options(args)
    if given.get("resume") and given.get("out"):
        saved = read_record(given["out"])["config"]
        given = {**saved_options(FinetuneConfig, saved, given, given["out"]), **given}
    cfg = config_from_dict(FinetuneConfig, given)
    cfg.validate()
    print_final(finetune(cfg))


def _cmd_transfer(args: argparse.Namespace) -> None:
    from divekit.tasks.experiments import transfer_experiment

    result = transfer_experiment(
        model=args.model, data=args.data, source_classes=args.source_classes,
        target_classes=args.target_classes, shots=args.shots, source_epochs=args.source_epochs,
        epochs=args.epochs, lr=args.lr, freeze=args.freeze, seed=args.seed, out=args.out,
        device=args.device, quiet=False,
    )
    print(result["table"])
