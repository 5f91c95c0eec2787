"""The ``divekit`` command. A thin layer: parse, call one task function, print.

Errors a user can fix print as one line on stderr with a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from divekit.config import add_config_options, typed_options

# the command-line modules of each area: extra commands (add_commands), and for the tasks they
# name (TASKS) how `divekit evaluate` and `predict` print their results
AREA_MODULES = ["divekit.cli.vision", "divekit.cli.detect", "divekit.cli.text",
                "divekit.cli.translate", "divekit.cli.dense", "divekit.cli.bert", "divekit.cli.bert_finetune",
                "divekit.cli.hw", "divekit.cli.book", "divekit.cli.dist", "divekit.cli.export",
                "divekit.cli.serve"]


def area_modules() -> list[ModuleType]:
    from importlib.util import find_spec

    return [importlib.import_module(m) for m in AREA_MODULES if find_spec(m) is not None]


def area_for(task: str) -> ModuleType | None:
    return next((m for m in area_modules() if task in getattr(m, "TASKS", ())), None)

EXAMPLES = """\
examples:
  divekit models                                  list the model zoo
  divekit summary vgg11 --input-shape 1,224,224   where the parameters and compute sit
  divekit train resnet18 --data digits --epochs 6 train on the embedded digits
  divekit train lenet --data mnist --data-dir ~/data/MNIST --epochs 10
  divekit evaluate runs/resnet18-digits           validation accuracy, per class
  divekit predict runs/resnet18-digits seven.png  top-k classes of image files
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to find help), not the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _parent() -> argparse.ArgumentParser:
    p = OneLineParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on errors")
    return p


def _option_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in ``argv``, before the full parse."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _train_model_name(argv: Sequence[str]) -> str | None:
    """The MODEL of ``divekit [--debug] train MODEL ...``, before the full parse."""
    rest = [a for a in argv if a != "--debug"]
    if len(rest) >= 2 and rest[0] == "train" and not rest[1].startswith("-"):
        return rest[1]
    return None


def _command(argv: Sequence[str]) -> str | None:
    """The COMMAND of ``divekit [--debug] COMMAND ...``, before the full parse."""
    rest = [a for a in argv if a != "--debug"]
    return rest[0] if rest and not rest[0].startswith("-") else None


