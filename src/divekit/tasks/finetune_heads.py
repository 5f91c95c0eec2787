"""The four heads of text fine-tuning (``divekit finetune SOURCE --task classify|pair|tag|qa``).

:class:`~divekit.tasks.bert_finetune.TextFinetuneTask` is the same for every head: it loads the
encoder, the tokenizer and the data, and hands everything that differs to one small object,
picked once from ``--task`` (:data:`HEAD_CLASSES`). A head holds, in this order:

* its **reader**: how examples become tensors (``encode``) and how ``predict``'s inputs are
  read (``read_inputs``: a text, ``A ||| B``, a sentence's words, ``QUESTION ||| PASSAGE``);
* its **loss** on the model's output ``out`` and the targets ``y`` of a batch:

  - classify / pair: ``L = CE(ŷ, y)`` on the ``[CLS]`` logits ``(B, C)``;
  - tag: ``L = Σ_t m_t CE(ŷ_t, y_t) / Σ_t m_t`` over ``(B, T, C)``, where ``m_t = 1`` only on
    a word's first sub-token (the others carry ``IGNORE``);
  - qa: ``L = (CE(s, i*) + CE(e, j*)) / 2``, ``out`` being ``(B, T, 2)`` start/end logits;

* its **metrics**: the sums of one validation batch and the epoch's metrics from their totals
  (accuracy and macro-F1; token accuracy and entity F1; SQuAD's exact match and F1);
* its **predict** on user inputs, and how ``evaluate`` and ``predict`` **print** its results.

A new head is one more subclass here, a ``make_head`` case in :mod:`divekit.models.bert_heads`
and a name in :data:`HEAD_CLASSES`; the task does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data.text_features import (
    IGNORE,
    best_spans,
    encode_qa,
    encode_tagged,
    encode_texts,
    pad,
    qa_windows,
    tag_row,
)
from divekit.errors import DivekitError
from divekit.ops import seq_metrics as M
from divekit.tasks.bert_finetune_io import predict_inputs

if TYPE_CHECKING:
    from divekit.tasks.bert_finetune import TextFinetuneTask, TextPredictConfig

QA_CHUNK = 32  # predict: the windows of a long passage run through the model this many at a time
DEFAULT_TOP_K = 3  # classify/pair predict: labels shown per text unless --top-k says otherwise


class FinetuneHead:
    """What one head adds to :class:`~divekit.tasks.bert_finetune.TextFinetuneTask`.

    ``task`` is the task the head belongs to: the head reads its ``config``, ``labels``,
    ``tokenizer`` and ``data`` when it needs them (each is loaded lazily there)."""

    name: ClassVar[str]
    default_data: ClassVar[str]  # --data when none is given
    pooled: ClassVar[bool] = False  # reuse the pretrained [CLS] pooler (sentence-level heads)
    fewest_labels: ClassVar[int | None] = 2  # a run's record must name this many; None: no labels

    def __init__(self, task: TextFinetuneTask):
        self.task = task

    # ------------------------------------------------------------------ reader
    def encode(self, examples: Sequence[Any], where: str) -> tuple[Tensor, ...]:
        """``(tokens, segments, valid, targets, ...)`` of ``examples``; ``where`` names them in
        errors ("training data", "validation")."""
        raise NotImplementedError

    def num_classes(self) -> int | None:
        """Classes of the output, for ``--batch-size auto``'s cap (None: not a classifier)."""
        return len(self.task.labels)

    def outputs(self) -> int:
        """Width of the head's last layer."""
        return len(self.task.labels)

    def read_inputs(self, inputs: Any) -> list[Any]:
        """``predict``'s inputs as this head takes them (:func:`predict_inputs`)."""
        return predict_inputs(inputs, self.name, None, self.task.labels)

    # ------------------------------------------------------------------ loss and metrics
    def loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss of a training batch and its logs (means)."""
        raise NotImplementedError

    def validation_step(self, out: Tensor, batch: Sequence[Tensor]) -> dict[str, Any]:
        """Sums and counts of one validation batch (``out`` in float32)."""
        raise NotImplementedError

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        """The epoch's metrics from the totals of :meth:`validation_step`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference and printing
    def predict(self, model: nn.Module, items: list[Any], device: torch.device,
                options: TextPredictConfig) -> list[dict[str, Any]]:
        """One result per item of :meth:`read_inputs` (the model in eval mode, no gradients)."""
        raise NotImplementedError

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``divekit evaluate``'s line: every number the head's metrics hold."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def format_prediction(self, item: dict[str, Any]) -> str:
        """``divekit predict``'s line for one result of :meth:`predict`."""
        raise NotImplementedError


