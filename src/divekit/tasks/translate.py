"""Machine translation: an encoder-decoder learns English → French, trained by the engine.

The course's chapters "Modern Recurrent Neural Networks" (seq2seq) and "Attention Mechanisms
and Transformers" end to end::

    from divekit.tasks import translate as mt
    result = mt.train(mt.Config(model="transformer", data="numbers-fr", epochs=10))
    mt.evaluate(result.run_dir)                              # {'loss': ..., 'bleu': ...}
    mt.translate(result.run_dir, ["i have twenty-one cats ."], beam=4)

Training is teacher forcing: the decoder reads ``<bos> y_1 … y_{T-1}`` and is scored on
``y_1 … y_T`` by cross-entropy averaged over the target's real tokens (padding excluded, the
course's masked loss), with gradients clipped to norm 1. Validation reports that loss, token
accuracy, and corpus BLEU (:func:`divekit.ops.bleu.corpus_bleu`, 0–100, on the tokenized
sentences) of greedy translations of up to ``--bleu-examples`` validation pairs against their
references. ``divekit translate RUN "sentence" --beam 4`` decodes with beam search and can draw
the attention of the models that have it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data import dataset_info, load_dataset
from divekit.data.text import Vocab
from divekit.data.translation import (
    BOS,
    EOS,
    PAD,
    TranslationData,
    decoder_inputs,
    encode_sentences,
)
from divekit.engine.checkpoint import load_weights
from divekit.io import atomic_write_json, atomic_write_text
from divekit.engine.device import resolve_device
from divekit.engine.trainer import TrainConfig, Trainer, option
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.ops.bleu import corpus_bleu
from divekit.ops.decoding import beam_search, greedy_search
from divekit.tasks.common import (
    TrainResult,
    choose_run_dir,
    config_from_dict,
    latest_weights,
    load_run_config,
    save_run_config,
)

TASK = "translate"
SRC_VOCAB_FILE, TGT_VOCAB_FILE = "src_vocab.json", "tgt_vocab.json"


@dataclass
class Config(TrainConfig):
    model: str = option("transformer", "model name (see `divekit models --task translate`)", cli=False)
    data: str = option("numbers-fr", "sentence pairs: numbers-fr (generated, offline) or fra-eng "
                       "(Tatoeba; --data-dir or --download)", metavar="NAME")
    num_steps: int = option(13, "tokens per sentence with <eos>: longer ones are cut, shorter padded "
                            "(13 keeps every numbers-fr pair whole)", metavar="T")
    max_examples: int | None = option(None, "use only the first N pairs (the course: 600)", metavar="N")
    min_freq: int = option(2, "tokens seen fewer times in training become <unk>", metavar="N")
    val_fraction: float = option(0.1, "pairs held out for validation", metavar="F")
    batch_size: int = option(128, "sentence pairs per minibatch", metavar="N")
    embed: int = option(256, "seq2seq models: embedding size", metavar="E")
    hidden: int = option(256, "hidden units (the Transformer's model width d)", metavar="H")
    layers: int = option(2, "seq2seq: GRU layers; transformer: blocks in encoder and decoder", metavar="L")
    heads: int = option(4, "transformer: attention heads", metavar="N")
    ffn: int = option(64, "transformer: hidden units of the position-wise feed-forward network", metavar="N")
    dropout: float = option(0.2, "dropout")
    lr: float | None = option(None, "learning rate (default: the course's, 0.005 for the GRU models, "
                              "0.0015 for the Transformer)")
    optimizer: str = option("adam", "optimizer", choices=["sgd", "adam", "adamw"])
    clip: float = option(1.0, "clip the gradients' global norm (0 = off)", metavar="θ")
    grad_clip: float | None = option(None, "set from --clip", cli=False)
    bleu_examples: int = option(500, "validation pairs translated (greedy) for BLEU each epoch; 0 = no BLEU",
                                metavar="N")
    data_dir: str | None = option(None, "folder holding fra.txt or fra-eng.zip", metavar="DIR")
    download: bool = option(False, "download a missing dataset (hash-checked)")
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")

    def __post_init__(self) -> None:
        self.grad_clip = self.clip if self.clip else None
        if self.lr is None:
            self.lr = 0.0015 if self.model == "transformer" else 0.005

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.num_steps >= 2, f"--num-steps must be at least 2, got {self.num_steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (min(self.embed, self.hidden, self.layers, self.heads, self.ffn) >= 1,
             "--embed, --hidden, --layers, --heads and --ffn must be at least 1"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.clip >= 0, f"--clip must be 0 (off) or positive, got {self.clip}"),
            (0 < self.val_fraction < 0.5, f"--val-fraction must be in (0, 0.5), got {self.val_fraction}"),
            (self.bleu_examples >= 0, f"--bleu-examples must be 0 or more, got {self.bleu_examples}"),
            (self.min_freq >= 1, f"--min-freq must be at least 1, got {self.min_freq}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)
        info = model_info(self.model)
        if info.task != TASK:
            raise DivekitError(f"model {self.model!r} is a {info.task} model, not a translation model")
        if self.model == "transformer" and self.hidden % self.heads:
            raise DivekitError(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")
        if dataset_info(self.data).task != TASK:
            raise DivekitError(f"dataset {self.data!r} holds no sentence pairs; try numbers-fr or fra-eng")


def build_model(cfg: Config, src_vocab_size: int, tgt_vocab_size: int) -> nn.Module:
    sizes = {"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size, "dropout": cfg.dropout}
    if cfg.model == "transformer":
        return create_model(cfg.model, num_hiddens=cfg.hidden, ffn_num_hiddens=cfg.ffn,
                            num_heads=cfg.heads, num_blks=cfg.layers, **sizes)
    return create_model(cfg.model, embed_size=cfg.embed, num_hiddens=cfg.hidden, num_layers=cfg.layers, **sizes)


def load_pairs(cfg: Config) -> TranslationData:
    return load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                        num_steps=cfg.num_steps, max_examples=cfg.max_examples, min_freq=cfg.min_freq,
                        val_fraction=cfg.val_fraction)


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


@torch.no_grad()
def decode_batch(model: nn.Module, src: Tensor, src_len: Tensor, tgt_vocab: Vocab, max_len: int,
                 beam: int = 1, length_penalty: float = 0.75) -> list[str]:
    """Translate a batch of encoded sources: greedy (``beam=1``) or beam search."""
    model.eval()
    device = next(model.parameters()).device
    src, src_len = src.to(device), src_len.to(device)
    state = model.encode(src, src_len)
    first = torch.full((len(src),), tgt_vocab[BOS], dtype=torch.long, device=device)
    if beam <= 1:
        out = greedy_search(model.decode_step, state, first, tgt_vocab[EOS], max_len)
    else:
        out = beam_search(model.decode_step, state, first, tgt_vocab[EOS], max_len, beam_size=beam,
                          length_penalty=length_penalty, reorder=model.reorder_state)
    return [detokens(seq, tgt_vocab) for seq in out.tokens]


# ----------------------------------------------------------------------------- the task


class TranslationTask:
    """Teacher-forced masked cross-entropy; validation loss, token accuracy and BLEU."""

    def __init__(self, cfg: Config, data: TranslationData | None = None):
        cfg.validate()
        self.cfg = cfg
        self.data = data if data is not None else load_pairs(cfg)
        self.bos = self.data.tgt_vocab[BOS]
        self.pad = self.data.tgt_vocab[PAD]

    def model(self) -> nn.Module:
        return build_model(self.cfg, len(self.data.src_vocab), len(self.data.tgt_vocab))

    def train_data(self):
        return self.data.train_loader(self.cfg.batch_size, seed=self.cfg.seed)

    def val_data(self):
        return self.data.val_loader(max(self.cfg.batch_size, 256))

    def _loss(self, model: nn.Module, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed token loss, correct tokens and real (non-padding) target tokens of a batch."""
        X, X_len, Y, _ = batch
        logits = model(X, decoder_inputs(Y, self.bos), X_len)  # (B, T, V)
        real = Y != self.pad
        loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction="none")
        correct = ((logits.argmax(-1) == Y) & real).sum()
        return (loss * real.flatten()).sum(), correct, real.sum()

    def step(self, model: nn.Module, batch: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        total, correct, tokens = self._loss(model, batch)
        loss = total / tokens.clamp(min=1)
        return loss, {"loss": loss.detach(), "acc": (correct / tokens.clamp(min=1)).detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        loss_sum = correct = tokens = 0.0
        for batch in loader:
            total, c, n = self._loss(model, [t.to(device) for t in batch])
            loss_sum, correct, tokens = loss_sum + total.item(), correct + c.item(), tokens + n.item()
        metrics = {"loss": loss_sum / max(tokens, 1), "acc": correct / max(tokens, 1)}
        if self.cfg.bleu_examples:
            metrics["bleu"] = self.bleu(model, self.cfg.bleu_examples)
        return metrics

    def bleu(self, model: nn.Module, limit: int, beam: int = 1) -> float:
        """Corpus BLEU of the first ``limit`` validation pairs' translations (tokenized text)."""
        val, n = self.data.val, min(limit, len(self.data.val.src))
        hyps: list[str] = []
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            hyps += decode_batch(model, val.src[start:stop], val.src_valid_len[start:stop],
                                 self.data.tgt_vocab, self.cfg.num_steps, beam)
        refs = [" ".join(tgt) for _, tgt in self.data.val_pairs[:n]]
        self.last_translations = list(zip([" ".join(s) for s, _ in self.data.val_pairs[:n]], hyps, refs))
        return corpus_bleu(hyps, refs, tokenize="none")

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path) -> None:
        """After the last epoch: ``translations.txt`` (source, output, reference) of the
        validation pairs BLEU was computed on."""
        pairs = getattr(self, "last_translations", None)
        if epoch == self.cfg.epochs and pairs:
            lines = [f"{src}\t{hyp}\t{ref}" for src, hyp, ref in pairs]
            atomic_write_text(run_dir / "translations.txt", "source\toutput\treference\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- train / evaluate / translate


def train(config: Config | dict[str, Any]) -> TrainResult:
    """Train a translation model; the run directory keeps both vocabularies."""
    cfg = config if isinstance(config, Config) else config_from_dict(Config, config)
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, f"{cfg.model}-{cfg.data}", cfg.resume)
    task = TranslationTask(cfg)
    data = task.data
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / SRC_VOCAB_FILE, data.src_vocab.to_dict())
    atomic_write_json(run_dir / TGT_VOCAB_FILE, data.tgt_vocab.to_dict())
    save_run_config(run_dir, TASK, cfg, {
        "src_vocab_size": len(data.src_vocab), "tgt_vocab_size": len(data.tgt_vocab),
        "train_pairs": len(data.train.src), "val_pairs": len(data.val.src),
    })
    trainer = Trainer(task, cfg, run_dir)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Config, Vocab, Vocab]:
    """The run's model (newest weights, eval mode), its config and its two vocabularies."""
    run_dir = Path(run_dir)
    record = load_run_config(run_dir)
    if record.get("task") != TASK:
        raise DivekitError(f"{run_dir} is a {record.get('task')!r} run, not a translation run")
    cfg = config_from_dict(Config, {**record["config"], "resume": False, "out": None})
    vocabs = []
    for name in (SRC_VOCAB_FILE, TGT_VOCAB_FILE):
        if not (run_dir / name).is_file():
            raise DivekitError(f"{run_dir} has no {name}; it cannot map text to the model's tokens")
        vocabs.append(Vocab.load(run_dir / name))
    model = build_model(cfg, len(vocabs[0]), len(vocabs[1]))
    load_weights(model, latest_weights(run_dir))
    return model.to(resolve_device(device)).eval(), cfg, vocabs[0], vocabs[1]


