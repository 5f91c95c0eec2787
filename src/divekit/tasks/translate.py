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

Decoding and the sentence helpers (greedy and beam translation, n-best lists, attention maps)
live in :mod:`divekit.tasks.translate_decode`; their names are importable from here too.
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
from divekit.data.translation import BOS, PAD, TranslationData, decoder_inputs, detokenize
from divekit.engine.config import TaskConfig, clip_norm, finite
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import atomic_write_json, atomic_write_text
from divekit.models import create_model, model_info
from divekit.ops.bleu import corpus_bleu
from divekit.tasks.translate_decode import (  # the decoding helpers, importable from here too
    AttentionMap,
    Hypothesis,
    Translation,
    attention_map,
    check_decoding,
    decode,
    decode_nbest,
    detokens,
    translate_sentences,
    unknown_words,
)
from divekit.tokenizers import SentencePieceTokenizer, parse_tokenizer_spec

if TYPE_CHECKING:
    from divekit.engine.task import Run

SRC_VOCAB_FILE, TGT_VOCAB_FILE = "src_vocab.json", "tgt_vocab.json"
TOKENIZER_FILE = "tokenizer.model"
TRANSLATIONS_FILE = "translations.txt"
# tokens per sentence: the Transformer's positional table holds 1000 positions, and every
# sentence pair is stored padded to this length (10^12 asked numpy for 437 TiB)
MAX_NUM_STEPS = 1000

__all__ = ["AttentionMap", "Hypothesis", "TranslateConfig", "Translation", "TranslationTask",
           "check_decoding", "decode", "decode_nbest", "detokens", "sacrebleu_score", "translate",
           "unknown_words"]


@dataclass(frozen=True)
class TranslateConfig(TaskConfig):
    """The translation task's options; the model's sizes come from its family's config."""

    data: str = option("numbers-fr", "sentence pairs: numbers-fr (generated, offline) or fra-eng "
                       "(Tatoeba; --data-dir or --download)", metavar="NAME")
    num_steps: int = option(13, "tokens per sentence with <eos>: longer ones are cut, shorter "
                            "padded (13 keeps every numbers-fr pair whole; at most "
                            f"{MAX_NUM_STEPS})", metavar="T")
    max_examples: int | None = option(None, "use only the first N pairs (the course: 600)",
                                      metavar="N")
    min_freq: int = option(2, "tokens seen fewer times in training become <unk>", metavar="N")
    val_fraction: float = option(0.1, "pairs held out for validation", metavar="F")
    val_size: int | None = option(None, "hold out exactly N pairs for validation (instead of "
                                  "--val-fraction)", metavar="N")
    tokenizer: str | None = option(None, "subword pieces instead of words: bpe:N or unigram:N "
                                   "trains a SentencePiece model of N pieces on the training "
                                   "pairs (one for both languages); or the PATH of a trained "
                                   ".model file", metavar="SPEC")
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
            (2 <= self.num_steps <= MAX_NUM_STEPS,
             f"--num-steps must be in [2, {MAX_NUM_STEPS}], got {self.num_steps}"),
            (self.max_examples is None or self.max_examples >= 2,
             f"--max-examples must be at least 2 (a train and a validation pair), got "
             f"{self.max_examples}"),
            (self.min_freq >= 1, f"--min-freq must be at least 1, got {self.min_freq}"),
            (finite(self.val_fraction) and 0 < self.val_fraction < 0.5,
             f"--val-fraction must be in (0, 0.5), got {self.val_fraction}"),
            (self.val_size is None or self.val_size >= 1,
             f"--val-size must be at least 1, got {self.val_size}"),
            (self.val_size is None or self.val_fraction == 0.1,  # the default: not given
             f"--val-size {self.val_size} and --val-fraction {self.val_fraction} both say how "
             "many pairs to hold out: give one"),
            (self.tokenizer is None or _tokenizer_spec_ok(self.tokenizer),
             f"--tokenizer must be bpe:N, unigram:N or the path of a SentencePiece .model file, "
             f"got {self.tokenizer!r}"),
            (self.bleu_examples >= 0, f"--bleu-examples must be 0 or more, got {self.bleu_examples}"),
            (self.bleu_beam >= 1, f"--bleu-beam must be at least 1, got {self.bleu_beam}"),
            (not self.model or model_info(self.model).task == "translate",
             f"model {self.model!r} is not a translation model (see `divekit models --task "
             "translate`)"),
            (dataset_info(self.data).task == "translate",
             f"dataset {self.data!r} holds no sentence pairs; try numbers-fr or fra-eng"),
        ]


def _tokenizer_spec_ok(spec: str) -> bool:
    try:
        return parse_tokenizer_spec(spec) is not None or Path(spec).suffix == ".model" or \
            Path(spec).is_file()
    except DivekitError:
        return False


