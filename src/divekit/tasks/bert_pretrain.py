"""BERT pretraining (d2l 15.10): ``divekit train bert_small --data pydoc|wikitext2``.

The loss is the sum of the masked-LM loss and the next-sentence loss,

    L = Σᵢ wᵢ CE(ŷᵢ, yᵢ) / Σᵢ wᵢ  +  mean_b CE(ẑ_b, z_b),

where ``wᵢ`` is 1 at a real prediction slot and 0 at padding, applied *before* any mean so a
weight-0 slot adds nothing to the loss or its gradient (the course's mask has no effect).
Each epoch logs MLM loss and accuracy and NSP loss and accuracy on the training pairs and on
held-out paragraphs (``val_*``).

The run directory holds the vocabulary (``bert/vocab.txt``) from the start and, after every
epoch, a standard BERT checkpoint in ``bert/`` (``config.json``, ``model.safetensors`` with
checkpoint names, ``vocab.txt``), so ``load_pretrained(RUN)`` and ``divekit embed RUN`` open it as
they open ``bert-base-uncased``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data.bert_pretrain import PARAGRAPH_SOURCES, BertPretrainLoader, SentenceCorpus
from divekit.engine.config import TaskConfig, finite
from divekit.engine.task import Task
from divekit.errors import DivekitError, UnknownNameError
from divekit.models import create_model
from divekit.models.bert import mlm_loss
from divekit.models.bert_checkpoint import load_pretrained, save_pretrained
from divekit.tokenizers import BertTokenizer

EXPORT = "bert"


@dataclass(frozen=True)
class BertPretrainConfig(TaskConfig):
    """Pretraining options; the course's are Adam at 0.01 with 512 pairs of 64 tokens."""

    optimizer: str = option("adam", "optimizer", choices=["sgd", "adam", "adamw"])
    lr: float = option(1e-3, "learning rate")
    batch_size: int = option(128, "sentence pairs per minibatch (per worker)", metavar="N")
    max_len: int = option(64, "tokens per sentence pair, [CLS] and [SEP] included", metavar="T")
    tokenizer: str = option(
        "word", "word (the course's word vocabulary, BERT's word splitting) or wordpiece:N "
        "(a WordPiece vocabulary of N tokens learned with the tokenizers library)", metavar="SPEC")
    min_freq: int = option(5, "word vocabulary: keep the words seen at least this often", metavar="N")
    checkpoint: str | None = option(
        None, "continue pretraining a BERT checkpoint (a directory, a run, or minilm); its "
        "sizes and vocabulary replace the model's and --tokenizer", metavar="DIR")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.data in PARAGRAPH_SOURCES,
             f"--data {self.data!r} is not a pretraining corpus; choose one of: {', '.join(PARAGRAPH_SOURCES)}"),
            (isinstance(self.max_len, int) and 5 <= self.max_len <= 4096,
             f"--max-len must be in [5, 4096], got {self.max_len}"),
            (isinstance(self.min_freq, int) and self.min_freq >= 1,
             f"--min-freq must be at least 1, got {self.min_freq}"),
            (_vocab_size(self.tokenizer) is not False,
             f"--tokenizer must be word or wordpiece:N with N >= 100, got {self.tokenizer!r}"),
            (finite(self.lr), f"--lr must be finite, got {self.lr}"),
        ]


def _vocab_size(spec: str) -> int | None | bool:
    """``'word'`` → None; ``'wordpiece:N'`` → N; anything else → False."""
    if spec == "word":
        return None
    kind, _, n = str(spec).partition(":")
    return int(n) if kind == "wordpiece" and n.isdigit() and int(n) >= 100 else False


