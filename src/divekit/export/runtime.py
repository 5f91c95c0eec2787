"""``divekit predict FILE.onnx INPUT...``: an exported model run by ONNX Runtime, no PyTorch
model involved, with the preprocessing its metadata records (:func:`divekit.export.preprocessing`).

The results are the dictionaries ``divekit predict RUN`` gives, so the command prints them the
same way: a classifier's top-k classes per image, a BERT classifier's label and probabilities
per text. Images are read as training read them (:func:`divekit.data.vision.load_image_batch`),
texts tokenised with the vocabulary stored in the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from divekit.errors import DivekitError

PREDICTS = ("classify", "bert_finetune")


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
        if self.batch_fixed:  # exported without --dynamic-batch: one row at a time
            rows = len(next(iter(inputs.values())))
            return np.concatenate([self.sess.run(None, {k: v[i:i + 1] for k, v in
                                                        inputs.items()})[0] for i in range(rows)])
        return self.sess.run(None, inputs)[0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_images(model: OnnxModel, inputs: Sequence[Any], top_k: int = 3) -> list[dict[str, Any]]:
    """A classifier's top-k ``(class, probability)`` per image file, as ``predict RUN``."""
    import torch

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