def build_parser(train_model: str | None = None, train_data: str | None = None,
                 command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only what parsing that command needs (an area
    module that lists it in its ``COMMANDS`` is the only one imported, and ``train``'s options,
    which import every task, are built only for ``train``), so ``divekit hw ...`` starts in a
    fraction of the time."""
    modules = area_modules()
    owner = next((m for m in modules if command in getattr(m, "COMMANDS", ())), None)
    lazy = command is not None and command != "train"
    parent = _parent()
    parser = OneLineParser(
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
    p.add_argument("--comm-ratio", action="store_true",
                   help="rank the classifiers by training FLOPs per byte of gradient exchanged")

    sub.add_parser("datasets", parents=[parent], help="list the datasets",
                   description="Every registered dataset, and whether it works offline.")

    p = sub.add_parser(
        "summary", parents=[parent], help="layer-by-layer output shapes, parameters, multiply-adds",
        description="Run one zero image through each top-level layer and print its output shape, "
        "parameters and multiply-adds (the course's `for layer in net: X = layer(X)`).",
    )
    p.add_argument("model", help="model name (see `divekit models`)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="C,H,W, each at most 4096 (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="output classes, 1 to 100000 (default: 10)")

    p = sub.add_parser(
        "train", parents=[parent], help="train a model, writing a run directory",
        description="Train MODEL on --data. Every epoch writes metrics.csv, curves.png and a "
        "checkpoint into the run directory; --resume continues exactly where a run stopped.",
    )
    p.add_argument("model", help="model name (see `divekit models`); its task decides the options")
    if not lazy:
        _add_train_options(p, train_model, train_data)

    p = sub.add_parser("evaluate", parents=[parent], help="validation metrics of a run",
                       description="Load a run's newest checkpoint and evaluate it on the validation split.")
    p.add_argument("run_dir", help="a run directory written by `divekit train`")
    p.add_argument("--data-dir", help="where the dataset's files are, if not where training found them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--tta", choices=["none", "flip"], default=argparse.SUPPRESS,
                   help="classifiers: test-time augmentation (default: the run's own setting)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: dynamic int8 quantization of the Linear/LSTM/GRU layers for CPU "
                   "inference (BERT, Transformer and RNN language-model runs; default: none)")

    p = sub.add_parser("predict", parents=[parent], help="run a trained model on input files",
                       description="Run a trained model on inputs, by the run's task: a classifier "
                       "converts each image as training did (mode, size, normalisation) and prints "
                       "the top-k classes with probabilities.")
    p.add_argument("run_dir", help="a run directory written by `divekit train`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files (any size or mode)")
    p.add_argument("--top-k", type=int, default=argparse.SUPPRESS,
                   help="classifiers: classes to show per image (default: 3)")
    p.add_argument("-o", "--output", metavar="DIR", default=argparse.SUPPRESS,
                   help="folder for annotated pictures (detection: STEM.pred.png, segmentation: "
                   "STEM.seg.png; a second input with the same STEM gets STEM-2, the next -3; "
                   "an input file is never replaced)")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace pictures that already exist in -o (default: refuse)")
    p.add_argument("--threshold", type=float, default=argparse.SUPPRESS,
                   help="detection: minimum confidence to draw a box (default: 0.5)")
    p.add_argument("--nms-iou", type=float, default=argparse.SUPPRESS,
                   help="detection: IoU above which NMS drops the weaker box (default: 0.5)")
    p.add_argument("--max-answer-len", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="question answering: longest answer span, in tokens (default: the run's)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: dynamic int8 quantization of the Linear/LSTM/GRU layers for CPU "
                   "inference (BERT, Transformer and RNN language-model runs; default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    for module in [owner] if owner is not None else modules:
        if hasattr(module, "add_commands"):
            module.add_commands(sub, parent)
    return parser


def _add_train_options(p: argparse.ArgumentParser, model: str | None, data: str | None) -> None:
    """The options of MODEL's task, of its family's hyper-parameters, and of the launcher."""
    from divekit.engine.config import LaunchConfig

    config_cls, family = _train_classes(model)
    recipe: dict[str, Any] = {}
    if model is not None:
        from divekit.models import model_info

        data = data or config_cls(model=model).data
        recipe = model_info(model).recipe(data)
    add_config_options(p, config_cls, shown=recipe, shown_note=f", {model}'s recipe")
    if family is not None:
        add_config_options(p, family, group_title=f"{model} hyper-parameters")
    add_config_options(p, LaunchConfig, group_title="launching workers")


def _train_classes(model: str | None) -> tuple[type, type | None]:
    """The task config and the model-family config of ``divekit train MODEL``."""
    from divekit.models import model_info
    from divekit.tasks import task_for

    if model is None:
        from divekit.tasks.classify import ClassifyConfig

        return ClassifyConfig, None
    return task_for(model).Config, model_info(model).config


# ------------------------------------------------------------------------------------ commands
def cmd_models(args: argparse.Namespace) -> None:
    from divekit.models import create_model, list_models, model_info
    from divekit.models.summary import count_params

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


SUMMARY_MAX_SIDE, SUMMARY_MAX_CLASSES = 4096, 100_000  # one zero image goes through the model


def cmd_summary(args: argparse.Namespace) -> None:
    from divekit.models import create_model, model_info
    from divekit.models.summary import format_table, layer_table, parse_shape

    info = model_info(args.model)
    if info.input_shape is None:
        from divekit.errors import DivekitError

        raise DivekitError(f"summary works on image models; {args.model!r} is a {info.task} model")
    shape = parse_shape(args.input_shape) if args.input_shape else info.input_shape
    if max(shape) > SUMMARY_MAX_SIDE or not 1 <= args.num_classes <= SUMMARY_MAX_CLASSES:
        from divekit.errors import DivekitError

        raise DivekitError(f"summary takes --input-shape sides up to {SUMMARY_MAX_SIDE} and "
                           f"--num-classes in 1..{SUMMARY_MAX_CLASSES}, got "
                           f"{','.join(map(str, shape))} and {args.num_classes}")
    model = create_model(args.model, num_classes=args.num_classes, in_channels=shape[0])
    rows = layer_table(model, shape)
    print(format_table(rows, title=f"{args.model} on input (1, {', '.join(map(str, shape))})"))


def train_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The task config and the launch config of ``divekit train``: what was typed, over the
    saved run's options with ``--resume``, over the model's recipe for the dataset."""
    import dataclasses

    from divekit.config import known_values
    from divekit.engine.config import LaunchConfig
    from divekit.engine.record import resume_values
    from divekit.engine.run import make_config

    config_cls, _ = _train_classes(args.model)
    typed = typed_options(args)
    launch = LaunchConfig(**known_values(LaunchConfig, typed))
    launch.validate()
    typed = {k: v for k, v in typed.items() if k not in {f.name for f in dataclasses.fields(LaunchConfig)}}
    if typed.get("resume"):
        defaults = config_cls(model=args.model)
        name = f"{args.model}-{typed.get('data', defaults.data)}"
        typed = resume_values(config_cls, typed, name)
    return make_config(config_cls, typed), launch


def print_final(result: Any) -> None:
    final = result.final
    if final:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                          if k.startswith(("train_", "val_")) and isinstance(v, float))
        print(f"epoch {final['epoch']}: {shown}")
    print(f"run directory: {result.run_dir}")


