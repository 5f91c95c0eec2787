"""Machine translation: an encoder-decoder learns English → French, trained by the engine.

The course's chapters "Modern Recurrent Neural Networks" (seq2seq) and "Attention Mechanisms
and Transformers" end to end::

    from divekit.engine.run import load_run, make_config, train
    from divekit.tasks.translate import TranslateConfig, TranslationTask, translate

    cfg = make_config(TranslateConfig, {"model": "transformer", "data": "numbers-fr"})
    result = train(TranslationTask(cfg))             # the model's recipe: Adam, lr 0.0015, ...
    translate(load_run(result.run_dir), ["i have twenty-one cats ."], beam=4).outputs

Training is teacher forcing: the decoder reads ``<bos> y_1 … y_{T-1}`` and is scored on
``y_1 … y_T`` by the course's masked cross-entropy, averaged over the target's real tokens

    ℓ = Σ_b Σ_t m_bt · (−log p(y_bt | y_b<t, x_b)) / Σ_b Σ_t m_bt,   m_bt = [t ≤ valid_len_b],

with gradients clipped to norm 1. Validation reports that loss, token accuracy, and corpus BLEU
(:func:`divekit.ops.bleu.corpus_bleu`, 0–100, on the tokenized sentences) of greedy translations
of the first ``--bleu-examples`` validation pairs against their references (and of beam search
with ``--bleu-beam K``). The model's sizes are its family's config
(:class:`~divekit.models.transformer.TransformerConfig`,
:class:`~divekit.models.seq2seq.Seq2SeqConfig`); its optimizer and learning rate its recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data import dataset_info, load_dataset
from divekit.data.loader import TensorBatchLoader
from divekit.data.text import Vocab
from divekit.data.translation import (
    BOS,
    EOS,
    PAD,
    TranslationData,
    decoder_inputs,
    encode_sentences,
    preprocess_nmt,
)
from divekit.engine.config import TaskConfig, clip_norm, finite
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import atomic_write_json, atomic_write_text
from divekit.models import create_model, model_info
from divekit.ops.bleu import corpus_bleu
from divekit.ops.decoding import beam_search, greedy_search

if TYPE_CHECKING:
    from divekit.engine.run import Run

SRC_VOCAB_FILE, TGT_VOCAB_FILE = "src_vocab.json", "tgt_vocab.json"
TRANSLATIONS_FILE = "translations.txt"


@dataclass(frozen=True)
class TranslateConfig(TaskConfig):
    """The translation task's options; the model's sizes come from its family's config."""

    data: str = option("numbers-fr", "sentence pairs: numbers-fr (generated, offline) or fra-eng "
                       "(Tatoeba; --data-dir or --download)", metavar="NAME")
    num_steps: int = option(13, "tokens per sentence with <eos>: longer ones are cut, shorter "
                            "padded (13 keeps every numbers-fr pair whole)", metavar="T")
    max_examples: int | None = option(None, "use only the first N pairs (the course: 600)",
                                      metavar="N")
    min_freq: int = option(2, "tokens seen fewer times in training become <unk>", metavar="N")
    val_fraction: float = option(0.1, "pairs held out for validation", metavar="F")
    bleu_examples: int = option(500, "validation pairs translated (greedy) for BLEU each epoch; "
                                "0 = no BLEU", metavar="N")
    bleu_beam: int = option(1, "also report BLEU of beam-search translations with this beam size "
                            "(val_bleu_beamK); 1 = greedy only", metavar="K")
    # the course clips every seq2seq model's gradients at norm 1
    grad_clip: float | None = option(
        1.0, "clip the gradients' global norm to θ: g ← min(1, θ/‖g‖) g; 0 = off",
        aliases=["--clip"], type=clip_norm, metavar="θ")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (isinstance(self.batch_size, int), f"--batch-size must be a number of sentence pairs "
             f"for translation, got {self.batch_size!r}"),
            (self.num_steps >= 2, f"--num-steps must be at least 2, got {self.num_steps}"),
            (self.max_examples is None or self.max_examples >= 2,
             f"--max-examples must be at least 2 (a train and a validation pair), got "
             f"{self.max_examples}"),
            (self.min_freq >= 1, f"--min-freq must be at least 1, got {self.min_freq}"),
            (finite(self.val_fraction) and 0 < self.val_fraction < 0.5,
             f"--val-fraction must be in (0, 0.5), got {self.val_fraction}"),
            (self.bleu_examples >= 0, f"--bleu-examples must be 0 or more, got {self.bleu_examples}"),
            (self.bleu_beam >= 1, f"--bleu-beam must be at least 1, got {self.bleu_beam}"),
            (not self.model or model_info(self.model).task == "translate",
             f"model {self.model!r} is not a translation model (see `divekit models --task "
             "translate`)"),
            (dataset_info(self.data).task == "translate",
             f"dataset {self.data!r} holds no sentence pairs; try numbers-fr or fra-eng"),
        ]


