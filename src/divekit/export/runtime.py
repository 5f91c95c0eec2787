"""``divekit predict FILE.onnx INPUT...``: an exported model run by ONNX Runtime, no PyTorch
model involved, with the preprocessing its metadata records (:func:`divekit.export.preprocessing`).

The results are the dictionaries ``divekit predict RUN`` gives, so the command prints them the
same way: a classifier's top-k classes per image, a BERT classifier's label and probabilities
per text. Images are read as training read them (:func:`divekit.data.vision.load_image_batch`),
texts tokenised with the vocabulary stored in the file.

A detector's file holds its network only; :class:`OnnxDetector` stands in for the model in the
detection task's own ``predict`` (same image reading, thresholds, pixel boxes and pictures):
its ``detect`` runs the graph in onnxruntime, then the model's own ``decode``, on a copy of
the model rebuilt from the metadata on the meta device (its arguments, no weights). An R-CNN's
file already ends with torchvision's NMS; its boxes become rows as the model's ``detect``
makes them (:func:`divekit.models.rcnn.detections_to_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from divekit.errors import DivekitError

PREDICTS = ("classify", "bert_finetune", "detect")


def session(path: str | Path) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU (one line when onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DivekitError("running an ONNX file needs onnxruntime: pip install divekit[export] "
                           "onnxruntime") from None
    path = Path(path)
    if not path.is_file():
        raise DivekitError(f"{path} is not a file")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DivekitError(f"{path} is not an ONNX model onnxruntime can open: {first}") from None


def read_meta(sess: Any, path: str | Path) -> dict[str, Any]:
    """The ``divekit`` metadata of an exported file (else its ``FILE.json`` beside it)."""
    text = sess.get_modelmeta().custom_metadata_map.get("divekit")
    beside = Path(str(path) + ".json")
    if text is None and beside.is_file():
        text = beside.read_text(encoding="utf-8")
    if text is None:
        raise DivekitError(f"{path} carries no divekit metadata (export it with `divekit export`)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DivekitError(f"{path}: its divekit metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or "task" not in meta:
        raise DivekitError(f"{path}: its divekit metadata names no task")
    return meta


class OnnxModel:
    """An exported file and its metadata: ``run(**inputs)`` gives the first output."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sess = session(path)
        self.meta = read_meta(self.sess, path)
        self.batch_fixed = any(isinstance(d, int) for d in
                               [shape[0] for shape in self.meta.get("inputs", {}).values()])

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        return self.run_all(**inputs)[0]

    def run_all(self, **inputs: np.ndarray) -> list[np.ndarray]:
        """Every output, in the graph's order; a file exported without ``--dynamic-batch`` runs
        one row at a time, its outputs joined along the batch (those the metadata names in
        ``batch_free_outputs``, an SSD's anchors, taken from the first row)."""
        if not self.batch_fixed:
            return list(self.sess.run(None, inputs))
        rows = len(next(iter(inputs.values())))
        runs = [self.sess.run(None, {k: v[i:i + 1] for k, v in inputs.items()})
                for i in range(rows)]
        names = [o.name for o in self.sess.get_outputs()]
        free = set(self.meta.get("batch_free_outputs", ()))
        return [runs[0][j] if name in free else np.concatenate([r[j] for r in runs])
                for j, name in enumerate(names)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_images(model: OnnxModel, inputs: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
    """A classifier's top-k ``(class, probability)`` per image file, as ``predict RUN``."""
    from divekit.data.vision import load_image_batch

    if top_k < 1:
        raise DivekitError(f"--top-k must be at least 1, got {top_k}")
    m = model.meta
    x = load_image_batch(inputs, m["in_channels"], tuple(m["input_size"]))
    mean = torch.tensor(m["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(m["std"], dtype=torch.float32).view(-1, 1, 1)
    logits = model.run(images=((x - mean) / std).numpy().astype(np.float32))
    probs = _softmax(logits.astype(np.float64))
    if not np.isfinite(probs).all():
        raise DivekitError("the model's outputs are not finite")
    k = min(top_k, len(m["classes"]))
    out = []
    for path, row in zip(inputs, probs):
        order = np.argsort(-row, kind="stable")[:k]
        out.append({"image": str(path),
                    "predictions": [(m["classes"][int(i)], float(row[i])) for i in order]})
    return out


def predict_texts(model: OnnxModel, items: Sequence[tuple[str, str | None, Any]],
                  top_k: int = 3) -> list[dict[str, Any]]:
    """A BERT classify or pair head's label per text, as ``predict RUN``: ``items`` are
    ``(text, pair or None, gold or None)``."""
    from divekit.data.text_features import pad
    from divekit.tokenizers import BertTokenizer

    m = model.meta
    if m.get("head") not in ("classify", "pair"):
        raise DivekitError(f"{model.path}: predict runs the classify and pair heads of an ONNX "
                           f"export; this one is {m.get('head')!r} (run its run directory)")
    tok = BertTokenizer(m["vocab"], lowercase=bool(m.get("lowercase", True)),
                        max_len=int(m.get("max_len") or 512))
    pairs = [b for _, b, _ in items] if m["head"] == "pair" else None
    rows = tok.encode_batch([a for a, _, _ in items], pairs)
    tokens, segments, valid = pad(rows, tok.pad_id)
    logits = model.run(tokens=tokens.numpy(), segments=segments.numpy(), valid_lens=valid.numpy())
    probs = _softmax(logits.astype(np.float64))
    labels = m["labels"]
    k = min(top_k, len(labels))
    out = []
    for (a, b, gold), row in zip(items, probs):
        order = np.argsort(-row, kind="stable")[:k]
        ranked = [(labels[int(i)], float(row[i])) for i in order]
        out.append({"input": a if b is None else f"{a} ||| {b}", "label": ranked[0][0],
                    "probability": ranked[0][1], "top": ranked,
                    **({"gold": gold} if gold is not None else {})})
    return out


class OnnxDetector(nn.Module):
    """A detection export speaking the detector interface's ``detect(x, nms_iou)`` (rows
    ``[class, score, x1, y1, x2, y2]``, normalised), so the detection task's ``predict`` runs
    it as it runs the model. It has no parameters: the task then feeds it CPU tensors."""

    def __init__(self, model: OnnxModel):
        super().__init__()
        self.onnx = model
        meta = model.meta
        # the rebuilt model's bound ``decode``, kept out of the module's children (its meta
        # parameters would otherwise be this module's, and the task would move images there)
        self.decode: Callable[[Any, float], Tensor] | None = None
        if not meta.get("nms_in_graph"):
            decoder = meta.get("decoder")
            if not isinstance(decoder, dict) or "model" not in decoder:
                raise DivekitError(f"{model.path}: its divekit metadata names no decoder")
            from divekit.models import create_model

            with torch.device("meta"):  # the arguments make the decode; no weight is needed
                net = create_model(str(decoder["model"]), **decoder.get("kwargs", {}))
            self.decode = net.decode

    def detect(self, x: Tensor, nms_iou: float = 0.5) -> Tensor:
        images = x.detach().float().cpu().numpy()
        if self.decode is not None:
            outputs = [torch.from_numpy(o) for o in self.onnx.run_all(images=images)]
            return self.decode(outputs[0] if len(outputs) == 1 else tuple(outputs), nms_iou)
        from divekit.models.rcnn import detections_to_rows

        meta = self.onnx.meta
        if abs(float(nms_iou) - float(meta["nms_iou"])) > 1e-9:
            raise DivekitError(f"{self.onnx.path} holds torchvision's NMS in its graph at IoU "
                               f"{meta['nms_iou']:g}; --nms-iou {nms_iou:g} needs the run itself")
        found = []
        for i in range(len(images)):  # torchvision's graph takes one image
            boxes, labels, scores = self.onnx.sess.run(None, {"images": images[i:i + 1]})
            found.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                          "scores": torch.from_numpy(scores)})
        return detections_to_rows(found, tuple(x.shape[-2:]), int(meta["detections_per_img"]))
