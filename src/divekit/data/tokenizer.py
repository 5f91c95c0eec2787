"""SentencePiece subword tokenizers, the second option beside ``tokenize(lines, 'word'|'char')``.

A unigram (Kudo, 2018) or BPE (Sennrich et al., 2016) model learns ``vocab_size`` pieces from a
corpus; words are then split into pieces (``▁the``, ``▁time``, ``▁travel``, ``ler``), so no word
is ever out of vocabulary and the vocabulary stays small. ``divekit tokenizer train`` writes the
model file; every text task takes it with ``--tokenizer PATH``.

Needs the ``sentencepiece`` package (``pip install divekit[text]``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from divekit.errors import DataNotFoundError, DivekitError

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
        """Like :func:`divekit.data.text.tokenize`: a list of pieces per line (one batched call)."""
        return [list(p) for p in self.processor.Encode(list(lines), out_type=str)]

    def decode(self, pieces: Sequence[str]) -> str:
        return str(self.processor.DecodePieces(list(pieces)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        from divekit.io import atomic_write_bytes

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