def sacrebleu_score(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in sacrebleu's standard form: each cleaned sentence detokenized
    (:func:`~divekit.data.translation.detokenize`), then mteval-v13a tokenization (0–100)."""
    return corpus_bleu([detokenize(h) for h in hypotheses], [detokenize(r) for r in references],
                       tokenize="13a")


# ----------------------------------------------------------------------------- the task


class TranslationTask(Task, name="translate"):
    """Teacher-forced masked cross-entropy; validation loss, token accuracy and BLEU."""

    Config = TranslateConfig

    def __init__(self, config: TranslateConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        self._vocabs: tuple[Vocab, Vocab] | None = None  # a run's, from load_extras
        self._tokenizer: SentencePieceTokenizer | None = None  # a run's, from load_extras

    @cached_property
    def data(self) -> TranslationData:
        cfg = self.config
        return load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                            num_steps=cfg.num_steps, max_examples=cfg.max_examples,
                            min_freq=cfg.min_freq, val_fraction=cfg.val_fraction,
                            val_size=cfg.val_size, tokenizer=cfg.tokenizer)

    @property
    def tokenizer(self) -> SentencePieceTokenizer | None:
        """The subword tokenizer (``--tokenizer``), ``None`` for words."""
        if self._vocabs is not None:
            return self._tokenizer
        return self.data.tokenizer if self.config.tokenizer else None

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
                "train_pairs": len(data.train.src), "val_pairs": len(data.val.src),
                "tokenizer_pieces": len(data.tokenizer) if data.tokenizer is not None else None}

    def save_extras(self, run_dir: Any) -> None:
        atomic_write_json(Path(run_dir) / SRC_VOCAB_FILE, self.data.src_vocab.to_dict())
        atomic_write_json(Path(run_dir) / TGT_VOCAB_FILE, self.data.tgt_vocab.to_dict())
        if self.data.tokenizer is not None:
            self.data.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def load_extras(self, run_dir: Any) -> None:
        vocabs = []
        for name in (SRC_VOCAB_FILE, TGT_VOCAB_FILE):
            if not (Path(run_dir) / name).is_file():
                raise DivekitError(f"{run_dir} has no {name}; it cannot map text to the model's tokens")
            vocabs.append(Vocab.load(Path(run_dir) / name))
        self._vocabs = (vocabs[0], vocabs[1])
        if self.config.tokenizer:  # the run's own copy of the model, whatever the spec said
            path = Path(run_dir) / TOKENIZER_FILE
            if not path.is_file():
                raise DivekitError(f"{run_dir} has no {TOKENIZER_FILE}; it cannot split text into "
                                   "the model's subword pieces")
            self._tokenizer = SentencePieceTokenizer.load(path)

    # ---------------------------------------------------------------- training and validation
    def _token_sums(self, model: nn.Module, X: Tensor, X_len: Tensor, Y: Tensor,
                    Y_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Summed token loss, correct tokens and real (non-padding) target tokens of a batch.

        Columns past the batch's longest source and target are all padding: they are cut
        first (the masked loss and every real position's output are unchanged, and a corpus of
        short sentences padded to a long ``--num-steps`` trains several times faster)."""
        X, Y = X[:, : max(int(X_len.max()), 1)], Y[:, : max(int(Y_len.max()), 1)]
        logits = model(X, decoder_inputs(Y, self.tgt_vocab[BOS]), X_len)  # (B, T, V)
        real = Y != self.tgt_vocab[PAD]  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction="none")
        correct = ((logits.argmax(-1) == Y) & real).sum()
        return (loss * real.flatten()).sum(), correct, real.sum()

    def training_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        X, X_len, Y, Y_len = batch
        total, correct, tokens = self._token_sums(model, X, X_len, Y, Y_len)
        loss = total / tokens.clamp(min=1)
        return loss, {"loss": loss.detach(), "acc": (correct / tokens.clamp(min=1)).detach()}

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        X, X_len, Y, Y_len, index = batch
        total, correct, tokens = self._token_sums(model, X, X_len, Y, Y_len)
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
        text = self.data.text
        lists: dict[str, list] = {"bleu_index": ids, "sources": [text(s) for s, _ in pairs],
                                  "references": [text(t) for _, t in pairs], "hypotheses": []}
        if cfg.bleu_beam > 1:
            lists["beam_hypotheses"] = []
        if ids:
            src, src_len = X[rows], X_len[rows]
            lists["hypotheses"] = decode(model, src, src_len, self.tgt_vocab, cfg.num_steps,
                                         tokenizer=self.tokenizer)
            if cfg.bleu_beam > 1:
                lists["beam_hypotheses"] = decode(model, src, src_len, self.tgt_vocab,
                                                  cfg.num_steps, cfg.bleu_beam,
                                                  tokenizer=self.tokenizer)
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
        metrics["sacrebleu"] = sacrebleu_score(hyps, refs)
        if "beam_hypotheses" in sums:
            beam_hyps = [sums["beam_hypotheses"][i] for i in order]
            k = self.config.bleu_beam
            metrics[f"bleu_beam{k}"] = corpus_bleu(beam_hyps, refs, tokenize="none")
            metrics[f"sacrebleu_beam{k}"] = sacrebleu_score(beam_hyps, refs)
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
                            length_penalty: float = 0.75, *, n_best: int = 1,
                            batch_size: int = 64) -> list[list[Hypothesis]]:
        """Raw sentences translated with this run's vocabularies, tokenizer and
        ``--num-steps`` (:func:`~divekit.tasks.translate_decode.translate_sentences`)."""
        return translate_sentences(model, sentences, self.src_vocab, self.tgt_vocab,
                                   self.config.num_steps, self.tokenizer, beam=beam,
                                   length_penalty=length_penalty, n_best=n_best,
                                   batch_size=batch_size)

    def predict(self, model: nn.Module, inputs: Sequence[Any], *, beam: int = 1,
                length_penalty: float = 0.75, **_other_tasks_options: Any) -> list[dict[str, Any]]:
        """``divekit predict RUN "sentence" ...``: one ``{"source", "translation", "unknown"}``
        per sentence (options meant for other tasks' predict, such as ``top_k``, are ignored)."""
        sentences = [str(s) for s in inputs]
        found = self.translate_sentences(model, sentences, beam, length_penalty)
        return [{"source": s, "translation": hyps[0].text if hyps else "",
                 "unknown": unknown_words(self.src_vocab, [s], self.tokenizer)}
                for s, hyps in zip(sentences, found)]

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``divekit evaluate``'s line: validation loss, token accuracy, the course's BLEU (on
        the cleaned, space-separated words) and sacreBLEU (13a, detokenized), when computed."""
        parts = [f"validation: loss {metrics['loss']:.4f}, token accuracy {metrics['acc']:.4f}"]
        if "bleu" in metrics:
            parts.append(f"BLEU {metrics['bleu']:.2f}")
        if "sacrebleu" in metrics:
            parts.append(f"sacreBLEU (13a, detokenized) {metrics['sacrebleu']:.2f}")
        for key in sorted(k for k in metrics if k.startswith("bleu_beam")):
            k = key[len("bleu_beam"):]
            parts.append(f"BLEU (beam {k}) {metrics[key]:.2f}")
            if f"sacrebleu_beam{k}" in metrics:
                parts.append(f"sacreBLEU (beam {k}) {metrics[f'sacrebleu_beam{k}']:.2f}")
        return ", ".join(parts)

    def format_prediction(self, item: dict[str, Any]) -> str:
        """``divekit predict``'s line per sentence, as ``divekit translate`` prints it."""
        return f"{item['source']} => {item['translation']}"

    def attention_map(self, model: nn.Module, sentence: str, output: str) -> AttentionMap:
        """The encoder-decoder attention of ``output`` as the translation of ``sentence``
        (:func:`~divekit.tasks.translate_decode.attention_map`)."""
        return attention_map(model, sentence, output, self.src_vocab, self.tgt_vocab,
                             self.config.num_steps, self.tokenizer)


def translate(run: Run, sentences: Sequence[str], *, beam: int = 1, length_penalty: float = 0.75,
              n_best: int = 1, batch_size: int = 64, attention: bool = False) -> Translation:
    """Translate raw sentences with an opened run (:func:`divekit.engine.run.load_run`),
    ``batch_size`` at a time. Blank sentences translate to ``""``.

    ``n_best``: also return each sentence's ``n_best`` hypotheses (at most ``beam``) with their
    length-normalised scores in ``nbest``. ``attention``: also return the first sentence's
    encoder-decoder attention (models with attention only; others raise :class:`DivekitError`).
    """
    task = run.task
    if not isinstance(task, TranslationTask) or run.model is None:
        raise DivekitError(f"{run.dir} is a {run.record.get('task')!r} run, not a translation run")
    found = task.translate_sentences(run.model, sentences, beam, length_penalty, n_best=n_best,
                                     batch_size=batch_size)
    outputs = [hyps[0].text if hyps else "" for hyps in found]
    attn = None
    if attention and outputs[0]:
        attn = task.attention_map(run.model, sentences[0], outputs[0])
    return Translation(outputs, unknown_words(task.src_vocab, sentences, task.tokenizer), attn,
                       found if n_best > 1 else None)