def evaluate(run_dir: str | Path, *, data_dir: str | None = None, device: str = "auto",
             beam: int = 1) -> dict[str, float]:
    """Validation loss, token accuracy and BLEU (greedy, or ``beam``) of a run's newest weights."""
    model, cfg, _, _ = load_trained(run_dir, device)
    if data_dir is not None:
        cfg.data_dir = data_dir
    task = TranslationTask(cfg)
    metrics = task.evaluate(model, task.val_data())
    if beam > 1 and cfg.bleu_examples:
        metrics[f"bleu_beam{beam}"] = task.bleu(model, cfg.bleu_examples, beam)
    return metrics


def translate(run_dir: str | Path, sentences: Sequence[str], *, beam: int = 1, length_penalty: float = 0.75,
              device: str = "auto", attention: str | Path | None = None,
              unknown: list[str] | None = None) -> list[str]:
    """Translate raw sentences (cleaned and tokenized as the training pairs were).

    ``attention``: a PNG path for the encoder-decoder attention of the first sentence's
    translation (models with attention only), one panel per head of the last decoder block.
    ``unknown``: a list that receives the words the model's source vocabulary lacks (read as
    ``<unk>``).
    """
    if not sentences or any(not s.strip() for s in sentences):
        raise DivekitError("give at least one non-empty sentence to translate")
    if beam < 1:
        raise DivekitError(f"--beam must be at least 1, got {beam}")
    model, cfg, src_vocab, tgt_vocab = load_trained(run_dir, device)
    if unknown is not None:
        unknown.extend(unknown_words(src_vocab, sentences))
    src, src_len = encode_sentences(sentences, src_vocab, cfg.num_steps)
    outputs = decode_batch(model, src, src_len, tgt_vocab, cfg.num_steps, beam, length_penalty)
    if attention is not None:
        _draw_attention(model, outputs[0], src, src_len, src_vocab, tgt_vocab, attention)
    return outputs


