"""The ``divekit`` command. A thin layer: parse, call one task function, print.

Errors a user can fix print as one line on stderr with a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

EXAMPLES = """\
examples:
  divekit models                                  list the model zoo
  divekit summary vgg11 --input-shape 1,224,224   where the parameters and compute sit
  divekit train resnet18 --data digits --epochs 6 train on the embedded digits
  divekit train lenet --data mnist --data-dir ~/data/MNIST --epochs 10
  divekit evaluate runs/resnet18-digits           validation accuracy, per class
  divekit predict runs/resnet18-digits seven.png  top-k classes of image files
"""


def _parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on errors")
    return p


def _train_defaults() -> dict[str, Any]:
    from divekit.tasks.classify import ClassifyConfig

    return {f.name: f.default for f in dataclasses.fields(ClassifyConfig)}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Options default to SUPPRESS so that --resume can tell what was given explicitly."""
    d = _train_defaults()
    S = argparse.SUPPRESS

    def opt(*flags: str, help: str, **kw: Any) -> None:
        dest = flags[0].lstrip("-").replace("-", "_")
        default = d.get(dest)
        shown = "" if kw.get("action") == "store_true" else f" (default: {default})"
        p.add_argument(*flags, default=S, help=help + shown, **kw)

    g = p.add_argument_group("data")
    opt("--data", help="dataset name (see `divekit datasets`)", metavar="NAME")
    opt("--data-dir", help="folder with the dataset's files, when you already have them", metavar="DIR")
    opt("--download", action="store_true", help="download missing files (checksum-verified)")
    opt("--resize", type=int, help="resize images to N×N once, before training", metavar="N")
    opt("--limit", type=int, help="use only the first N training samples (quick runs)", metavar="N")
    opt("--workers", type=int, help="data-loading processes for per-sample transforms", metavar="N")
    g = p.add_argument_group("optimisation")
    opt("--epochs", type=int, help="total epochs (with --resume: the total to reach)")
    opt("--batch-size", type=int, help="minibatch size")
    opt("--lr", type=float, help="learning rate")
    opt("--optimizer", choices=["sgd", "adam", "adamw"], help="optimizer")
    opt("--momentum", type=float, help="SGD momentum")
    opt("--weight-decay", type=float, help="L2 weight decay")
    opt("--scheduler", choices=["none", "cosine", "step", "onecycle"], help="learning-rate schedule")
    opt("--warmup-epochs", type=float, help="linear learning-rate warm-up")
    opt("--grad-clip", type=float, help="clip the gradients' global norm to this value")
    opt("--label-smoothing", type=float, help="cross-entropy label smoothing")
    g = p.add_argument_group("hardware and output")
    opt("--device", help="auto, cpu, cuda or cuda:N")
    opt("--amp", action="store_true", help="bfloat16 mixed precision (autocast)")
    opt("--channels-last", action="store_true", help="channels_last memory format for convolutions")
    opt("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    opt("--seed", type=int, help="random seed (data split, shuffling, initialisation)")
    opt("--out", help="run directory (default: runs/MODEL-DATA, numbered if it exists)", metavar="DIR")
    opt("--resume", action="store_true", help="continue the run in --out (or the newest runs/MODEL-DATA*)")
    opt("--tensorboard", action="store_true", help="also write TensorBoard event files")
    opt("--quiet", action="store_true", help="no progress bars")
    del g


def build_parser() -> argparse.ArgumentParser:
    parent = _parent()
    parser = argparse.ArgumentParser(
        prog="divekit", parents=[parent],
        description="The Dive into Deep Learning course as a runnable, tested toolkit.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from divekit import __version__

    parser.add_argument("--version", action="version", version=f"divekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", parents=[parent], help="list the model zoo",
                       description="Every registered model: parameters, default input, description.")
    p.add_argument("--task", help="only models of this task (classify, detect, language_model, ...)")

    sub.add_parser("datasets", parents=[parent], help="list the datasets",
                   description="Every registered dataset, and whether it works offline.")

    p = sub.add_parser(
        "summary", parents=[parent], help="layer-by-layer output shapes, parameters, multiply-adds",
        description="Run one zero image through each top-level layer and print its output shape, "
        "parameters and multiply-adds (the course's `for layer in net: X = layer(X)`).",
    )
    p.add_argument("model", help="model name (see `divekit models`)")
    p.add_argument("--input-shape", help="C,H,W (default: the model's own)", metavar="C,H,W")
    p.add_argument("--num-classes", type=int, default=10, help="output classes (default: 10)")

    p = sub.add_parser(
        "train", parents=[parent], help="train a model, writing a run directory",
        description="Train MODEL on --data. Every epoch writes metrics.csv, curves.png and a "
        "checkpoint into the run directory; --resume continues exactly where a run stopped.",
    )
    p.add_argument("model", help="model name (see `divekit models`)")
    _add_train_options(p)

    p = sub.add_parser("evaluate", parents=[parent], help="validation metrics of a run",
                       description="Load a run's newest checkpoint and evaluate it on the validation split.")
    p.add_argument("run_dir", help="a run directory written by `divekit train`")
    p.add_argument("--data-dir", help="where the dataset's files are, if not where training found them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    p = sub.add_parser("predict", parents=[parent], help="classify image files with a trained run",
                       description="Convert each image as training did (mode, size, normalisation) "
                       "and print the top-k classes with probabilities.")
    p.add_argument("run_dir", help="a run directory written by `divekit train`")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; any size or mode)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    return parser


# ------------------------------------------------------------------------------------ commands
def cmd_models(args: argparse.Namespace) -> None:
    from divekit.models import create_model, list_models, model_info
    from divekit.models.summary import count_params

    names = list_models(getattr(args, "task", None))
    print(f"{'name':<14} {'params':>12}  {'input':<12} description")
    for name in names:
        info = model_info(name)
        if info.task == "classify":
            model = create_model(name, num_classes=10, in_channels=info.input_shape[0])
            params = f"{count_params(model):,}"
        else:
            params = "-"
        shape = "x".join(map(str, info.input_shape)) if info.input_shape else "tokens"
        print(f"{name:<14} {params:>12}  {shape:<12} {info.description}")


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
        from divekit.errors import DivekitError

        raise DivekitError(f"summary works on image models; {args.model!r} is a {info.task} model")
    shape = parse_shape(args.input_shape) if args.input_shape else info.input_shape
    model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0])
    rows = layer_table(model, shape)
    print(format_table(rows, title=f"{args.model} on input (1, {', '.join(map(str, shape))})"))


