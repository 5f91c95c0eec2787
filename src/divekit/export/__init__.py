"""From a run to files other programs load: ONNX, ``torch.export``, Hugging Face, torchvision.

``divekit export RUN --format F`` opens the run (:func:`divekit.engine.run.load_run`: its newest
weights, in eval mode) and writes one of:

* ``onnx``: ``torch.onnx.export`` (the dynamo exporter where it works, else the TorchScript one;
  :mod:`divekit.export.graph`). The file's ``metadata_props`` hold, under the key ``divekit``,
  the JSON of what a caller needs around the graph (:func:`preprocessing`): the task, the input
  names and shapes, the input size, mean and std, the class names or labels, the vocabulary,
  the exporter. The same JSON lies beside it as ``FILE.json``. ``divekit predict FILE.onnx``
  runs it through ``onnxruntime`` (:mod:`divekit.export.runtime`).
* ``pt2``: ``torch.export.export`` then ``torch.export.save``; the JSON travels as the extra
  file ``divekit.json`` and beside it. ``torch.export.load(FILE).module()`` runs it.
* ``hf``: a BERT run in Hugging Face's layout (:mod:`divekit.export.hf`).
* ``torchvision``: a classifier's state dict under torchvision's names
  (:mod:`divekit.export.torchvision_names`).

What each task's graph takes and returns:

=============  =========================================  ================================
task           inputs                                     output
=============  =========================================  ================================
classify       ``images`` float (N, C, H, W), normalised  ``logits`` (N, classes)
segment        ``images`` float (N, 3, H, W), normalised  ``logits`` (N, classes, H, W)
bert_finetune  ``tokens``, ``segments`` int64 (N, T),     ``logits`` (N, labels), or
               ``valid_lens`` int64 (N,)                  (N, T, labels|2) for tag and qa
translate      ``tokens`` int64 (N, T), ``valid_lens``    ``encoded`` (N, T, d): the
               int64 (N,)                                 Transformer's encoder
detect         ``images`` float (N, 3, S, S) in [0, 1]    the network's raw outputs (below)
=============  =========================================  ================================

A detector is exported up to its raw outputs, the decoding stays in Python: ``tiny_ssd`` gives
``anchors`` (1, A, 4), ``cls_preds`` (N, A, C+1) and ``bbox_preds`` (N, 4A); ``centernet_tiny``
``heatmap`` (N, C, S/4, S/4) logits, ``size`` and ``offset`` (N, 2, S/4, S/4); ``yolo_grid``
``grid`` (N, G, G, 5B+C). The metadata's ``decoder`` names the builder and its arguments, so
``divekit predict FILE.onnx`` rebuilds the model (on the meta device: no weights) and calls its
own ``decode`` (softmax or sigmoid, boxes, NMS from :mod:`divekit.ops`) on onnxruntime's
outputs. The two torchvision R-CNNs go through torchvision's own ONNX support (the TorchScript
exporter): one image (1, 3, S, S) → ``boxes`` (K, 4) in pixels, ``labels`` (K,) 1..C,
``scores`` (K,), with the region proposals, the box head and its NMS (at ``nms_iou``, 0.5 as
``predict``'s default) in the graph; Mask R-CNN without its mask branch, as ``detect`` runs it.

The batch dimension varies with ``--dynamic-batch`` (else it is 1); a text's length T always
varies (up to the model's longest). An output is never one of the run's files, and an existing
one is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.export.graph import EXPORTERS, GraphSpec, write_onnx, write_pt2
from divekit.io import atomic_write_text, check_output, same_file

FORMATS = ("onnx", "pt2", "hf", "torchvision")
META_KEY = "divekit"  # the ONNX metadata_props key, the .pt2 extra file's stem
GRAPH_TASKS = ("classify", "segment", "bert_finetune", "translate", "detect")


@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the file (or folder), its preprocessing JSON beside it,
    the exporter used (``dynamo``, ``torchscript``, ``torch.export``, or the layout's name)."""

    path: Path
    meta_path: Path | None
    exporter: str
    meta: dict[str, Any]


def default_output(run_dir: Path, fmt: str) -> Path:
    return run_dir / "export" / {"onnx": "model.onnx", "pt2": "model.pt2", "hf": "hf",
                                 "torchvision": "torchvision.pth"}[fmt]


def meta_path_for(path: Path) -> Path:
    """``model.onnx`` → ``model.onnx.json``: the preprocessing JSON beside an export."""
    return path.with_name(path.name + ".json")