class ClassifyHead(FinetuneHead):
    """One label per text, from the pooled ``[CLS]`` state."""

    name = "classify"
    default_data = "sentiment-gen"
    pooled = True

    def encode(self, examples: Sequence[Any], where: str) -> tuple[Tensor, ...]:
        return encode_texts(self.task.tokenizer, examples, self.task.labels, where)

    def table_columns(self) -> tuple[list[str], str]:
        """The text and label columns a CSV/TSV given to ``predict`` is read by: the run's own
        (``--text-columns``/``--label-column``, or its GLUE task's)."""
        from divekit.data.text_tasks import GLUE

        c = self.task.config
        if c.data in GLUE:
            return list(GLUE[c.data][0]), GLUE[c.data][1]
        return [x.strip() for x in c.text_columns.split(",")], c.label_column

    def read_inputs(self, inputs: Any) -> list[Any]:
        return predict_inputs(inputs, self.name, self.table_columns(), self.task.labels)

    def second_texts(self, items: list[Any]) -> list[str] | None:
        """The second text of each ``(a, b, gold)`` item, encoded as ``[SEP] b``: none here."""
        return None

    def loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(out, y)
        return loss, {"loss": loss.detach(), "acc": (out.argmax(-1) == y).float().mean()}

    def validation_step(self, out: Tensor, batch: Sequence[Tensor]) -> dict[str, Any]:
        y = batch[3]
        pred = out.argmax(-1)
        return {"loss": F.cross_entropy(out, y, reduction="sum"), "correct": (pred == y).sum(),
                "pred": pred.tolist(), "gold": y.tolist(), "count": len(y)}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        n = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / n, "acc": float(sums["correct"]) / n,
                "macro_f1": M.macro_f1(sums["pred"], sums["gold"])}

    def predict(self, model: nn.Module, items: list[Any], device: torch.device,
                options: TextPredictConfig) -> list[dict[str, Any]]:
        """Items are ``(a, b or None, gold or None)``; each result ranks the top-k labels."""
        tok, labels = self.task.tokenizer, self.task.labels
        rows = tok.encode_batch([a for a, _, _ in items], self.second_texts(items))
        tokens, segments, valid = (t.to(device) for t in pad(rows, tok.pad_id))
        probs = model(tokens, segments, valid).float().softmax(-1).cpu()
        k = min(int(options.top_k or DEFAULT_TOP_K), len(labels))
        out = []
        for (a, b, gold), p in zip(items, probs):
            top = torch.topk(p, k)
            ranked = [(labels[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
            out.append({"input": a if b is None else f"{a} ||| {b}", "label": ranked[0][0],
                        "probability": ranked[0][1], "top": ranked,
                        **({"gold": gold} if gold is not None else {})})
        return out

    def format_prediction(self, item: dict[str, Any]) -> str:
        others = ", ".join(f"{c} {p:.3f}" for c, p in item["top"][1:])
        gold = f" [gold: {item['gold']}]" if "gold" in item else ""
        return (f"{item['input']}: {item['label']} {item['probability']:.3f}"
                + (f" ({others})" if others else "") + gold)


class PairHead(ClassifyHead):
    """One label per pair of texts (``A ||| B``: entailment, paraphrase), from ``[CLS]``."""

    name = "pair"
    default_data = "nli-gen"

    def second_texts(self, items: list[Any]) -> list[str] | None:
        return [b for _, b, _ in items]

    def table_columns(self) -> tuple[list[str], str]:
        """As a classify run's, but a pair run trained on one-column settings (generated data,
        SNLI) reads ``sentence1,sentence2``."""
        text, label = super().table_columns()
        return (text if len(text) == 2 else ["sentence1", "sentence2"]), label


class TagHead(FinetuneHead):
    """A label per word (BIO entity tags), read at each word's first sub-token."""

    name = "tag"
    default_data = "ner-gen"
    fewest_labels = 1

    def encode(self, examples: Sequence[Any], where: str) -> tuple[Tensor, ...]:
        return encode_tagged(self.task.tokenizer, examples, self.task.labels, where)

    def loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        keep = y != IGNORE
        acc = ((out.argmax(-1) == y) & keep).sum() / keep.sum().clamp_min(1)
        return loss, {"loss": loss.detach(), "acc": acc.float()}

    def validation_step(self, out: Tensor, batch: Sequence[Tensor]) -> dict[str, Any]:
        y = batch[3]
        keep = y != IGNORE
        names = self.task.labels
        gold = [[names[int(t)] for t in row[k]] for row, k in zip(y, keep)]
        pred = [[names[int(t)] for t in row[k]] for row, k in zip(out.argmax(-1), keep)]
        counts = M.entity_counts(gold, pred)
        return {"loss": F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                        reduction="sum"), "tokens": keep.sum(),
                "tok_correct": ((out.argmax(-1) == y) & keep).sum(),
                "ent_correct": counts["correct"], "ent_pred": counts["pred"],
                "ent_gold": counts["gold"], "count": len(y)}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        prf = M.prf(float(sums["ent_correct"]), float(sums["ent_pred"]), float(sums["ent_gold"]))
        tokens = max(float(sums["tokens"]), 1.0)
        return {"loss": float(sums["loss"]) / tokens, "acc": float(sums["tok_correct"]) / tokens,
                "entity_precision": prf["precision"], "entity_recall": prf["recall"],
                "entity_f1": prf["f1"]}

    def predict(self, model: nn.Module, items: list[Any], device: torch.device,
                options: TextPredictConfig) -> list[dict[str, Any]]:
        return [self._tag_one(model, words, device) for words in items]

    def _tag_one(self, model: nn.Module, words: list[str], device: torch.device) -> dict[str, Any]:
        labels = self.task.labels
        ids, _, firsts = tag_row(self.task.tokenizer, words)
        x = torch.tensor([ids], device=device)
        logits = model(x, torch.zeros_like(x), torch.tensor([len(ids)], device=device))[0]
        tags = [labels[int(logits[p].argmax())] for p in firsts]
        tags += ["O"] * (len(words) - len(tags))  # words past --max-len are tagged O
        entities = [(kind, " ".join(words[s : e + 1])) for kind, s, e in M.get_entities(tags)]
        return {"input": " ".join(words), "words": words, "tags": tags, "entities": entities}

    def format_prediction(self, item: dict[str, Any]) -> str:
        shown = ", ".join(f"{kind}: {text}" for kind, text in item["entities"]) or "no entities"
        return f"{item['input']}: {shown}"


class QAHead(FinetuneHead):
    """An answer span in a passage: start and end logits at every context token.

    A passage longer than ``--max-len`` is cut into windows that share ``--doc-stride``
    tokens; each window is one training row, and at validation the best-scoring span over all
    of an example's windows is its answer (the windows of the validation set are kept here, in
    :attr:`val_features`, to map a window's token positions back to the passage's text)."""

    name = "qa"
    default_data = "qa-gen"
    fewest_labels = None

    def __init__(self, task: TextFinetuneTask):
        super().__init__(task)
        self.val_features: list[Any] = []

    def encode(self, examples: Sequence[Any], where: str) -> tuple[Tensor, ...]:
        tensors, features = encode_qa(self.task.tokenizer, examples, self.task.config.doc_stride)
        if where == "validation":
            self.val_features = features
        return tensors

    def num_classes(self) -> int | None:
        return None

    def outputs(self) -> int:
        return 2  # start and end

    def loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = (F.cross_entropy(out[..., 0], y[:, 0]) + F.cross_entropy(out[..., 1], y[:, 1])) / 2
        return loss, {"loss": loss.detach()}

    def validation_step(self, out: Tensor, batch: Sequence[Tensor]) -> dict[str, Any]:
        index = batch[4]
        feats = [self.val_features[int(i)] for i in index]
        c0 = torch.tensor([f.context_start for f in feats], device=out.device)
        n = torch.tensor([len(f.offsets) for f in feats], device=out.device)
        i, j, score = best_spans(out[..., 0], out[..., 1], c0, n, self.task.config.max_answer_len)
        return {"qa_index": index.tolist(), "qa_start": i.tolist(), "qa_end": j.tolist(),
                "qa_score": score.tolist(), "count": len(index)}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        valid = self.task.data.valid
        best: dict[int, tuple[float, str]] = {}
        for f_idx, i, j, score in zip(sums["qa_index"], sums["qa_start"], sums["qa_end"],
                                      sums["qa_score"]):
            feat = self.val_features[f_idx]
            a, b = feat.offsets[i - feat.context_start][0], feat.offsets[j - feat.context_start][1]
            text = valid[feat.example].context[a:b]
            if feat.example not in best or score > best[feat.example][0]:
                best[feat.example] = (score, text)
        em = f1 = 0.0
        for k, ex in enumerate(valid):
            e, f = M.squad_scores(best.get(k, (0.0, ""))[1], ex.answers)
            em, f1 = em + e, f1 + f
        n = max(len(valid), 1)
        return {"exact_match": em / n, "f1": f1 / n}

    def predict(self, model: nn.Module, items: list[Any], device: torch.device,
                options: TextPredictConfig) -> list[dict[str, Any]]:
        max_answer = options.max_answer_len
        if max_answer is None:  # the run's own
            max_answer = self.task.config.max_answer_len
        if isinstance(max_answer, bool) or not isinstance(max_answer, int) or max_answer < 1:
            raise DivekitError(f"--max-answer-len must be a whole number >= 1, got {max_answer!r}")
        return [self._qa_one(model, q, ctx, device, max_answer) for q, ctx in items]

    def _qa_one(self, model: nn.Module, question: str, context: str, device: torch.device,
                max_answer: int) -> dict[str, Any]:
        tok = self.task.tokenizer
        windows = qa_windows(tok, question, context, self.task.config.doc_stride)
        spans = []  # QA_CHUNK windows at a time: memory stays that of one batch at any length
        for s in range(0, len(windows), QA_CHUNK):
            chunk = windows[s : s + QA_CHUNK]
            tokens, segments, valid = (t.to(device) for t in pad([(w[0], w[1]) for w in chunk],
                                                                 tok.pad_id))
            out = model(tokens, segments, valid).float()
            c0 = torch.tensor([w[2] for w in chunk], device=device)
            n = torch.tensor([len(w[3]) for w in chunk], device=device)
            spans.append(best_spans(out[..., 0], out[..., 1], c0, n, max_answer))
        i, j, score = (torch.cat(parts) for parts in zip(*spans))
        w = int(score.argmax())
        offsets = windows[w][3]
        a, b = offsets[int(i[w]) - windows[w][2]][0], offsets[int(j[w]) - windows[w][2]][1]
        return {"input": question, "answer": context[a:b], "score": float(score[w]), "start": a}

    def format_prediction(self, item: dict[str, Any]) -> str:
        return f"{item['input']}: {item['answer']!r} (score {item['score']:.3f})"


# the heads by --task; TextFinetuneTask picks one here, once
HEAD_CLASSES: dict[str, type[FinetuneHead]] = {
    cls.name: cls for cls in (ClassifyHead, PairHead, TagHead, QAHead)}

__all__ = ["HEAD_CLASSES", "ClassifyHead", "FinetuneHead", "PairHead", "QAHead", "TagHead"]