def _train_config(args: argparse.Namespace) -> Any:
    from divekit.tasks.classify import ClassifyConfig
    from divekit.tasks.common import choose_run_dir, config_from_dict, load_run_config

    given = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
    if given.get("resume"):
        model, data = given["model"], given.get("data", ClassifyConfig.data)
        run_dir = choose_run_dir(given.get("out"), f"{model}-{data}", resume=True)
        saved = load_run_config(run_dir)["config"]
        if saved.get("model") != model:
            from divekit.errors import DivekitError

            raise DivekitError(f"{run_dir} trained {saved.get('model')!r}, not {model!r}")
        merged = {**saved, **given, "out": str(run_dir), "resume": True}
        return config_from_dict(ClassifyConfig, merged)
    return config_from_dict(ClassifyConfig, given)


def cmd_train(args: argparse.Namespace) -> None:
    from divekit.tasks import classify

    cfg = _train_config(args)
    result = classify.train(cfg)
    final = result.final
    if final:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in final.items() if k.startswith(("train_", "val_"))
        )
        print(f"epoch {final['epoch']}: {shown}")
    print(f"run directory: {result.run_dir}")
    print(f"curves: {result.run_dir / 'curves.png'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from divekit.tasks import classify

    metrics = classify.evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
    per_class = metrics.pop("per_class_acc", {})
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if per_class:
        print("per-class accuracy: " + ", ".join(f"{c}: {a:.3f}" for c, a in per_class.items()))


def cmd_predict(args: argparse.Namespace) -> None:
    from divekit.tasks import classify

    for item in classify.predict(args.run_dir, args.images, top_k=args.top_k, device=args.device):
        shown = ", ".join(f"{c} {p:.3f}" for c, p in item["predictions"])
        print(f"{item['image']}: {shown}")


COMMANDS = {
    "models": cmd_models,
    "datasets": cmd_datasets,
    "summary": cmd_summary,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or bool(os.environ.get("DIVEKIT_DEBUG"))
    if args.command is None:
        parser.print_help()
        return 2
    from divekit.errors import DivekitError

    try:
        COMMANDS[args.command](args)
    except DivekitError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept (use --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0