@torch.no_grad()
def _draw_attention(model, output, src, src_len, src_vocab, tgt_vocab, path) -> None:
    from divekit.viz import plot_attention

    decoder = model.decoder
    out_tokens = output.split() + [EOS]
    dec_in = torch.tensor([[tgt_vocab[BOS]] + [tgt_vocab[t] for t in out_tokens[:-1]]])
    device = next(model.parameters()).device
    if hasattr(decoder, "record_attention"):  # the Transformer: the last block's heads
        decoder.record_attention(True)
        model(src[:1].to(device), dec_in.to(device), src_len[:1].to(device))
        weights = decoder.blks[-1].attention2.attention_weights[0]  # (heads, T_out, T_src)
        decoder.record_attention(False)
        titles = [f"head {h + 1}" for h in range(weights.shape[0])]
    elif hasattr(decoder, "attention_weights"):
        model(src[:1].to(device), dec_in.to(device), src_len[:1].to(device))
        weights, titles = decoder.attention_weights[0], None  # (T_out, T_src)
    else:
        raise DivekitError(f"{type(model).__name__} with a {type(decoder).__name__} has no attention to draw")
    n_src = int(src_len[0])
    src_tokens = src_vocab.to_tokens(src[0, :n_src].tolist())
    plot_attention(weights[..., :n_src], path, xlabel="source", ylabel="output", titles=titles,
                   xticks=src_tokens, yticks=out_tokens)


