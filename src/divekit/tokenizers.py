"""Tokenizers: text to tokens and back, every kind divekit uses, in one module.

A tokenizer splits text into the units a model sees. Three families, from the course's first
one to BERT's:

* **words or characters** (:func:`tokenize`, :data:`TOKEN_MODES`): the course's "Text
  Preprocessing", ``line.split()`` or ``list(line)``; a :class:`divekit.data.text.Vocab` then
  numbers the tokens, and a word never seen in training becomes ``<unk>``;
* **SentencePiece subwords** (:class:`SentencePieceTokenizer`, :func:`train_tokenizer`): a
  unigram (Kudo, 2018) or BPE (Sennrich et al., 2016) model learns ``vocab_size`` pieces from a
  corpus; words are then split into pieces (``▁the``, ``▁time``, ``▁travel``, ``ler``), so no
  word is ever out of vocabulary and the vocabulary stays small. ``divekit tokenizer train``
  writes the model file; every text task takes it with ``--tokenizer PATH`` (needs the
  ``sentencepiece`` package, ``pip install divekit[text]``);
* **BERT's WordPiece** (:class:`BertTokenizer`): clean the text, split CJK characters,
  lower-case and strip accents (uncased models), split at whitespace and punctuation, then
  WordPiece (greedy longest match, ``##`` marks a word's continuation, a word that cannot be
  covered becomes ``[UNK]``). It runs on the ``tokenizers`` library and gives the ids of
  ``transformers.BertTokenizerFast``; ``vocab.txt`` and ``tokenizer_config.json`` are read and
  written as BERT checkpoints ship them (:mod:`divekit.models.bert_checkpoint`).

The module sits below :mod:`divekit.data` and :mod:`divekit.models` (it imports only
:mod:`divekit.io` and :mod:`divekit.errors`), so the datasets that tokenize a corpus and the
models that ship a vocabulary share one implementation.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from divekit.errors import DataNotFoundError, DivekitError
from divekit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object

TOKEN_MODES = ("word", "char")
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"  # BERT's special tokens
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)


# ----------------------------------------------------------------------------- words, characters
def tokenize(lines: Sequence[str] | str, token: str = "word") -> list[list[str]]:
    """Split each line into word tokens (``line.split()``) or character tokens (``list(line)``).

    A single string is treated as one line.
    """
    if token not in TOKEN_MODES:
        raise DivekitError(f"unknown token mode {token!r}; choose one of: {', '.join(TOKEN_MODES)}")
    if isinstance(lines, str):
        lines = [lines]
    if token == "word":
        return [line.split() for line in lines]
    return [list(line) for line in lines]


# ----------------------------------------------------------------------------- SentencePiece
MODEL_TYPES = ("unigram", "bpe", "char", "word")


def _spm() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise DivekitError(
            "SentencePiece tokenizers need the sentencepiece package: pip install sentencepiece "
            "(or pip install 'divekit[text]')"
        ) from None
    return sentencepiece


class SentencePieceTokenizer:
    """Encode text to pieces and decode pieces to text with a trained SentencePiece model."""

    def __init__(self, model_bytes: bytes, source: str = "<memory>"):
        spm = _spm()
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise DivekitError(f"{source} is not a SentencePiece model: {e}") from None
        self.model_bytes, self.source = model_bytes, source

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(
                f"tokenizer model {str(path)!r} does not exist; train one with "
                "`divekit tokenizer train --data NAME --vocab-size N -o tok.model`"
            )
        return cls(path.read_bytes(), str(path))

    def __len__(self) -> int:
        return int(self.processor.GetPieceSize())

    def encode(self, text: str) -> list[str]:
        """One line of text → its pieces (``'▁'`` marks a word start)."""
        return list(self.processor.EncodeAsPieces(text))

    def encode_lines(self, lines: Sequence[str]) -> list[list[str]]:
        """Like :func:`tokenize`: a list of pieces per line (one batched call)."""
        return [list(p) for p in self.processor.Encode(list(lines), out_type=str)]

    def decode(self, pieces: Sequence[str]) -> str:
        return str(self.processor.DecodePieces(list(pieces)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        atomic_write_bytes(path, self.model_bytes)
        return Path(path)


def train_tokenizer(
    lines: Sequence[str],
    vocab_size: int,
    *,
    model_type: str = "unigram",
) -> SentencePieceTokenizer:
    """Learn a SentencePiece model of ``vocab_size`` pieces from ``lines`` (in memory).

    ``character_coverage=1.0`` keeps every character of the text, so the pieces cover it all.
    """
    spm = _spm()
    if model_type not in MODEL_TYPES:
        raise DivekitError(f"unknown model type {model_type!r}; choose one of: {', '.join(MODEL_TYPES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise DivekitError(f"vocab_size must be an integer >= 4 (pieces beside <unk>, <s>, </s>), got {vocab_size!r}")
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DivekitError("cannot train a tokenizer on an empty corpus")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, num_threads=1,
            minloglevel=2, hard_vocab_limit=True,
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DivekitError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model: {message}") from None
    return SentencePieceTokenizer(buf.getvalue(), f"<{model_type} {vocab_size}>")


def parse_tokenizer_spec(spec: str) -> tuple[str, int] | None:
    """``"bpe:8000"`` → ``("bpe", 8000)`` (any of :data:`MODEL_TYPES`); ``None`` for anything
    else (then the spec names a model file). A malformed size raises :class:`DivekitError`."""
    kind, sep, size = spec.partition(":")
    if not sep or kind not in MODEL_TYPES:
        return None
    if not size.isdigit() or int(size) < 4:
        raise DivekitError(f"--tokenizer {spec!r}: the size after '{kind}:' must be a whole number "
                           "of pieces, at least 4 (e.g. bpe:8000)")
    return kind, int(size)


def tokenizer_from_spec(spec: str, lines: Sequence[str]) -> SentencePieceTokenizer:
    """``"bpe:N"`` / ``"unigram:N"``: a model of N pieces trained on ``lines``; otherwise the
    path of a trained SentencePiece model file."""
    parsed = parse_tokenizer_spec(spec)
    if parsed is None:
        return SentencePieceTokenizer.load(spec)
    return train_tokenizer(lines, parsed[1], model_type=parsed[0])


# ----------------------------------------------------------------------------- BERT's WordPiece
def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DivekitError("BERT tokenizers need the tokenizers package: pip install tokenizers") from None
    return tokenizers


class BertTokenizer:
    """BERT's WordPiece tokenizer over ``vocab`` (a list of tokens; index = id).

    ``encode(text, pair=None) → (token_ids, segment_ids)`` with ``[CLS]`` and ``[SEP]``;
    a text longer than ``max_len`` tokens is cut (the longer of a pair first) with a warning.
    """

    def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, max_len: int = 512):
        tk = _tokenizers()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise DivekitError(f"vocabulary lacks the special token(s) {', '.join(missing)}")
        self.vocab = list(vocab)
        self.token_to_id = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            dup = next(t for t, n in Counter(self.vocab).items() if n > 1)
            raise DivekitError(f"vocabulary has the token {dup!r} twice")
        self.lowercase, self.max_len = lowercase, max_len
        model = tk.models.WordPiece(self.token_to_id, unk_token=UNK, max_input_chars_per_word=100)
        self.backend = tk.Tokenizer(model)
        self.backend.normalizer = tk.normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        self.backend.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        self.backend.add_special_tokens(list(SPECIAL_TOKENS))
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> list[int]:
        return [self.token_to_id[t] for t in SPECIAL_TOKENS]

    # -- encoding
    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids of each text, without special tokens (batched in the backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
        """``([CLS] a [SEP] (b [SEP]), segments)`` for one text or a pair."""
        return self.encode_batch([text], None if pair is None else [pair])[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None
                     ) -> list[tuple[list[int], list[int]]]:
        for t in [*texts, *(pairs or [])]:
            if not isinstance(t, str) or not t.strip():
                raise DivekitError(f"cannot encode an empty text ({t!r}); give at least one word")
        if pairs is not None and len(pairs) != len(texts):
            raise DivekitError(f"{len(texts)} texts but {len(pairs)} pair texts")
        a_ids = self.ids(texts)
        b_ids: list[list[int] | None] = list(self.ids(pairs)) if pairs is not None else [None] * len(a_ids)
        out = []
        cut: list[tuple[str, int]] = []  # (text, tokens) of each text cut: one warning for all
        for text, a, b in zip(texts, a_ids, b_ids):
            if not a or (b is not None and not b):
                raise DivekitError(f"text {text[:40]!r} has no tokens after cleaning")
            total = len(a) + (len(b) if b is not None else 0)
            a, b = self._truncate(a, b)
            if len(a) + (len(b) if b is not None else 0) < total:
                cut.append((text, total))
            tokens = [self.cls_id, *a, self.sep_id] + ([*b, self.sep_id] if b is not None else [])
            segments = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
            out.append((tokens, segments))
        if cut:  # one warning per call, however many texts (hundreds were printed one by one)
            (text, total), more = cut[0], len(cut) - 1
            others = f" and {more} more text(s) were" if more else " was"
            warnings.warn(f"text {text[:40]!r}... ({total} tokens){others} truncated to max_len "
                          f"{self.max_len}", stacklevel=3)
        return out

    def _truncate(self, a: list[int], b: list[int] | None) -> tuple[list[int], list[int] | None]:
        budget = self.max_len - (3 if b is not None else 2)
        total = len(a) + (len(b) if b is not None else 0)
        if total <= budget:
            return a, b
        if b is None:
            return a[:budget], None
        la, lb = len(a), len(b)  # longest first: cut the longer one until both fit
        la2 = min(la, max(budget - lb, budget - budget // 2))
        return a[:la2], b[: budget - la2]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.vocab[int(i)] for i in ids]

    # -- files
    def save(self, directory: str | Path) -> None:
        """``vocab.txt`` (one token a line) and ``tokenizer_config.json``, as BERT ships them."""
        directory = Path(directory)
        atomic_write_text(directory / "vocab.txt", "".join(t + "\n" for t in self.vocab))
        atomic_write_json(directory / "tokenizer_config.json", {
            "do_lower_case": self.lowercase, "model_max_length": self.max_len,
            "tokenizer_class": "BertTokenizer", "unk_token": UNK, "sep_token": SEP,
            "pad_token": PAD, "cls_token": CLS, "mask_token": MASK})

    @classmethod
    def load(cls, directory: str | Path, max_len: int = 512) -> BertTokenizer:
        directory = Path(directory)
        path = directory / "vocab.txt"
        if not path.is_file():
            raise DataNotFoundError(f"{directory}: missing vocab.txt (the WordPiece vocabulary)")
        vocab = path.read_text(encoding="utf-8").split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        lowercase = True
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = read_json_object(cfg_path)
            lowercase = bool(cfg.get("do_lower_case", True))
            limit = cfg.get("model_max_length")
            if isinstance(limit, int) and 0 < limit < max_len:
                max_len = limit
        return cls(vocab, lowercase=lowercase, max_len=max_len)

    # -- vocabularies from a corpus
    @classmethod
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                        max_len: int = 512) -> BertTokenizer:
        """A WordPiece vocabulary of ``vocab_size`` learned from ``texts`` (``tokenizers``)."""
        tk = _tokenizers()
        backend = tk.Tokenizer(tk.models.WordPiece(unk_token=UNK))
        backend.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                               show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        vocab = sorted(backend.get_vocab().items(), key=lambda kv: kv[1])
        return cls([tok for tok, _ in vocab], lowercase=lowercase, max_len=max_len)

    @classmethod
    def word_level(cls, texts: Iterable[str], min_freq: int = 5, *, lowercase: bool = True,
                   max_len: int = 512) -> BertTokenizer:
        """The course's vocabulary: every word seen ``min_freq`` times, most frequent first
        (words split as BERT splits them); any other word becomes ``[UNK]``."""
        tk = _tokenizers()
        normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
        pre = tk.pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        words = [w for w, n in sorted(counts.items(), key=lambda kv: -kv[1])
                 if n >= min_freq and w not in SPECIAL_TOKENS]
        return cls([*SPECIAL_TOKENS, *words], lowercase=lowercase, max_len=max_len)
