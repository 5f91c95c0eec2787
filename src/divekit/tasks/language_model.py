"""Language models: an RNN/GRU/LSTM predicts the next token, trained by the engine.

The course's chapter "Recurrent Neural Networks" end to end::

    from divekit.tasks import language_model as lm
    result = lm.train(lm.Config(model="gru", data="timemachine", data_dir="data", epochs=50))
    lm.evaluate(result.run_dir)                      # {'loss': ..., 'ppl': ...}
    lm.generate(result.run_dir, "time traveller", 50)

Perplexity is ``exp(-1/n Σ_t log P(x_t | x_{t-1}, ..., x_1))``, the exponential of the mean
cross-entropy: 1 for a perfect model, the vocabulary size for a uniform one. The validation
split is the held-out tail of the corpus (``--val-fraction``, 10% by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data import dataset_info
from divekit.data.text import SAMPLERS, TOKEN_MODES, SeqDataLoader, Vocab, corpus_lines, tokenize
from divekit.engine.checkpoint import load_weights
from divekit.io import atomic_write_bytes, atomic_write_json
from divekit.engine.device import resolve_device
from divekit.engine.trainer import TrainConfig, Trainer, option
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.models.rnn import State, detach_state
from divekit.tasks.common import (
    TrainResult,
    choose_run_dir,
    config_from_dict,
    latest_weights,
    load_run_config,
    save_run_config,
)

TASK = "language_model"
VOCAB_FILE = "vocab.json"
TOKENIZER_FILE = "tokenizer.model"


@dataclass
class Config(TrainConfig):
    model: str = option("gru", "model name (see `divekit models --task language_model`)", cli=False)
    data: str = option("pydoc", "text corpus: pydoc (embedded) or timemachine", metavar="NAME")
    token: str = option("char", "token unit", choices=list(TOKEN_MODES))
    tokenizer: str | None = option(
        None, "a SentencePiece model (from `divekit tokenizer train`) instead of --token",
        metavar="PATH",
    )
    num_steps: int = option(35, "time steps per subsequence (truncated backpropagation)", metavar="T")
    batch_size: int = option(32, "subsequences per minibatch", metavar="N")
    hidden: int = option(256, "hidden units per layer (num_hiddens)", metavar="H")
    layers: int = option(1, "stacked recurrent layers (a deep RNN)", metavar="L")
    bidirectional: bool = option(False, "read the text both ways (cannot generate text)")
    embed: int | None = option(None, "an embedding of this size instead of one-hot inputs "
                               "(use it for word tokens)", metavar="E")
    sampling: str = option(
        "sequential", "minibatches: sequential (adjacent; the hidden state is carried, detached) "
        "or random (independent; the state starts at zero)", choices=list(SAMPLERS),
    )
    clip: float = option(1.0, "clip the gradients' global norm to θ: g ← min(1, θ/‖g‖) g; 0 = off",
                         metavar="θ")
    grad_clip: float | None = option(None, "set from --clip", cli=False)
    lr: float = option(0.005, "learning rate (the course's SGD uses 1 with --optimizer sgd)")
    optimizer: str = option("adam", "optimizer", choices=["sgd", "adam", "adamw"])
    momentum: float = option(0.0, "SGD momentum")
    max_tokens: int | None = option(None, "use only the first N tokens of the corpus", metavar="N")
    val_fraction: float = option(0.1, "held-out tail of the corpus for validation", metavar="F")
    data_dir: str | None = option(None, "folder holding the corpus file (timemachine.txt)", metavar="DIR")
    download: bool = option(False, "download a missing corpus (hash-checked)")
    out: str | None = option(None, "run directory (default: runs/MODEL-DATA, numbered if taken)", metavar="DIR")
    resume: bool = option(False, "continue the run in --out (or the newest runs/MODEL-DATA*)")

    def __post_init__(self) -> None:
        self.grad_clip = self.clip if self.clip else None  # the Trainer clips (engine's clip_grad_norm_)

    def validate(self) -> None:
        checks = [
            (self.token in TOKEN_MODES, f"unknown token mode {self.token!r}; choose one of: {', '.join(TOKEN_MODES)}"),
            (self.sampling in SAMPLERS, f"unknown sampling {self.sampling!r}; choose one of: {', '.join(SAMPLERS)}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.num_steps >= 1, f"--num-steps must be at least 1, got {self.num_steps}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.hidden >= 1 and self.layers >= 1, f"--hidden and --layers must be at least 1, got {self.hidden} and {self.layers}"),
            (self.embed is None or self.embed >= 1, f"--embed must be at least 1, got {self.embed}"),
            (self.clip >= 0, f"--clip must be 0 (off) or positive, got {self.clip}"),
            (0 <= self.val_fraction < 0.5, f"--val-fraction must be in [0, 0.5), got {self.val_fraction}"),
            (self.max_tokens is None or self.max_tokens >= 2, f"--max-tokens must be at least 2, got {self.max_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)
        info = model_info(self.model)
        if info.task != TASK:
            raise DivekitError(f"model {self.model!r} is a {info.task} model, not a language model")
        if dataset_info(self.data).task != "text":
            raise DivekitError(f"dataset {self.data!r} is not a text corpus; try pydoc or timemachine")


# ----------------------------------------------------------------------------- data


@dataclass
class TextData:
    """Token indices of the training text and of the held-out tail, with their vocabulary."""

    train: Tensor  # (n_train,)
    val: Tensor  # (n_val,)
    vocab: Vocab
    tokenizer: Any | None  # a SentencePieceTokenizer, or None for --token char|word
    token: str  # "char", "word" or "sentencepiece"


def load_tokenizer(path: str | Path | None) -> Any | None:
    if path is None:
        return None
    from divekit.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer.load(path)


def load_text(cfg: Config, vocab: Vocab | None = None, tokenizer: Any | None = None) -> TextData:
    """Clean, tokenize and index the corpus; split off the last ``val_fraction`` as validation."""
    lines = corpus_lines(cfg.data, data_dir=cfg.data_dir, download=cfg.download)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    tokens = tokenizer.encode_lines(lines) if tokenizer is not None else tokenize(lines, cfg.token)
    vocab = vocab if vocab is not None else Vocab(tokens)
    index = vocab.token_to_idx.get
    corpus = torch.tensor([index(t, vocab.unk) for line in tokens for t in line], dtype=torch.long)
    if cfg.max_tokens:
        corpus = corpus[: cfg.max_tokens]
    if corpus.numel() == 0:
        raise DivekitError(f"the corpus {cfg.data!r} is empty: it holds no {cfg.token} tokens")
    n_val = int(len(corpus) * cfg.val_fraction)
    train, val = corpus[: len(corpus) - n_val], corpus[len(corpus) - n_val :]
    if cfg.num_steps >= len(train):
        raise DivekitError(
            f"--num-steps {cfg.num_steps} is longer than the training text ({len(train)} tokens); "
            "use a shorter --num-steps or more text"
        )
    return TextData(train, val, vocab, tokenizer, "sentencepiece" if tokenizer else cfg.token)


# ----------------------------------------------------------------------------- the task


class LanguageModelTask:
    """Next-token cross-entropy over every position of ``(B, T)`` minibatches.

    With sequential sampling the hidden state flows, detached, from one minibatch to the next
    (truncated backpropagation through time) and restarts at zero each epoch, so epochs — and an
    exact resume at an epoch boundary — do not depend on each other. With random sampling it
    starts at zero for every minibatch. A bidirectional model never carries it (its backward
    half would come from the wrong end). A "sample" in ``samples_per_s`` is one token.

    Checkpoints keep the carried state (:meth:`checkpoint_state`), so a mid-epoch
    ``--checkpoint-every`` resume continues it and is bit-identical too; with ``--nproc`` each
    rank's rows are saved and given back to that rank. An older checkpoint without it resumes
    mid-epoch with the state at zero.
    """

    def __init__(self, cfg: Config, data: TextData | None = None):
        cfg.validate()
        self.cfg = cfg
        self.data = data if data is not None else load_text(cfg)
        self.carry = cfg.sampling == "sequential" and not cfg.bidirectional
        self.state: State | None = None

    def model(self) -> nn.Module:
        return build_model(self.cfg, len(self.data.vocab))

    def train_data(self) -> SeqDataLoader:
        cfg = self.cfg
        return SeqDataLoader(self.data.train, cfg.batch_size, cfg.num_steps, cfg.sampling, cfg.seed)

    def val_data(self) -> SeqDataLoader | None:
        n, steps = len(self.data.val), self.cfg.num_steps
        if n == 0:
            return None
        if n <= steps:
            raise DivekitError(
                f"the validation tail holds {n} tokens, too few for --num-steps {steps}; raise "
                "--val-fraction or --max-tokens, or pass --val-fraction 0"
            )
        batch = min(self.cfg.batch_size, (n - 1) // steps)
        return SeqDataLoader(self.data.val, batch, steps, self.cfg.sampling, seed=self.cfg.seed)

    def batch_size(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()  # tokens

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.state = None

    def checkpoint_state(self) -> dict[str, State] | None:
        """The carried hidden state for the checkpoint (``(layers, B, H)``, or the pair ``(h, c)``
        for an LSTM); ``None`` when nothing is carried (random sampling, bidirectional, or
        before the epoch's first step)."""
        if not self.carry or self.state is None:
            return None
        return {"hidden": self.state}

    def restore_checkpoint_state(self, model: nn.Module, saved: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's hidden state, on ``model``'s device."""
        hidden = saved.get("hidden") if isinstance(saved, dict) and self.carry else None
        if hidden is None:
            self.state = None
            return
        device = next(model.parameters()).device
        if isinstance(hidden, tuple | list):
            self.state = tuple(h.to(device) for h in hidden)  # type: ignore[assignment]
        else:
            self.state = hidden.to(device)

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        X, Y = batch  # (B, T) each; Y is X shifted by one token
        logits, state = model(X, self.state if self.carry else None)  # (B, T, V)
        self.state = detach_state(state) if self.carry else None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1))
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        """Mean cross-entropy per token and perplexity ``exp(loss)`` on the held-out tail."""
        model.eval()
        device = next(model.parameters()).device
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)  # the same partition every time
        total, count, state = torch.zeros((), device=device, dtype=torch.float64), 0, None
        for X, Y in loader:
            X, Y = X.to(device), Y.to(device)
            logits, state = model(X, state if self.carry else None)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1),
                                     reduction="sum")
            count += Y.numel()
        loss = (total / max(count, 1)).item()
        return {"loss": loss, "ppl": perplexity(loss)}

    def summarize(self, row: dict[str, Any]) -> dict[str, Any]:
        """Add the training perplexity ``exp(train_loss)`` next to the loss."""
        out: dict[str, Any] = {}
        for key, value in row.items():
            out[key] = value
            if key == "train_loss":
                out["train_ppl"] = perplexity(value)
        return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    return create_model(cfg.model, vocab_size=vocab_size, num_hiddens=cfg.hidden,
                        num_layers=cfg.layers, bidirectional=cfg.bidirectional, embed_size=cfg.embed)


# ----------------------------------------------------------------------------- train / evaluate


def _saved_vocab(run_dir: Path) -> Vocab | None:
    path = run_dir / VOCAB_FILE
    return Vocab.load(path) if path.is_file() else None


def _saved_tokenizer(run_dir: Path, cfg: Config) -> Any | None:
    path = run_dir / TOKENIZER_FILE
    return load_tokenizer(path) if path.is_file() else load_tokenizer(cfg.tokenizer)


def train(config: Config | dict[str, Any]) -> TrainResult:
    """Train a language model; the run directory also keeps ``vocab.json`` (and the tokenizer)."""
    cfg = config if isinstance(config, Config) else config_from_dict(Config, config)
    cfg.validate()
    run_dir = choose_run_dir(cfg.out, f"{cfg.model}-{cfg.data}", cfg.resume)
    vocab = _saved_vocab(run_dir) if cfg.resume else None
    tokenizer = _saved_tokenizer(run_dir, cfg) if cfg.resume else None
    task = LanguageModelTask(cfg, load_text(cfg, vocab, tokenizer))
    data = task.data
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / VOCAB_FILE, data.vocab.to_dict())
    if data.tokenizer is not None:
        atomic_write_bytes(run_dir / TOKENIZER_FILE, data.tokenizer.model_bytes)
    save_run_config(run_dir, TASK, cfg, {
        "tokens": data.token, "vocab_size": len(data.vocab),
        "train_tokens": len(data.train), "val_tokens": len(data.val),
    })
    trainer = Trainer(task, cfg, run_dir)
    history = trainer.fit(resume=cfg.resume)
    return TrainResult(run_dir, history, trainer.model)


def load_trained(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Config, TextData]:
    """The run's model (newest weights, eval mode), its config, and its vocabulary/tokenizer
    (``TextData`` with empty splits: call :func:`load_text` for the corpus)."""
    run_dir = Path(run_dir)
    record = load_run_config(run_dir)
    if record.get("task") != TASK:
        raise DivekitError(f"{run_dir} is a {record.get('task')!r} run, not a language-model run")
    cfg = config_from_dict(Config, {**record["config"], "resume": False, "out": None})
    vocab = _saved_vocab(run_dir)
    if vocab is None:
        raise DivekitError(f"{run_dir} has no {VOCAB_FILE}; it cannot map text to the model's tokens")
    model = build_model(cfg, len(vocab))
    load_weights(model, latest_weights(run_dir))
    tokenizer = _saved_tokenizer(run_dir, cfg)
    empty = torch.zeros(0, dtype=torch.long)
    data = TextData(empty, empty, vocab, tokenizer, record.get("tokens", cfg.token))
    return model.to(resolve_device(device)).eval(), cfg, data


def evaluate(run_dir: str | Path, *, data_dir: str | None = None, device: str = "auto") -> dict[str, float]:
    """Validation loss and perplexity of a run's newest checkpoint on the corpus' held-out tail."""
    model, cfg, saved = load_trained(run_dir, device)
    if data_dir is not None:
        cfg.data_dir = data_dir
    if cfg.val_fraction == 0:
        raise DivekitError(f"{run_dir} was trained with --val-fraction 0: it has no validation text")
    task = LanguageModelTask(cfg, load_text(cfg, saved.vocab, saved.tokenizer))
    metrics = task.evaluate(model, task.val_data() or [])
    return {**metrics, "tokens": float(len(task.data.val))}


# ----------------------------------------------------------------------------- generation


def clean_prefix(prefix: str) -> str:
    """As the corpus was cleaned: lower case, every run of non-letters one space (ends kept)."""
    return re.sub("[^a-z]+", " ", prefix.lower())


def encode_prefix(prefix: str, data: TextData) -> list[int]:
    """The prefix's token indices; tokens the vocabulary lacks are dropped, and a prefix with no
    known token at all is an error (the model would start from nothing)."""
    if not prefix:
        raise DivekitError("--prefix must not be empty: generation continues a given text")
    text = clean_prefix(prefix)
    if data.tokenizer is not None:
        tokens = data.tokenizer.encode(text)
    else:
        tokens = tokenize(text, "char" if data.token == "char" else "word")[0]
    known = [data.vocab[t] for t in tokens if t in data.vocab]
    if not text.strip() or not known:
        shown = "".join(t for t in data.vocab.idx_to_token[1:] if len(t) == 1) or "its vocabulary"
        raise DivekitError(
            f"the prefix {prefix!r} has no token the model knows (it was trained on "
            f"{data.token} tokens of {shown!r}); use letters and spaces"
        )
    return known


def decode(indices: list[int], data: TextData) -> str:
    tokens = data.vocab.to_tokens(indices)
    if data.tokenizer is not None:
        return data.tokenizer.decode(tokens)
    return "".join(tokens) if data.token == "char" else " ".join(tokens)


@torch.no_grad()
def generate(
    run_dir: str | Path,
    prefix: str,
    length: int = 50,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int | None = 0,
    device: str = "auto",
) -> str:
    """The prefix and ``length`` tokens continuing it, like the course's ``predict_ch8``.

    The prefix warms the hidden state up; then each step samples
    ``x_{t+1} ~ softmax(o_t / temperature)`` (``greedy``: ``argmax o_t``) and feeds it back.
    ``<unk>`` is never produced. A bidirectional model refuses: it needs the future.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise DivekitError(f"--length must be a whole number >= 0, got {length!r}")
    if not temperature > 0:
        raise DivekitError(f"--temperature must be positive, got {temperature}")
    record = load_run_config(run_dir)
    if record.get("task") == TASK and record["config"].get("bidirectional"):
        raise DivekitError(
            f"{run_dir} holds a bidirectional model: it predicts each token from the text before "
            "and after it, and while generating there is no text after; train without "
            "--bidirectional to generate"
        )
    model, _, data = load_trained(run_dir, device)
    dev = next(model.parameters()).device
    ids = encode_prefix(prefix, data)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model(torch.tensor([ids], device=dev))  # warm-up: (1, T, V)
    out: list[int] = []
    for _ in range(length):
        scores = logits[0, -1].float().cpu()
        scores[data.vocab.unk] = -math.inf
        if greedy:
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial((scores / temperature).softmax(0), 1, generator=g))
        out.append(token)
        logits, state = model(torch.tensor([[token]], device=dev), state)
    continuation = decode(out, data)
    joiner = " " if data.token == "word" and out else ""
    return clean_prefix(prefix) + joiner + continuation


# ----------------------------------------------------------------------------- CLI


def cli_evaluate(args) -> None:
    metrics = evaluate(args.run_dir, data_dir=args.data_dir, device=args.device)
    print(f"validation: loss {metrics['loss']:.4f}, perplexity {metrics['ppl']:.3f} "
          f"({int(metrics['tokens'])} tokens)")


def cli_predict(args) -> None:
    raise DivekitError(f"{args.run_dir} is a language model: use `divekit generate RUN --prefix TEXT`")


def _cmd_generate(args) -> None:
    print(generate(args.run_dir, args.prefix, args.length, temperature=args.temperature,
                   greedy=args.greedy, seed=args.seed, device=args.device))


def add_commands(sub, parent) -> None:
    p = sub.add_parser(
        "generate", parents=[parent], help="continue a text with a trained language model",
        description="Warm the model's hidden state up on --prefix, then sample --length tokens "
        "one at a time, each from softmax(logits / T) (or the most likely with --greedy).",
    )
    p.add_argument("run_dir", help="a run directory written by `divekit train gru ...`")
    p.add_argument("--prefix", required=True, help="the text to continue, e.g. 'time traveller'")
    p.add_argument("--length", type=int, default=50, help="tokens to generate (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="T < 1 sharpens, T > 1 flattens the distribution (default: 1)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_cmd_generate)
    _add_tokenizer_commands(sub, parent)


def _add_tokenizer_commands(sub, parent) -> None:
    from divekit.data.tokenizer import MODEL_TYPES

    p = sub.add_parser("tokenizer", parents=[parent], help="train or try a SentencePiece tokenizer",
                       description="Subword tokenizers (SentencePiece) for every text task's --tokenizer.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", parents=[parent], help="learn a tokenizer from a corpus",
                        description="Learn --vocab-size pieces from a corpus (cleaned as the "
                        "language models see it) and write the model file.")
    t.add_argument("--data", default="pydoc", help="text corpus (default: pydoc)")
    t.add_argument("--vocab-size", type=int, default=1000, help="pieces to learn (default: 1000)")
    t.add_argument("--model-type", default="unigram", choices=MODEL_TYPES, help="(default: unigram)")
    t.add_argument("-o", "--out", default="tok.model", help="model file (default: tok.model)")
    t.add_argument("--data-dir", help="folder holding the corpus file")
    t.add_argument("--download", action="store_true", help="download a missing corpus")
    t.set_defaults(handler=_cmd_tokenizer_train)
    e = tsub.add_parser("encode", parents=[parent], help="show the pieces of a text",
                        description="Split TEXT into the pieces of a tokenizer model.")
    e.add_argument("model", help="a tokenizer model file")
    e.add_argument("text", help="the text to split")
    e.set_defaults(handler=lambda a: print(" ".join(load_tokenizer(a.model).encode(clean_prefix(a.text)))))


def _cmd_tokenizer_train(args) -> None:
    from divekit.data.tokenizer import train_tokenizer

    lines = corpus_lines(args.data, data_dir=args.data_dir, download=args.download)
    tok = train_tokenizer(lines, args.vocab_size, model_type=args.model_type)
    path = tok.save(args.out)
    sample = " ".join(tok.encode("the time traveller"))
    print(f"{len(tok)} pieces → {path}  (e.g. 'the time traveller' → {sample})")
