"""Language models: an RNN/GRU/LSTM predicts the next token, trained by the engine.

The course's chapter "Recurrent Neural Networks" end to end::

    from divekit.engine.run import evaluate, load_run, make_config, train
    from divekit.tasks.language_model import LanguageModelTask, LMConfig, generate

    cfg = make_config(LMConfig, {"model": "gru", "data": "timemachine", "data_dir": "data"})
    result = train(LanguageModelTask(cfg))
    evaluate(result.run_dir)                     # {'loss': ..., 'ppl': ..., 'tokens': ...}
    generate(load_run(result.run_dir), "time traveller", 50)

Perplexity is ``exp(-1/n Σ_t log P(x_t | x_{t-1}, ..., x_1))``, the exponential of the mean
cross-entropy: 1 for a perfect model, the vocabulary size for a uniform one. The validation
split is the held-out tail of the corpus (``--val-fraction``, 10% by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data import dataset_info
from divekit.data.text import SAMPLERS, SeqDataLoader, Vocab, corpus_lines
from divekit.engine.config import TaskConfig, finite
from divekit.engine.device import module_device
from divekit.engine.record import choose_run_dir
from divekit.engine.task import Run, Task
from divekit.errors import DivekitError
from divekit.io import atomic_write_bytes, atomic_write_json
from divekit.models import create_model, model_info
from divekit.models.rnn import State, detach_state
from divekit.tokenizers import TOKEN_MODES, tokenize

TASK = "language_model"
VOCAB_FILE = "vocab.json"
TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True)
class LMConfig(TaskConfig):
    """A language model's options; the recurrent family's (``--hidden``, ...) and its recipe
    (Adam, clipping θ = 1) come from :mod:`divekit.models.rnn`."""

    data: str = option("pydoc", "text corpus: pydoc (embedded) or timemachine", metavar="NAME")
    batch_size: int = option(32, "subsequences per minibatch (per worker)", metavar="N")
    token: str = option("char", "token unit", choices=list(TOKEN_MODES))
    tokenizer: str | None = option(
        None, "a SentencePiece model (from `divekit tokenizer train`) instead of --token",
        metavar="PATH",
    )
    num_steps: int = option(35, "time steps per subsequence (truncated backpropagation)", metavar="T")
    sampling: str = option(
        "sequential", "minibatches: sequential (adjacent; the hidden state is carried, detached) "
        "or random (independent; the state starts at zero)", choices=list(SAMPLERS),
    )
    max_tokens: int | None = option(None, "use only the first N tokens of the corpus", metavar="N")
    val_fraction: float = option(0.1, "held-out tail of the corpus for validation", metavar="F")

    def checks(self) -> list[tuple[bool, str]]:
        kind = model_info(self.model).task
        return super().checks() + [
            (kind == TASK, f"model {self.model!r} is a {kind} model, not a language model"),
            (dataset_info(self.data).task == "text",
             f"dataset {self.data!r} is not a text corpus; try pydoc or timemachine"),
            (self.token in TOKEN_MODES,
             f"unknown token mode {self.token!r}; choose one of: {', '.join(TOKEN_MODES)}"),
            (self.sampling in SAMPLERS,
             f"unknown sampling {self.sampling!r}; choose one of: {', '.join(SAMPLERS)}"),
            (isinstance(self.num_steps, int) and self.num_steps >= 1,
             f"--num-steps must be at least 1, got {self.num_steps}"),
            (self.max_tokens is None or self.max_tokens >= 2,
             f"--max-tokens must be at least 2, got {self.max_tokens}"),
            (finite(self.val_fraction) and 0 <= self.val_fraction < 0.5,
             f"--val-fraction must be in [0, 0.5), got {self.val_fraction}"),
            (self.limit is None,
             f"--limit counts samples; cut a language model's text with --max-tokens, got --limit {self.limit}"),
        ]


# ----------------------------------------------------------------------------- data


@dataclass
class TextData:
    """Token indices of the training text and of the held-out tail, with their vocabulary."""

    train: Tensor  # (n_train,)
    val: Tensor  # (n_val,)
    vocab: Vocab


def load_tokenizer(path: str | Path | None) -> Any | None:
    if path is None:
        return None
    from divekit.tokenizers import SentencePieceTokenizer

    return SentencePieceTokenizer.load(path)


def load_text(cfg: LMConfig, vocab: Vocab | None = None, tokenizer: Any | None = None) -> TextData:
    """Clean, tokenize and index the corpus; split off the last ``val_fraction`` as validation.
    ``vocab`` (a run's own) maps the tokens; without one it is built from the corpus."""
    lines = corpus_lines(cfg.data, data_dir=cfg.data_dir, download=cfg.download)
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
    return TextData(train, val, vocab)


class HeldOut:
    """The validation minibatches: the same partition of the held-out tail on every pass
    (epoch 0's), read whole by one process. It offers no ``shard``, so under data parallelism
    rank 0 validates alone and every process count gives the same perplexity."""

    def __init__(self, loader: SeqDataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.loader.set_epoch(0)
        return iter(self.loader)


# ----------------------------------------------------------------------------- the task


class LanguageModelTask(Task, name=TASK):
    """Next-token cross-entropy over every position of ``(B, T)`` minibatches.

    With sequential sampling the hidden state flows, detached, from one minibatch to the next
    (truncated backpropagation through time) and restarts at zero each epoch, so epochs — and an
    exact resume at an epoch boundary — do not depend on each other. With random sampling it
    starts at zero for every minibatch. A bidirectional model never carries it (its backward
    half would come from the wrong end). Validation carries its own state through the held-out
    tail, from zero each time. A "sample" in ``samples_per_s`` is one token.

    Checkpoints keep the carried state (:meth:`checkpoint_state`), so a mid-epoch
    ``--checkpoint-every`` resume continues it and is bit-identical too; with ``--nproc`` each
    rank's rows are saved and given back to that rank. An older checkpoint without it resumes
    mid-epoch with the state at zero.
    """

    Config = LMConfig
    config: LMConfig

    def __init__(self, config: LMConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        self.saved_vocab: Vocab | None = None  # a run's vocabulary (load_extras)
        self.state: State | None = None  # carried across training minibatches
        self.val_state: State | None = None  # carried across validation minibatches

    # ------------------------------------------------------------------ data, lazily
    @cached_property
    def tokenizer(self) -> Any | None:
        """The SentencePiece model (the run's copy once :meth:`load_extras` ran), or None."""
        return load_tokenizer(self.config.tokenizer)

    @cached_property
    def data(self) -> TextData:
        return load_text(self.config, self.saved_vocab, self.tokenizer)

    @property
    def vocab(self) -> Vocab:
        return self.saved_vocab if self.saved_vocab is not None else self.data.vocab

    @property
    def token_unit(self) -> str:
        return "sentencepiece" if self.tokenizer is not None else self.config.token

    @cached_property
    def carry(self) -> bool:
        """Whether the hidden state flows from one minibatch to the next."""
        options = model_info(self.config.model).model_options(self.config.model_options)
        return self.config.sampling == "sequential" and not options.get("bidirectional", False)

    # ------------------------------------------------------------------ the run directory
    def prepare(self) -> None:
        """A resumed run maps its text with the vocabulary (and tokenizer) it saved. The corpus
        is read here, so a bad one fails before a run directory is written."""
        cfg = self.config
        if cfg.resume:
            self.load_extras(choose_run_dir(cfg.out, cfg.run_name, resume=True))
        _ = self.data

    def run_record(self) -> dict[str, Any]:
        data = self.data
        return {"tokens": self.token_unit, "vocab_size": len(self.vocab),
                "train_tokens": len(data.train), "val_tokens": len(data.val)}

    def save_extras(self, run_dir: Any) -> None:
        atomic_write_json(Path(run_dir) / VOCAB_FILE, self.vocab.to_dict())
        if self.tokenizer is not None:
            atomic_write_bytes(Path(run_dir) / TOKENIZER_FILE, self.tokenizer.model_bytes)

    def load_extras(self, run_dir: Any) -> None:
        path = Path(run_dir) / VOCAB_FILE
        if not path.is_file():
            raise DivekitError(f"{run_dir} has no {VOCAB_FILE}; it cannot map text to the model's tokens")
        self.saved_vocab = Vocab.load(path)
        if (Path(run_dir) / TOKENIZER_FILE).is_file():  # the run's own copy
            self.tokenizer = load_tokenizer(Path(run_dir) / TOKENIZER_FILE)

    # ------------------------------------------------------------------ the seam
    def train_data(self) -> SeqDataLoader:
        cfg = self.config
        return SeqDataLoader(self.data.train, cfg.batch_size, cfg.num_steps, cfg.sampling, cfg.seed)

    def val_data(self) -> HeldOut | None:
        n, steps = len(self.data.val), self.config.num_steps
        if n == 0:
            return None
        if n <= steps:
            raise DivekitError(
                f"the validation tail holds {n} tokens, too few for --num-steps {steps}; raise "
                "--val-fraction or --max-tokens, or pass --val-fraction 0"
            )
        batch = min(self.config.batch_size, (n - 1) // steps)
        return HeldOut(SeqDataLoader(self.data.val, batch, steps, self.config.sampling,
                                     seed=self.config.seed))

    def build_model(self) -> nn.Module:
        info = model_info(self.config.model)
        return create_model(self.config.model, **info.model_options(self.config.model_options),
                            vocab_size=len(self.vocab))

    def batch_size(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()  # tokens

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.state = None

    def on_validation_start(self, model: nn.Module) -> None:
        self.val_state = None

    def _next_token_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], state: State | None,
                         reduction: str) -> tuple[Tensor, State | None]:
        X, Y = batch  # (B, T) each; Y is X shifted by one token
        logits, state = model(X, state if self.carry else None)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1),
                               reduction=reduction)
        return loss, detach_state(state) if self.carry else None

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, self.state = self._next_token_loss(model, batch, self.state, "mean")
        return loss, {"loss": loss.detach()}

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Any]:
        loss, self.val_state = self._next_token_loss(model, batch, self.val_state, "sum")
        return {"loss": loss.double(), "count": batch[1].numel()}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, float]:
        """Mean cross-entropy per token and perplexity ``exp(loss)`` on the held-out tail."""
        loss = float(sums.get("loss", 0.0)) / max(int(sums.get("count", 0)), 1)
        return {"loss": loss, "ppl": perplexity(loss)}

    def summarize(self, row: dict[str, Any]) -> dict[str, Any]:
        """Add the training perplexity ``exp(train_loss)`` next to the loss."""
        out: dict[str, Any] = {}
        for key, value in row.items():
            out[key] = value
            if key == "train_loss":
                out["train_ppl"] = perplexity(value)
        return out

    def on_evaluate(self, model: nn.Module, run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": float(len(self.data.val))}

    def checkpoint_state(self) -> dict[str, State] | None:
        """The carried hidden state for the checkpoint (``(layers, B, H)``, or the pair ``(h, c)``
        for an LSTM); ``None`` when nothing is carried (random sampling, bidirectional, or
        before the epoch's first step)."""
        if not self.carry or self.state is None:
            return None
        return {"hidden": self.state}

    def restore_checkpoint_state(self, model: nn.Module, saved: Any) -> None:
        """Continue from a checkpoint's hidden state, on ``model``'s device."""
        hidden = saved.get("hidden") if isinstance(saved, dict) and self.carry else None
        if hidden is None:
            self.state = None
            return
        device = module_device(model)
        if isinstance(hidden, tuple | list):
            self.state = tuple(h.to(device) for h in hidden)  # type: ignore[assignment]
        else:
            self.state = hidden.to(device)

    def predict(self, model: nn.Module, inputs: Any, **options: Any) -> list[dict[str, Any]]:
        raise DivekitError("a language model continues text rather than labelling inputs: "
                           "use `divekit generate RUN --prefix TEXT`")

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """``validation: loss 4.1234, perplexity 61.778 (20480 tokens)``."""
        return (f"validation: loss {metrics['loss']:.4f}, perplexity {metrics['ppl']:.3f} "
                f"({int(metrics['tokens'])} tokens)")

    def format_prediction(self, item: dict[str, Any]) -> str:
        """One generated text (``divekit generate`` prints it; ``predict`` refuses)."""
        return str(item["text"])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709


# ----------------------------------------------------------------------------- generation


def clean_prefix(prefix: str) -> str:
    """As the corpus was cleaned: lower case, every run of non-letters one space (ends kept)."""
    return re.sub("[^a-z]+", " ", prefix.lower())


def encode_prefix(prefix: str, task: LanguageModelTask) -> list[int]:
    """The prefix's token indices; tokens the vocabulary lacks are dropped, and a prefix with no
    known token at all is an error (the model would start from nothing)."""
    if not prefix:
        raise DivekitError("--prefix must not be empty: generation continues a given text")
    text, vocab, unit = clean_prefix(prefix), task.vocab, task.token_unit
    if task.tokenizer is not None:
        tokens = task.tokenizer.encode(text)
    else:
        tokens = tokenize(text, "char" if unit == "char" else "word")[0]
    known = [vocab[t] for t in tokens if t in vocab]
    if not text.strip() or not known:
        shown = "".join(t for t in vocab.idx_to_token[1:] if len(t) == 1) or "its vocabulary"
        raise DivekitError(
            f"the prefix {prefix!r} has no token the model knows (it was trained on "
            f"{unit} tokens of {shown!r}); use letters and spaces"
        )
    return known


def decode(indices: list[int], task: LanguageModelTask) -> str:
    tokens = task.vocab.to_tokens(indices)
    if task.tokenizer is not None:
        return task.tokenizer.decode(tokens)
    return "".join(tokens) if task.token_unit == "char" else " ".join(tokens)


MAX_LENGTH = 10_000  # tokens one `generate` call samples (one model step each)


def check_sampling(length: int, temperature: float, seed: int | None = 0) -> None:
    """``generate``'s options, checked before a run is opened (the CLI) and in ``generate``."""
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= MAX_LENGTH:
        raise DivekitError(f"--length must be a whole number in [0, {MAX_LENGTH}], got {length!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise DivekitError(f"--temperature must be a positive number, got {temperature}")
    if seed is not None and not 0 <= seed < 2**63:
        raise DivekitError(f"--seed must be in [0, 2^63), got {seed}")


@torch.no_grad()
def generate(run: Run, prefix: str, length: int = 50, *, temperature: float = 1.0,
             greedy: bool = False, seed: int | None = 0) -> str:
    """The prefix and ``length`` tokens continuing it, like the course's ``predict_ch8``, from an
    opened run (:func:`divekit.engine.run.load_run`).

    The prefix warms the hidden state up; then each step samples
    ``x_{t+1} ~ softmax(o_t / temperature)`` (``greedy``: ``argmax o_t``) and feeds it back.
    ``<unk>`` is never produced. A bidirectional model refuses: it needs the future.
    """
    task, model = run.task, run.model
    if not isinstance(task, LanguageModelTask) or model is None:
        raise DivekitError(f"{run.dir} is a {run.record.get('task')!r} run, not a language-model run")
    check_sampling(length, temperature, seed)
    if getattr(model, "bidirectional", False):
        raise DivekitError(
            f"{run.dir} holds a bidirectional model: it predicts each token from the text before "
            "and after it, and while generating there is no text after; train without "
            "--bidirectional to generate"
        )
    dev = module_device(model)
    ids = encode_prefix(prefix, task)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = model(torch.tensor([ids], device=dev))  # warm-up: (1, T, V)
    out: list[int] = []
    for _ in range(length):
        scores = logits[0, -1].float().cpu()
        scores[task.vocab.unk] = -math.inf
        if greedy:
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial((scores / temperature).softmax(0), 1, generator=g))
        out.append(token)
        logits, state = model(torch.tensor([[token]], device=dev), state)
    joiner = " " if task.token_unit == "word" and out else ""
    return clean_prefix(prefix) + joiner + decode(out, task)