def run_inputs(run_dir: Path) -> list[Path]:
    """The files an export reads (so it never writes over them): the run's record, every file
    of its checkpoints, its extra files (vocabularies, tokenizer)."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and "export" not in
             p.relative_to(run_dir).parts[:1]]
    return [run_dir, *files]


def check_output_path(path: Path, inputs: list[Path], overwrite: bool, *, folder: bool = False
                      ) -> None:
    """Refuse an output that is an input (whatever ``overwrite``) or that exists without it."""
    if folder:
        for item in inputs:
            if same_file(path, item) or same_file(path, item.parent):  # a file would land on it
                raise DivekitError(f"-o {str(path)!r} holds files the export reads "
                                   f"({str(item)!r}); choose another folder")
        if path.exists() and not path.is_dir():
            raise DivekitError(f"-o {str(path)!r} exists and is not a folder")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise DivekitError(f"-o {str(path)!r} exists; pass --overwrite to replace it")
        return
    check_output(path, inputs, overwrite=overwrite)


# ----------------------------------------------------------------------------- graph specs
class _FlipTTA(nn.Module):
    """A classifier with ``--tta flip``: ``log((softmax(f(x)) + softmax(f(flip(x)))) / 2)``,
    the scores the run's evaluation and predictions use."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        a = self.model(images).float().log_softmax(1)
        b = self.model(images.flip(-1)).float().log_softmax(1)
        top = torch.maximum(a, b)  # logaddexp, written with operators every exporter knows
        return top + torch.log(torch.exp(a - top) + torch.exp(b - top)) - math.log(2)


class _TextModel(nn.Module):
    """BERT with a head, called with three plain tensors (no ``None``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, segments: Tensor, valid_lens: Tensor) -> Tensor:
        return self.model(tokens, segments, valid_lens)


class _Encoder(nn.Module):
    """A translation model's encoder: ``(tokens, valid_lens) → (N, T, d)``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens: Tensor, valid_lens: Tensor) -> Tensor:
        return self.encoder(tokens, valid_lens)


