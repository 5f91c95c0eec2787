"""``divekit models``, ``divekit datasets`` and ``divekit summary``: what the zoo holds."""

from __future__ import annotations

import argparse

from divekit.cli._common import add_command
from divekit.errors import DivekitError

COMMANDS = ("models", "datasets", "summary")
HELP_ORDER = 0  # listed first in `divekit --help`, before train
SUMMARY_MAX_SIDE, SUMMARY_MAX_CLASSES = 4096, 100_000  # one zero image goes through the model


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = add_command(sub, parent, "models", help="list the model zoo",
                    description="Every registered model: parameters, default input, description.")
    p.add_argument("--task", help="only models of this task (classify, detect, language_model, ...)")
    p.add_argument("--comm-ratio", action="store_true",
                   help="rank the classifiers by training FLOPs per byte of gradient exchanged")
    p.set_defaults(handler=cmd_models)

    p = add_command(sub, parent, "datasets", help="list the datasets",
                    description="Every registered dataset, and whether it works offline.")
    p.set_defaults(handler=cmd_datasets)

    p = add_command(
        sub, parent, "summary", help="layer-by-layer output shapes, parameters, multiply-adds",
        description="Run one zero image through each top-level layer and print its output shape, "
        "parameters and multiply-adds (the course's `for layer in net: X = layer(X)`).",
    )
    p.add_argument("model", help="model name (see `divekit models`)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="C,H,W, each at most 4096 (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="output classes, 1 to 100000 (default: 10)")
    p.set_defaults(handler=cmd_summary)


def cmd_models(args: argparse.Namespace) -> None:
    from divekit.engine.task import load_tasks
    from divekit.models import create_model, list_models, model_info
    from divekit.models.summary import count_params

    load_tasks()  # a task that a package adds registers its models when it is imported
    task = getattr(args, "task", None)
    if task is not None and task not in (known := {model_info(n).task for n in list_models()}):
        from divekit.errors import UnknownNameError

        raise UnknownNameError("task", task, known)
    names = list_models(task)
    if getattr(args, "comm_ratio", False):
        from divekit.models.summary import comm_ratio_table, format_comm_ratio

        print(format_comm_ratio(comm_ratio_table(names)))
        return
    width = max([14, *map(len, names)])
    print(f"{'name':<{width}} {'params':>12}  {'input':<12} description")
    for name in names:
        info = model_info(name)
        if info.task == "classify":
            model = create_model(name, num_classes=10, in_channels=info.input_shape[0])
            params = f"{count_params(model):,}"
        else:
            params = "-"
        shape = "x".join(map(str, info.input_shape)) if info.input_shape else "tokens"
        print(f"{name:<{width}} {params:>12}  {shape:<12} {info.description}")


def cmd_datasets(args: argparse.Namespace) -> None:
    from divekit.data import dataset_info, list_datasets

    print(f"{'name':<16} {'task':<10} {'offline':<8} description")
    for name in list_datasets():
        info = dataset_info(name)
        print(f"{name:<16} {info.task:<10} {'yes' if info.offline else 'no':<8} {info.description}")


def cmd_summary(args: argparse.Namespace) -> None:
    from divekit.models import create_model, model_info
    from divekit.models.summary import format_table, layer_table, parse_shape

    info = model_info(args.model)
    if info.input_shape is None:
        raise DivekitError(f"summary works on image models; {args.model!r} is a {info.task} model")
    shape = parse_shape(args.input_shape) if args.input_shape else info.input_shape
    if max(shape) > SUMMARY_MAX_SIDE or not 1 <= args.num_classes <= SUMMARY_MAX_CLASSES:
        raise DivekitError(f"summary takes --input-shape sides up to {SUMMARY_MAX_SIDE} and "
                           f"--num-classes in 1..{SUMMARY_MAX_CLASSES}, got "
                           f"{','.join(map(str, shape))} and {args.num_classes}")
    model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0])
    rows = layer_table(model, shape)
    print(format_table(rows, title=f"{args.model} on input (1, {', '.join(map(str, shape))})"))
