"""The ``divekit`` command. A thin layer: parse, call one function, print.

Every module of this package (but those named ``_*``) adds commands: ``add_commands(sub,
parent)`` adds the parsers of the commands its ``COMMANDS`` tuple names, each with its
handler. They are found by :func:`cli_modules`, so a new module is all a new command needs;
``divekit COMMAND`` builds only the parser of the module that names COMMAND. ``train`` is built
here: its options depend on the MODEL (and ``--data``) named on the command line.

Errors a user can fix print as one line on stderr with a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from divekit.cli._common import show_library_notes
from divekit.config import add_config_options, typed_options


def cli_modules() -> list[ModuleType]:
    """The modules of :mod:`divekit.cli` that add commands, in the order ``divekit --help``
    lists them: by ``HELP_ORDER`` (0: before ``train``, 1: just after it; default 2), then by
    name. Their imports are light: each imports what its commands need when they run."""
    import pkgutil

    found = [importlib.import_module(f"{__name__}.{m.name}")
             for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda m: getattr(m, "HELP_ORDER", 2))


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


def _command(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The COMMAND of ``divekit [--debug] COMMAND ...`` and the MODEL of ``divekit train MODEL
    ...``, before the full parse."""
    rest = [a for a in argv if a != "--debug"] + [""]
    command = rest[0] if rest[0] and not rest[0].startswith("-") else None
    return command, rest[1] if command == "train" and rest[1][:1] not in ("", "-") else None


def build_parser(train_model: str | None = None, train_data: str | None = None,
                 command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command``, only what parsing that command needs (only
    the modules that list it in their ``COMMANDS`` add their parsers, and ``train``'s options,
    which import its task, are built only for ``train``), so ``divekit hw ...`` starts in a
    fraction of the time."""
    modules = cli_modules()
    owners = [m for m in modules if command in getattr(m, "COMMANDS", ())]
    lazy = command is not None and command != "train"
    if command == "train":
        modules = []
    parent = _parent()
    parser = OneLineParser(
        prog="divekit", parents=[parent],
        description="The Dive into Deep Learning course as a runnable, tested toolkit.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from divekit import __version__

    parser.add_argument("--version", action="version", version=f"divekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for module in [m for m in owners or modules if getattr(m, "HELP_ORDER", 2) == 0]:
        module.add_commands(sub, parent)
    p = sub.add_parser(
        "train", parents=[parent], help="train a model, writing a run directory",
        description="Train MODEL on --data. Every epoch writes metrics.csv, curves.png and a "
        "checkpoint into the run directory; --resume continues exactly where a run stopped.",
    )
    p.add_argument("model", help="model name (see `divekit models`); its task decides the options")
    if not lazy:
        _add_train_options(p, train_model, train_data)
    p.set_defaults(handler=cmd_train)
    for module in [m for m in owners or modules if getattr(m, "HELP_ORDER", 2) != 0]:
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
    from divekit.engine.task import list_tasks

    p.epilog = (f"tasks: {', '.join(list_tasks())}. A model's task decides its options: "
                "`divekit models --task TASK` lists its models, `divekit train MODEL --help` "
                "shows them.")


def _train_classes(model: str | None) -> tuple[type, type | None]:
    """The task config and the model-family config of ``divekit train MODEL``."""
    from divekit.engine.task import task_for
    from divekit.models import model_info

    if model is None:
        from divekit.tasks.classify import ClassifyConfig

        return ClassifyConfig, None
    return task_for(model).Config, model_info(model).config


# ------------------------------------------------------------------------------------ train
def train_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The task config and the launch config of ``divekit train``: what was typed, over the
    saved run's options with ``--resume``, over the model's recipe for the dataset (all three
    merged by :func:`~divekit.engine.run.make_config`)."""
    from divekit.config import field_names
    from divekit.engine.config import LaunchConfig
    from divekit.engine.run import make_config

    typed = typed_options(args)
    launching = field_names(LaunchConfig)
    launch = LaunchConfig(**{k: v for k, v in typed.items() if k in launching})
    launch.validate()
    config_cls, _ = _train_classes(args.model)
    return make_config(config_cls, {k: v for k, v in typed.items() if k not in launching}), launch


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
    from divekit.engine.task import task_for

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("DIVEKIT_DEBUG"))
    from divekit.engine.device import configure_allocator
    from divekit.errors import DivekitError

    configure_allocator()  # reuse freed tensor memory instead of page-faulting it back each step

    try:
        show_library_notes()
        command, model = _command(argv)
        parser = build_parser(model, _option_value(argv, "--data"), command=command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.handler(args)
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