# ----------------------------------------------------------------------------- CLI


def cli_evaluate(args) -> None:
    m = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
    bleu = f", BLEU {m['bleu']:.2f}" if "bleu" in m else ""
    print(f"validation: loss {m['loss']:.4f}, token accuracy {m['acc']:.4f}{bleu}")


def cli_predict(args) -> None:
    raise DivekitError(f"{args.run_dir} is a translation model: use `divekit translate RUN \"sentence\"`")


def unknown_words(vocab: Vocab, sentences: Sequence[str]) -> list[str]:
    """Words of the sentences (cleaned as training did) that ``vocab`` lacks, in order, once each."""
    from divekit.data.translation import preprocess_nmt

    words = [w for s in sentences for w in preprocess_nmt(s).split()]
    return list(dict.fromkeys(w for w in words if w not in vocab))


def _cmd_translate(args) -> None:
    unknown: list[str] = []
    outputs = translate(args.run_dir, args.sentences, beam=args.beam, length_penalty=args.length_penalty,
                        device=args.device, attention=args.attention, unknown=unknown)
    for source, output in zip(args.sentences, outputs):
        print(f"{source} => {output}")
    if args.attention:
        print(f"attention: {args.attention}")
    if unknown:
        print(f"note: the model never saw {', '.join(map(repr, unknown))}; they were read as <unk>",
              file=sys.stderr)


def add_commands(sub, parent) -> None:
    p = sub.add_parser(
        "translate", parents=[parent], help="translate sentences with a trained translation model",
        description="Clean and tokenize each sentence as the training pairs were, encode it, and "
        "decode greedily (--beam 1) or with beam search, ranking finished translations by "
        "log P / length^α (--length-penalty α).",
    )
    p.add_argument("run_dir", help="a run directory written by `divekit train transformer ...`")
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help="English sentences, e.g. 'i have two cats .'")
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy (default: 1)")
    p.add_argument("--length-penalty", type=float, default=0.75, help="α of the beam ranking (default: 0.75)")
    p.add_argument("--attention", metavar="PNG", help="draw the first sentence's attention to this file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_cmd_translate)