class _DetectorRaw(nn.Module):
    """A detector's network, ``Detector.raw``: images → the head's raw outputs, no decoding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Any:
        return self.model.raw(images)


class _RCNNGraph(nn.Module):
    """A torchvision R-CNN on one image: ``(1, 3, S, S) → boxes, labels, scores``, with its
    NMS at ``nms_iou`` and no mask branch. It changes the loaded model it wraps (an export's
    own copy of the run's weights)."""

    def __init__(self, model: nn.Module, nms_iou: float):
        super().__init__()
        self.net = model.net
        self.net.roi_heads.nms_thresh = float(nms_iou)
        self.net.roi_heads.mask_roi_pool = None  # roi_heads.has_mask() is then False

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        found = self.net(list(images))[0]
        return found["boxes"], found["labels"], found["scores"]


def _detect_spec(run: Any, dynamic_batch: bool) -> GraphSpec:
    """A detection run's graph: the raw outputs of a divekit detector, or a torchvision R-CNN
    with its post-processing (module docstring)."""
    model, cfg = run.model, run.config
    size = int(run.record.get("image_size") or cfg.image_size)
    batch = 2 if dynamic_batch else 1
    classes = list(run.task.classes)
    example = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    predict_defaults = run.task.PredictConfig()
    meta: dict[str, Any] = {
        "input_size": [size, size], "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3,
        "classes": classes, "threshold": predict_defaults.threshold,
        "nms_iou": predict_defaults.nms_iou,
        "preprocess": "RGB image resized to input_size (as training resized), scaled to [0, 1], "
                      "no normalisation; boxes come back as fractions of the width and height"}
    names = getattr(model, "raw_outputs", None)
    if names:
        batch_free = tuple(getattr(model, "batch_free_outputs", ()))
        meta.update({
            "inputs": {"images": ["batch" if dynamic_batch else 1, 3, size, size]},
            "outputs": list(names), "batch_free_outputs": list(batch_free),
            "decoder": {"model": cfg.model, "kwargs": run.task.model_kwargs(len(classes))},
            **({"anchor_sizes": model.sizes, "anchor_ratios": model.ratios}  # SSD: documentary,
               if "anchors" in names else {}),  # the graph computes its anchors itself
            "postprocess": "the raw outputs go through the model's decode (rebuilt from "
                           "decoder), then boxes scoring at least threshold are kept"})
        bdim = {0: ("batch", 1, 1 << 16)} if dynamic_batch else {}
        return GraphSpec(_DetectorRaw(model).eval(), (example,), ["images"], list(names),
                         [bdim], meta, batch_free=batch_free)
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if not isinstance(getattr(model, "net", None), GeneralizedRCNN):
        raise DivekitError(f"{run.dir}: the {cfg.model} detector names no raw outputs "
                           "(raw_outputs), so it cannot be exported")
    if dynamic_batch:
        raise DivekitError(f"{cfg.model} is exported through torchvision's ONNX support, which "
                           "takes one image at a time: leave out --dynamic-batch")
    heads = model.net.roi_heads
    meta.update({
        "inputs": {"images": [1, 3, size, size]}, "outputs": ["boxes", "labels", "scores"],
        "nms_in_graph": True, "detections_per_img": int(heads.detections_per_img),
        "score_thresh": float(heads.score_thresh),
        "postprocess": "the graph's boxes (pixels), labels (1..C, 0 is background) and scores "
                       "become rows [class, score, x1, y1, x2, y2] "
                       "(divekit.models.rcnn.detections_to_rows)"})
    return GraphSpec(_RCNNGraph(model, predict_defaults.nms_iou).eval(), (example,),
                     ["images"], ["boxes", "labels", "scores"], [{}], meta,
                     auto=("torchscript",))


def graph_spec(run: Any, *, dynamic_batch: bool = False) -> GraphSpec:
    """The :class:`GraphSpec` of an opened run (:class:`divekit.engine.task.Run`)."""
    task = str(run.record.get("task", "classify"))
    model, cfg = run.model, run.config
    batch = 2 if dynamic_batch else 1
    bdim = {0: ("batch", 1, 1 << 16)} if dynamic_batch else {}
    g = torch.Generator().manual_seed(0)
    if task == "classify":
        f = run.task.facts
        shape = (f["in_channels"], *f["image_size"])
        module = _FlipTTA(model) if getattr(cfg, "tta", "none") == "flip" else model
        meta = {"inputs": {"images": ["batch" if dynamic_batch else 1, *shape]},
                "input_size": list(f["image_size"]), "in_channels": f["in_channels"],
                "mean": list(f["mean"]), "std": list(f["std"]), "classes": list(f["classes"]),
                "tta": getattr(cfg, "tta", "none"),
                "preprocess": "image resized to input_size (mode L for 1 channel, RGB for 3), "
                              "scaled to [0, 1], then (x - mean) / std per channel"}
        return GraphSpec(module, (torch.rand(batch, *shape, generator=g),), ["images"],
                         ["logits"], [bdim], meta)
    if task == "segment":
        f = run.task.facts
        crop = run.record.get("crop") or None
        size = list(crop) if crop else [cfg.image_size] * 2 if cfg.data == "shapes-seg" \
            else [320, 480]
        meta = {"inputs": {"images": ["batch" if dynamic_batch else 1, 3, *size]},
                "input_size": size, "mean": list(f["mean"]), "std": list(f["std"]),
                "classes": list(f["classes"]), "colormap": f.get("colormap"),
                "preprocess": "RGB image resized to input_size, scaled to [0, 1], then "
                              "(x - mean) / std; the label map is logits.argmax(1)"}
        return GraphSpec(model, (torch.rand(batch, 3, *size, generator=g),), ["images"],
                         ["logits"], [bdim], meta)
    if task == "bert_finetune":
        if getattr(cfg, "lora", 0):
            from divekit.models import lora

            lora.merge(model)
        tok = run.task.tokenizer
        longest = int(model.encoder.config.max_len)
        t = 8
        tokens = torch.randint(5, len(tok), (batch, t), generator=g)
        valid = torch.full((batch,), t, dtype=torch.long)
        valid[0] = t - 3
        seq = {1: ("seq", 2, longest)}
        meta = {"inputs": {"tokens": ["batch", "seq"], "segments": ["batch", "seq"],
                           "valid_lens": ["batch"]},
                "head": cfg.task, "labels": list(run.task.labels), "max_len": cfg.max_len,
                "vocab": list(tok.vocab) if hasattr(tok, "vocab") else None,
                "lowercase": getattr(tok, "lowercase", True),
                "preprocess": "BERT WordPiece tokens of [CLS] text [SEP] (pairs: [CLS] a [SEP] "
                              "b [SEP], segments 0 then 1), padded with [PAD]; valid_lens = "
                              "tokens before the padding"}
        return GraphSpec(_TextModel(model), (tokens, torch.zeros_like(tokens), valid),
                         ["tokens", "segments", "valid_lens"], ["logits"],
                         [{**bdim, **seq}, {**bdim, **seq}, dict(bdim)], meta)
    if task == "translate":
        encoder = getattr(model, "encoder", None)
        if type(encoder).__name__ != "TransformerEncoder":
            raise DivekitError(f"{run.dir}: only the Transformer's encoder is exported from a "
                               f"translation run; this one is a {cfg.model}")
        vocab = run.task.src_vocab
        t = 6
        tokens = torch.randint(4, len(vocab), (batch, t), generator=g)
        valid = torch.full((batch,), t, dtype=torch.long)
        valid[0] = t - 2
        longest = int(encoder.pos_encoding.P.shape[1]) if hasattr(encoder.pos_encoding, "P") \
            else 1000
        seq = {1: ("seq", 2, longest)}
        meta = {"inputs": {"tokens": ["batch", "seq"], "valid_lens": ["batch"]},
                "src_vocab": vocab.to_dict(), "num_steps": getattr(cfg, "num_steps", None),
                "preprocess": "source tokens (the run's tokenizer) mapped through src_vocab, "
                              "then <eos>, padded with <pad> to the batch's longest"}
        return GraphSpec(_Encoder(encoder), (tokens, valid), ["tokens", "valid_lens"],
                         ["encoded"], [{**bdim, **seq}, dict(bdim)], meta)
    if task == "detect":
        return _detect_spec(run, dynamic_batch)
    raise DivekitError(f"{run.dir} is a {task} run; --format onnx and pt2 export "
                       f"{', '.join(GRAPH_TASKS)} runs")


def preprocessing(run: Any, spec: GraphSpec, fmt: str, exporter: str,
                  opset: int | None) -> dict[str, Any]:
    """The JSON that travels with an export."""
    from divekit import __version__

    return {"format": fmt, "task": str(run.record.get("task", "classify")),
            "model": run.config.model, "run": str(run.dir), "divekit_version": __version__,
            "torch_version": torch.__version__, "exporter": exporter, "opset": opset,
            "input_names": spec.names, "output_names": spec.outputs, **spec.meta}


# ----------------------------------------------------------------------------- the command
def export_run(run_dir: str | Path, fmt: str, output: str | Path | None = None, *,
               opset: int | None = None, dynamic_batch: bool = False, overwrite: bool = False,
               exporter: str = "auto") -> ExportResult:
    """Write the run at ``run_dir`` in format ``fmt`` (see the module's docstring)."""
    from divekit.engine.record import read_record
    from divekit.engine.run import load_run

    if fmt not in FORMATS:
        raise DivekitError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if exporter not in EXPORTERS:
        raise DivekitError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if opset is not None and not 7 <= opset <= 30:
        raise DivekitError(f"--opset must be an ONNX opset version (7 to 30), got {opset}")
    run_dir = Path(run_dir)
    record = read_record(run_dir)  # a folder that is not a run: one line before anything else
    if fmt == "torchvision":  # an architecture torchvision lacks: refused before loading
        from divekit.export.torchvision_names import refuse_early

        refuse_early(str(record.get("task", "classify")), str(record["config"].get("model")),
                     run_dir)
    path = Path(output) if output is not None else default_output(run_dir, fmt)
    inputs = run_inputs(run_dir)
    if record.get("base_checkpoint"):  # a fine-tuned BERT also reads its base checkpoint
        from divekit.models.bert_checkpoint import resolve_checkpoint

        try:
            base = resolve_checkpoint(str(record["base_checkpoint"]))
            inputs += [base, *(p for p in base.iterdir() if p.is_file())]
        except (DivekitError, OSError):
            pass
    if fmt == "hf":
        from divekit.export.hf import export_hf

        check_output_path(path, inputs, overwrite, folder=True)
        run = load_run(run_dir, "cpu")
        return export_hf(run, path)
    check_output_path(path, inputs, overwrite)
    meta_path = meta_path_for(path)
    check_output_path(meta_path, inputs, overwrite)
    run = load_run(run_dir, "cpu")
    if fmt == "torchvision":
        from divekit.export.torchvision_names import export_torchvision

        return export_torchvision(run, path, meta_path)
    spec = graph_spec(run, dynamic_batch=dynamic_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    what = f"{run.config.model} ({run_dir})"
    if fmt == "onnx":
        tmp = path.with_name(f".{path.name}.tmp")
        used = write_onnx(spec, tmp, opset=opset, exporter=exporter, what=what)
        meta = preprocessing(run, spec, fmt, used, opset)
        _add_onnx_metadata(tmp, meta)
        tmp.replace(path)
    else:
        used = "torch.export"
        meta = preprocessing(run, spec, fmt, used, None)
        write_pt2(spec, path, {f"{META_KEY}.json": json.dumps(meta)}, what=what)
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    return ExportResult(path, meta_path, used, meta)


def _add_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    """``metadata_props[divekit]``: the preprocessing JSON, inside the ONNX file itself."""
    try:
        import onnx
    except ImportError:
        raise DivekitError("exporting to ONNX needs the onnx package: pip install divekit[export]"
                           ) from None
    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(model, str(path))


__all__ = ["ExportResult", "FORMATS", "export_run", "graph_spec", "meta_path_for"]
