"""``divekit evaluate RUN`` and ``divekit predict RUN INPUT...``: the same two commands for
every task. The engine does the work (:func:`divekit.engine.run.evaluate`,
:func:`~divekit.engine.run.predict`); the run's task says how the results read
(:meth:`~divekit.engine.task.Task.format_metrics`, :meth:`~divekit.engine.task.Task.
format_prediction`) and which options ``predict`` takes (:attr:`~divekit.engine.task.Task.
PredictConfig`, gathered over every task by :func:`~divekit.engine.task.predict_options`)."""

from __future__ import annotations

import argparse

from divekit.cli._common import add_command

COMMANDS = ("evaluate", "predict")
HELP_ORDER = 1  # listed just after train in `divekit --help`
RUN_HELP = "a run directory written by `divekit train`"
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: auto)"
COMPILE_HELP = ("torch.compile the model (the first batches compile: seconds to minutes); "
                "default: {}")
QUANTIZE_HELP = ("int8: dynamic int8 quantization of the Linear/LSTM/GRU layers for CPU "
                 "inference (BERT, Transformer and RNN language-model runs; default: none)")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.config import add_config_options
    from divekit.engine.compile import default_families_text
    from divekit.engine.task import predict_options

    p = add_command(sub, parent, "evaluate", help="validation metrics of a run",
                    description="Load a run's newest checkpoint and evaluate it on the "
                    "validation split.")
    p.add_argument("run_dir", help=RUN_HELP)
    p.add_argument("--data-dir",
                   help="where the dataset's files are, if not where training found them")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", choices=["none", "flip"], default=argparse.SUPPRESS,
                   help="classifiers: test-time augmentation (default: the run's own setting)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help=QUANTIZE_HELP)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=COMPILE_HELP.format("the model family's, as for train (on for: "
                                            f"{default_families_text()})"))
    p.set_defaults(handler=cmd_evaluate)

    p = add_command(sub, parent, "predict", help="run a trained model on input files",
                    description="Run a trained model on inputs, by the run's task: a classifier "
                    "converts each image as training did (mode, size, normalisation) and prints "
                    "the top-k classes with probabilities.")
    p.add_argument("run_dir", help=RUN_HELP)
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files (any size or mode)")
    add_config_options(p, predict_options())  # every task's PredictConfig
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help=QUANTIZE_HELP)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help=COMPILE_HELP.format("off: for a few inputs compiling costs more than it "
                                            "saves"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(handler=cmd_predict)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from divekit.engine.config import data_dir_check
    from divekit.engine.record import read_record
    from divekit.engine.run import evaluate, load_task
    from divekit.errors import DivekitError

    record = read_record(args.run_dir)
    overrides = {k: getattr(args, k) for k in ("data_dir", "tta")
                 if getattr(args, k, None) is not None}
    ok, message = data_dir_check(str(record["config"].get("data")), args.data_dir)
    if not ok:  # the same check as `train --data-dir`
        raise DivekitError(message)
    metrics = evaluate(args.run_dir, device=args.device, quantize=args.quantize,
                       compile=args.compile, **overrides)
    print(load_task(args.run_dir, **overrides).format_metrics(metrics))


def cmd_predict(args: argparse.Namespace) -> None:
    from divekit.config import field_names, typed_options
    from divekit.engine.run import load_task, predict
    from divekit.engine.task import predict_options

    offered = field_names(predict_options())
    options = {k: v for k, v in typed_options(args).items() if k in offered}
    if args.run_dir.lower().endswith(".onnx"):  # an export: onnxruntime, no run (cli.export)
        if args.compile:
            from divekit.errors import DivekitError

            raise DivekitError("--compile applies to a run directory, not an ONNX file "
                               "(onnxruntime optimizes its own graph)")
        from divekit.cli.export import predict_onnx

        print("\n".join(predict_onnx(args.run_dir, args.inputs, options)))
        return
    task = load_task(args.run_dir)
    # engine.run.predict refuses an option the run's task does not take, before loading it
    for item in predict(args.run_dir, args.inputs, device=args.device, quantize=args.quantize,
                        compile=args.compile, **options):
        print(task.format_prediction(item))