# ----------------------------------------------------------------------------- decoding


def detokens(indices: Sequence[int], vocab: Vocab) -> str:
    """Token indices up to ``<eos>`` as a space-separated sentence (special tokens dropped)."""
    words = []
    for token in vocab.to_tokens(list(indices)):
        if token == EOS:
            break
        if token not in (PAD, BOS):
            words.append(token)
    return " ".join(words)


def decode(model: nn.Module, src: Tensor, src_len: Tensor, tgt_vocab: Vocab, max_len: int,
           beam: int = 1, length_penalty: float = 0.75) -> list[str]:
    """Translate a batch of encoded sources ``(B, T)`` on the model's device: greedy
    (``beam=1``) or beam search ranked by ``log P / L^α`` (``length_penalty=α``)."""
    state = model.encode(src, src_len)
    first = torch.full((len(src),), tgt_vocab[BOS], dtype=torch.long, device=src.device)
    if beam <= 1:
        out = greedy_search(model.decode_step, state, first, tgt_vocab[EOS], max_len)
    else:
        out = beam_search(model.decode_step, state, first, tgt_vocab[EOS], max_len, beam_size=beam,
                          length_penalty=length_penalty, reorder=model.reorder_state)
    return [detokens(seq, tgt_vocab) for seq in out.tokens]


def unknown_words(vocab: Vocab, sentences: Sequence[str]) -> list[str]:
    """Words of the sentences (cleaned as training did) that ``vocab`` lacks, in order, once each."""
    words = [w for s in sentences for w in preprocess_nmt(s).split()]
    return list(dict.fromkeys(w for w in words if w not in vocab))


@dataclass
class AttentionMap:
    """Attention of one translation: ``weights`` ``(heads, T_out, T_src)`` (the Transformer's
    last decoder block) or ``(T_out, T_src)`` (Bahdanau's), with the tokens that label them."""

    weights: Tensor
    src_tokens: list[str]
    out_tokens: list[str]
    titles: list[str] | None


@dataclass
class Translation:
    """What :func:`translate` returns: one output per sentence, the source words the model never
    saw (read as ``<unk>``), and the first sentence's attention when asked for."""

    outputs: list[str]
    unknown: list[str]
    attention: AttentionMap | None = None


# ----------------------------------------------------------------------------- the task