def cmd_train(args: argparse.Namespace) -> None:
    from divekit.engine import launch
    from divekit.engine.run import train
    from divekit.tasks import task_for

    cfg, launch_cfg = train_config(args)
    if launch.should_spawn(launch_cfg):  # --nproc N: the same command on N processes (torchrun)
        launch.spawn(cfg, launch_cfg)
        return
    with launch.worker(cfg) as cfg:  # under torchrun: process group and one run directory
        result = train(task_for(cfg.model)(cfg))
        if not launch.is_main_process():
            return
    print_final(result)
    print(f"curves: {result.run_dir / 'curves.png'}")


def _format_metrics(task: str, metrics: dict[str, Any]) -> str:
    module = area_for(task)
    if module is not None and hasattr(module, "format_metrics"):
        return module.format_metrics(metrics)
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from divekit.engine.config import data_dir_check
    from divekit.engine.record import read_record
    from divekit.engine.run import evaluate
    from divekit.errors import DivekitError

    record = read_record(args.run_dir)
    task = str(record.get("task", "classify"))
    overrides = {k: getattr(args, k) for k in ("data_dir", "tta") if getattr(args, k, None) is not None}
    ok, message = data_dir_check(str(record["config"].get("data")), args.data_dir)
    if not ok:  # the same check as `train --data-dir`
        raise DivekitError(message)
    print(_format_metrics(task, evaluate(args.run_dir, device=args.device,
                                         quantize=args.quantize, **overrides)))


def cmd_predict(args: argparse.Namespace) -> None:
    from divekit.engine.record import read_record
    from divekit.engine.run import predict

    offered = ("top_k", "output", "overwrite", "threshold", "nms_iou", "max_answer_len")
    options = {k: v for k, v in vars(args).items() if k in offered}
    if args.run_dir.lower().endswith(".onnx"):  # an export: onnxruntime, no run (cli.export)
        from divekit.cli.export import predict_onnx

        print("\n".join(predict_onnx(args.run_dir, args.inputs, options)))
        return
    task = str(read_record(args.run_dir).get("task", "classify"))
    module = area_for(task)
    # engine.run.predict refuses an option the run's task does not take, before loading it
    results = predict(args.run_dir, args.inputs, device=args.device,
                      quantize=getattr(args, "quantize", "none"), **options)
    for item in results:
        print(module.format_prediction(item) if module is not None else item)


COMMANDS = {
    "models": cmd_models,
    "datasets": cmd_datasets,
    "summary": cmd_summary,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
}


def _show_library_notes() -> None:
    """The library logs what a user should know (``--batch-size auto: 100 (...)``); print it."""
    logger = logging.getLogger("divekit")
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Notes(logging.Handler):
    """Library log lines on the standard output as it is now (rank 0 only)."""

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(record.getMessage(), file=sys.stderr if record.levelno >= logging.WARNING
                  else sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DIVEKIT_DEBUG"))
    from divekit.engine.device import configure_allocator
    from divekit.errors import DivekitError

    configure_allocator()  # reuse freed tensor memory instead of page-faulting it back each step

    try:
        _show_library_notes()
        parser = build_parser(_train_model_name(argv), _option_value(argv, "--data"),
                              command=_command(argv))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        handler(args)
    except DivekitError as e:
        if debug:
            raise
        if str(e) and os.environ.get("RANK", "0") == "0":  # one message, not one per worker
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept (use --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `divekit models | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0
