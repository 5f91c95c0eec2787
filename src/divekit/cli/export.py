"""``divekit export``: a run as ONNX, ``torch.export``, Hugging Face or torchvision files; and
``divekit predict FILE.onnx``, the exported model run by ONNX Runtime."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from divekit.cli._common import add_command

COMMANDS = ("export",)
DESCRIPTION = (
    "Write RUN's newest weights as: onnx (torch.onnx.export, the dynamo exporter where it "
    "works, else TorchScript), pt2 (torch.export.save), hf (a BERT run in Hugging Face's layout) "
    "or torchvision (a classifier's state dict under torchvision's names). The preprocessing "
    "(input size, mean and std, classes, vocabulary) travels in the ONNX metadata and in "
    "FILE.json beside the export. A detector is exported up to its raw outputs (its decoding "
    "and NMS stay in Python), a torchvision R-CNN with its NMS in the graph, one image at a "
    "time. `divekit predict FILE.onnx INPUT...` runs an ONNX export with onnxruntime.")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.export import FORMATS
    from divekit.export.graph import EXPORTERS

    p = add_command(sub, parent, "export", description=DESCRIPTION,
                    help="write a run as ONNX, .pt2, Hugging Face or torchvision")
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by `divekit train`")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="the file (hf: the folder) to write (default: RUN/export/model.onnx, "
                   "model.pt2, hf/ or torchvision.pth); never one of the run's files")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="onnx: the ONNX opset version (default: the exporter's)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="onnx, pt2: any batch size (default: batches of 1)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="onnx: dynamo, torchscript, or auto (dynamo, else torchscript)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from divekit.export import export_run

    result = export_run(args.run_dir, args.format, args.output, opset=args.opset,
                        dynamic_batch=args.dynamic_batch, overwrite=args.overwrite,
                        exporter=args.exporter)
    print(f"wrote {result.path} ({args.format}, {result.exporter})")
    if result.meta_path is not None:
        print(f"preprocessing: {result.meta_path}")


def is_onnx_file(path: str) -> bool:
    return str(path).lower().endswith(".onnx")


def predict_onnx(path: str, inputs: list[str], options: dict[str, Any]) -> list[str]:
    """``divekit predict FILE.onnx INPUT...``: the printed lines, as for the run."""
    from divekit.config import config_from_dict, known_values
    from divekit.engine.task import task_class
    from divekit.errors import DivekitError
    from divekit.export.runtime import OnnxModel, predict_images, predict_texts

    model = OnnxModel(path)
    task = model.meta["task"]
    if task == "detect":
        return _predict_onnx_detect(model, inputs, options)
    unused = sorted(k for k in options if k != "top_k")
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise DivekitError(f"{flags} do(es) not apply to an ONNX file (only --top-k)")
    top_k = int(options.get("top_k", 3))
    if task == "classify":
        results = predict_images(model, inputs, top_k)
    elif task == "bert_finetune":
        from divekit.tasks.bert_finetune_io import predict_inputs

        head = model.meta.get("head")
        if head not in ("classify", "pair"):
            raise DivekitError(f"{path}: predict runs the classify and pair heads of an ONNX "
                               f"export; this one is {head!r} (predict with its run directory)")
        results = predict_texts(model, predict_inputs(inputs, head, None, model.meta["labels"]),
                                top_k)
    else:
        raise DivekitError(f"{path} is a {task} export; `divekit predict FILE.onnx` runs "
                           "classifiers, detectors and BERT classify/pair heads (predict with "
                           "the run)")
    cls = task_class(task)  # the results print as the run's would: its model, a BERT's head
    given = {"model": model.meta.get("model"), "task": model.meta.get("head")}
    values = known_values(cls.Config, {k: v for k, v in given.items() if v is not None})
    return [cls(config_from_dict(cls.Config, values)).format_prediction(item) for item in results]


def _predict_onnx_detect(model: Any, inputs: list[str], options: dict[str, Any]) -> list[str]:
    """A detector's export: the detection task's own ``predict`` (image reading, thresholds,
    pixel boxes, ``-o`` pictures) and printing, with the ONNX file standing in for the model."""
    from divekit.config import config_from_dict, known_values, refuse_unused
    from divekit.engine.task import predict_options, task_class
    from divekit.export.runtime import OnnxDetector

    meta = model.meta
    cls = task_class("detect")
    values = known_values(cls.Config, {"model": meta.get("model"),
                                       "image_size": int(meta["input_size"][0])})
    task = cls(config_from_dict(cls.Config, values), record={"classes": list(meta["classes"])})
    offered = [f.name for f in dataclasses.fields(predict_options())]
    refuse_unused(options, task.predict, f"a detect export ({model.path})", offered)
    results = task.predict(OnnxDetector(model), inputs, **options)
    return [task.format_prediction(item) for item in results]