class BertPretrainTask(Task, name="bert_pretrain"):
    """Masked-LM + next-sentence pretraining of a registered BERT (``bert_small``, ``bert_base``)."""

    Config = BertPretrainConfig

    def __init__(self, config: BertPretrainConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        self._tokenizer: BertTokenizer | None = None

    # ------------------------------------------------------------------ data
    @cached_property
    def paragraphs(self) -> dict[str, list[list[str]]]:
        c = self.config
        if c.data not in PARAGRAPH_SOURCES:
            raise UnknownNameError("pretraining corpus", c.data, PARAGRAPH_SOURCES)
        return PARAGRAPH_SOURCES[c.data](data_dir=c.data_dir, download=c.download)

    @property
    def tokenizer(self) -> BertTokenizer:
        if self._tokenizer is None:
            c = self.config
            if c.checkpoint:
                self._tokenizer = load_pretrained(c.checkpoint)[1]
            else:
                sentences = [s for p in self.paragraphs["train"] for s in p]
                size = _vocab_size(c.tokenizer)
                self._tokenizer = (BertTokenizer.word_level(sentences, c.min_freq) if size is None
                                   else BertTokenizer.train_wordpiece(sentences, int(size)))
        return self._tokenizer

    def corpus(self, split: str) -> SentenceCorpus:
        paragraphs = self.paragraphs[split]
        ids = iter(self.tokenizer.ids([s for p in paragraphs for s in p]))
        documents = [getattr(p, "document", i) for i, p in enumerate(paragraphs)]
        return SentenceCorpus.from_ids([[next(ids) for _ in p] for p in paragraphs], documents)

    def _loader(self, split: str, **kw: Any) -> BertPretrainLoader:
        tok = self.tokenizer
        specials = {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id,
                    "mask": tok.mask_id}
        return BertPretrainLoader(self.corpus(split), batch_size=self.config.batch_size,
                                  max_len=self.config.max_len, vocab_size=len(tok),
                                  special_ids=specials, seed=self.config.seed, **kw)

    def train_data(self) -> BertPretrainLoader:
        return self._loader("train", shuffle=True, limit=self.config.limit)

    def val_data(self) -> BertPretrainLoader:
        return self._loader("valid", shuffle=False, fixed=True)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        c = self.config
        if c.checkpoint:
            model = load_pretrained(c.checkpoint)[0]
            if c.max_len > model.config.max_len:
                raise DivekitError(f"--max-len {c.max_len} exceeds the checkpoint's "
                                   f"max_position_embeddings {model.config.max_len}")
            return model.train()
        vocab_size = self.record.get("vocab_size") or len(self.tokenizer)
        return create_model(c.model, vocab_size=vocab_size, max_len=c.max_len)

    def run_record(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer)}

    def save_extras(self, run_dir: Any) -> None:
        self.tokenizer.save(Path(run_dir) / EXPORT)

    def load_extras(self, run_dir: Any) -> None:
        """The run's tokenizer; config.json's ``vocab_size`` (the model's embedding rows) must
        be its size: one line naming both (a tampered 10¹² tried to allocate 4 TB)."""
        self._tokenizer = BertTokenizer.load(Path(run_dir) / EXPORT)
        size = self.record.get("vocab_size")
        if size is not None and size != len(self._tokenizer):
            raise DivekitError(f"{Path(run_dir) / 'config.json'}: 'vocab_size' is {size!r}, but "
                               f"the run's tokenizer ({EXPORT}) has {len(self._tokenizer)} tokens")

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _forward(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``(mlm_logits (N, V), nsp_logits (B, 2), weights (N,), labels (N,), nsp_y (B,))``:
        the masked-LM head scores only the ``N`` slots of weight > 0 (about half of the
        ``B × P`` slots on pydoc and WikiText), which skips the padding slots' share of the
        vocabulary projection and of the softmax. ``Σ w CE / Σ w`` is the same either way."""
        tokens, segments, valid, positions, weights, labels, nsp_y = batch
        keep = weights > 0  # (B, P)
        _, mlm_logits, nsp_logits = model(tokens, segments, valid, positions, mlm_keep=keep)
        return mlm_logits, nsp_logits, weights[keep], labels[keep], nsp_y

    def training_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        mlm_logits, nsp_logits, weights, labels, nsp_y = self._forward(model, batch)
        l_mlm = mlm_loss(mlm_logits, labels, weights)
        l_nsp = F.cross_entropy(nsp_logits, nsp_y)
        with torch.no_grad():
            hits = (mlm_logits.argmax(-1) == labels).to(weights.dtype) * weights
            mlm_acc = hits.sum() / weights.sum().clamp_min(1)
            nsp_acc = (nsp_logits.argmax(-1) == nsp_y).float().mean()
        loss = l_mlm + l_nsp
        return loss, {"loss": loss.detach(), "mlm_loss": l_mlm.detach(), "mlm_acc": mlm_acc,
                      "nsp_loss": l_nsp.detach(), "nsp_acc": nsp_acc}

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        mlm_logits, nsp_logits, w, labels, nsp_y = self._forward(model, batch)
        ce = F.cross_entropy(mlm_logits.float(), labels, reduction="none")  # (N,)
        return {
            "mlm_loss": (ce * w).sum(), "mlm_count": w.sum(),
            "mlm_correct": ((mlm_logits.argmax(-1) == labels).to(w.dtype) * w).sum(),
            "nsp_loss": F.cross_entropy(nsp_logits.float(), nsp_y, reduction="sum"),
            "nsp_correct": (nsp_logits.argmax(-1) == nsp_y).sum(), "count": len(nsp_y),
        }

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        preds, pairs = max(float(sums["mlm_count"]), 1.0), max(float(sums["count"]), 1.0)
        out = {"mlm_loss": float(sums["mlm_loss"]) / preds, "mlm_acc": float(sums["mlm_correct"]) / preds,
               "nsp_loss": float(sums["nsp_loss"]) / pairs, "nsp_acc": float(sums["nsp_correct"]) / pairs}
        return {"loss": out["mlm_loss"] + out["nsp_loss"], **out}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``divekit evaluate`` on a pretraining run: MLM and NSP loss and accuracy."""
        keys = ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc")
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)

    def on_epoch_end(self, model: nn.Module, epoch: int, run: Any, metrics: dict[str, Any]) -> None:
        """Export the encoder and heads as a standard BERT checkpoint in ``run.dir/bert``."""
        save_pretrained(model, self.tokenizer, Path(run.dir) / EXPORT)
