"""Image classification on the command line: the commands `divekit augment` and `transfer`
(`finetune` is :mod:`divekit.cli.finetune`'s; how `evaluate` and `predict` print a
classifier's results is the task's: :class:`~divekit.tasks.classify.ClassificationTask`)."""

from __future__ import annotations

import argparse

COMMANDS = ("augment", "transfer")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.data.augment import describe_ops
    from divekit.tasks.experiments import MAX_AUGMENT_COPIES

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


def _cmd_transfer(args: argparse.Namespace) -> None:
    from divekit.tasks.experiments import transfer_experiment

    result = transfer_experiment(
        model=args.model, data=args.data, source_classes=args.source_classes,
        target_classes=args.target_classes, shots=args.shots, source_epochs=args.source_epochs,
        epochs=args.epochs, lr=args.lr, freeze=args.freeze, seed=args.seed, out=args.out,
        device=args.device, quiet=False,
    )
    print(result["table"])