class TranslationTask(Task, name="translate"):
    """Teacher-forced masked cross-entropy; validation loss, token accuracy and BLEU."""

    Config = TranslateConfig

    def __init__(self, config: TranslateConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        self._vocabs: tuple[Vocab, Vocab] | None = None  # a run's, from load_extras

    @cached_property
    def data(self) -> TranslationData:
        cfg = self.config
        return load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                            num_steps=cfg.num_steps, max_examples=cfg.max_examples,
                            min_freq=cfg.min_freq, val_fraction=cfg.val_fraction)

    @property
    def src_vocab(self) -> Vocab:
        return self._vocabs[0] if self._vocabs else self.data.src_vocab

    @property
    def tgt_vocab(self) -> Vocab:
        return self._vocabs[1] if self._vocabs else self.data.tgt_vocab

    # ---------------------------------------------------------------- data and model
    def prepare(self) -> None:
        self.data  # read and split the pairs before the run directory is written  # noqa: B018

    def train_data(self) -> TensorBatchLoader:
        arrays = tuple(self.data.train)
        if self.config.limit is not None:
            arrays = tuple(t[: self.config.limit] for t in arrays)
        return TensorBatchLoader(*arrays, batch_size=self.config.batch_size, shuffle=True,
                                 seed=self.config.seed)

    def val_data(self) -> TensorBatchLoader:
        """``(src, src_len, tgt, tgt_len, index)``: each pair's index into the validation split
        picks the pairs BLEU is computed on and orders them, whatever the sharding."""
        val = self.data.val
        return TensorBatchLoader(*val, torch.arange(len(val.src)),
                                 batch_size=max(self.config.batch_size, 256))

    def build_model(self) -> nn.Module:
        cfg = self.config
        options = model_info(cfg.model).model_options(cfg.model_options)
        return create_model(cfg.model, **options, src_vocab_size=len(self.src_vocab),
                            tgt_vocab_size=len(self.tgt_vocab))

    def run_record(self) -> dict[str, Any]:
        data = self.data
        return {"src_vocab_size": len(data.src_vocab), "tgt_vocab_size": len(data.tgt_vocab),
                "train_pairs": len(data.train.src), "val_pairs": len(data.val.src)}

    def save_extras(self, run_dir: Any) -> None:
        atomic_write_json(Path(run_dir) / SRC_VOCAB_FILE, self.data.src_vocab.to_dict())
        atomic_write_json(Path(run_dir) / TGT_VOCAB_FILE, self.data.tgt_vocab.to_dict())

    def load_extras(self, run_dir: Any) -> None:
        vocabs = []
        for name in (SRC_VOCAB_FILE, TGT_VOCAB_FILE):
            if not (Path(run_dir) / name).is_file():
                raise DivekitError(f"{run_dir} has no {name}; it cannot map text to the model's tokens")
            vocabs.append(Vocab.load(Path(run_dir) / name))
        self._vocabs = (vocabs[0], vocabs[1])

    # ---------------------------------------------------------------- training and validation
    def _token_sums(self, model: nn.Module, X: Tensor, X_len: Tensor,
                    Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Summed token loss, correct tokens and real (non-padding) target tokens of a batch."""
        logits = model(X, decoder_inputs(Y, self.tgt_vocab[BOS]), X_len)  # (B, T, V)
        real = Y != self.tgt_vocab[PAD]  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction="none")
        correct = ((logits.argmax(-1) == Y) & real).sum()
        return (loss * real.flatten()).sum(), correct, real.sum()

    def training_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        X, X_len, Y, _ = batch
        total, correct, tokens = self._token_sums(model, X, X_len, Y)
        loss = total / tokens.clamp(min=1)
        return loss, {"loss": loss.detach(), "acc": (correct / tokens.clamp(min=1)).detach()}

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        X, X_len, Y, _, index = batch
        total, correct, tokens = self._token_sums(model, X, X_len, Y)
        sums: dict[str, Any] = {"loss_sum": total, "correct": correct, "tokens": tokens}
        if self.config.bleu_examples:
            sums.update(self._bleu_lists(model, X, X_len, index))
        return sums

    def _bleu_lists(self, model: nn.Module, X: Tensor, X_len: Tensor,
                    index: Tensor) -> dict[str, list]:
        """Translations of the batch's pairs among the first ``bleu_examples``, with their
        indices, sources and references (the same keys on every batch and every rank)."""
        cfg = self.config
        rows = (index < cfg.bleu_examples).nonzero().squeeze(1)  # (n,)
        ids = index[rows].tolist()
        pairs = [self.data.val_pairs[i] for i in ids]
        lists: dict[str, list] = {"bleu_index": ids, "sources": [" ".join(s) for s, _ in pairs],
                                  "references": [" ".join(t) for _, t in pairs], "hypotheses": []}
        if cfg.bleu_beam > 1:
            lists["beam_hypotheses"] = []
        if ids:
            src, src_len = X[rows], X_len[rows]
            lists["hypotheses"] = decode(model, src, src_len, self.tgt_vocab, cfg.num_steps)
            if cfg.bleu_beam > 1:
                lists["beam_hypotheses"] = decode(model, src, src_len, self.tgt_vocab,
                                                  cfg.num_steps, cfg.bleu_beam)
        return lists

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        tokens = max(float(sums["tokens"]), 1.0)
        metrics: dict[str, Any] = {"loss": float(sums["loss_sum"]) / tokens,
                                   "acc": float(sums["correct"]) / tokens}
        if "bleu_index" not in sums:
            return metrics
        order = sorted(range(len(sums["bleu_index"])), key=sums["bleu_index"].__getitem__)
        sources, refs, hyps = ([sums[k][i] for i in order]
                               for k in ("sources", "references", "hypotheses"))
        metrics["bleu"] = corpus_bleu(hyps, refs, tokenize="none")
        if "beam_hypotheses" in sums:
            beam_hyps = [sums["beam_hypotheses"][i] for i in order]
            metrics[f"bleu_beam{self.config.bleu_beam}"] = corpus_bleu(beam_hyps, refs,
                                                                       tokenize="none")
        metrics["translations"] = list(zip(sources, hyps, refs))
        return metrics

    def on_epoch_end(self, model: nn.Module, epoch: int, run: Run, metrics: dict[str, Any]) -> None:
        """After the last epoch: ``translations.txt`` (source, output, reference) of the
        validation pairs BLEU was computed on."""
        pairs = metrics.get("translations")
        if epoch == self.config.epochs and pairs:
            lines = [f"{src}\t{hyp}\t{ref}" for src, hyp, ref in pairs]
            atomic_write_text(run.dir / TRANSLATIONS_FILE,
                              "source\toutput\treference\n" + "\n".join(lines) + "\n")

    # ---------------------------------------------------------------- inference
    def translate_sentences(self, model: nn.Module, sentences: Sequence[str], beam: int = 1,
                            length_penalty: float = 0.75) -> list[str]:
        """Raw sentences, cleaned and tokenized as the training pairs were, translated."""
        if isinstance(sentences, str) or not sentences or any(not s.strip() for s in sentences):
            raise DivekitError("give at least one non-empty sentence to translate")
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise DivekitError(f"--beam must be at least 1, got {beam}")
        if not (finite(length_penalty) and length_penalty >= 0):
            raise DivekitError(f"--length-penalty must be 0 or more, got {length_penalty}")
        src, src_len = encode_sentences(sentences, self.src_vocab, self.config.num_steps)
        device = next(model.parameters()).device
        with torch.inference_mode():
            return decode(model, src.to(device), src_len.to(device), self.tgt_vocab,
                          self.config.num_steps, beam, length_penalty)

    def predict(self, model: nn.Module, inputs: Sequence[Any], *, beam: int = 1,
                length_penalty: float = 0.75, **_other_tasks_options: Any) -> list[dict[str, Any]]:
        """``divekit predict RUN "sentence" ...``: one ``{"source", "translation", "unknown"}``
        per sentence (options meant for other tasks' predict, such as ``top_k``, are ignored)."""
        sentences = [str(s) for s in inputs]
        outputs = self.translate_sentences(model, sentences, beam, length_penalty)
        return [{"source": s, "translation": out, "unknown": unknown_words(self.src_vocab, [s])}
                for s, out in zip(sentences, outputs)]

    def attention_map(self, model: nn.Module, sentence: str, output: str) -> AttentionMap:
        """The encoder-decoder attention of ``output`` as the translation of ``sentence``
        (teacher-forced on it): the last Transformer block's heads, or Bahdanau's weights."""
        decoder, device = model.decoder, next(model.parameters()).device
        src, src_len = encode_sentences([sentence], self.src_vocab, self.config.num_steps)
        out_tokens = output.split() + [EOS]
        dec_in = torch.tensor([[self.tgt_vocab[BOS]] + self.tgt_vocab[out_tokens[:-1]]])
        args = (src.to(device), dec_in.to(device), src_len.to(device))
        with torch.inference_mode():
            if hasattr(decoder, "record_attention"):  # the Transformer: the last block's heads
                decoder.record_attention(True)
                try:
                    model(*args)
                    weights = decoder.blks[-1].attention2.attention_weights[0]  # (heads, T_out, T_src)
                finally:
                    decoder.record_attention(False)
                titles: list[str] | None = [f"head {h + 1}" for h in range(weights.shape[0])]
            elif hasattr(decoder, "attention_weights"):
                model(*args)
                weights, titles = decoder.attention_weights[0], None  # (T_out, T_src)
            else:
                raise DivekitError(f"{type(model).__name__} with a {type(decoder).__name__} has "
                                   "no attention to draw")
        n_src = int(src_len[0])
        return AttentionMap(weights[..., :n_src].cpu(), self.src_vocab.to_tokens(src[0, :n_src]),
                            out_tokens, titles)


def translate(run: Run, sentences: Sequence[str], *, beam: int = 1, length_penalty: float = 0.75,
              attention: bool = False) -> Translation:
    """Translate raw sentences with an opened run (:func:`divekit.engine.run.load_run`).

    ``attention``: also return the first sentence's encoder-decoder attention (models with
    attention only; others raise :class:`DivekitError`).
    """
    task = run.task
    if not isinstance(task, TranslationTask) or run.model is None:
        raise DivekitError(f"{run.dir} is a {run.record.get('task')!r} run, not a translation run")
    outputs = task.translate_sentences(run.model, sentences, beam, length_penalty)
    attn = task.attention_map(run.model, sentences[0], outputs[0]) if attention else None
    return Translation(outputs, unknown_words(task.src_vocab, sentences), attn)

