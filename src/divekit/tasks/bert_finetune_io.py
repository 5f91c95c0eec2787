"""Helpers of the text fine-tuning task: the domain vocabulary and the inputs of ``predict``.

Domain vocabulary (the course's "adjust the tokenizer"): every added word becomes one vocabulary
entry, so WordPiece's greedy longest match takes it whole; a word that BERT's pre-tokenizer would
cut at punctuation (``covid-19``) is also registered with the backend as an added token, which
is matched before pre-tokenization. Words already in the vocabulary are skipped and returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from divekit.errors import DivekitError
from divekit.models.bert_checkpoint import BertTokenizer, _tokenizers

SEPARATOR = "|||"


def read_words(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 file, one word each (no white space inside)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DivekitError(f"--add-tokens {str(path)!r} cannot be read as UTF-8 text: {e}") from None
    words = [ln.strip() for ln in lines if ln.strip()]
    spaced = [w for w in words if len(w.split()) > 1]
    if spaced:
        raise DivekitError(f"--add-tokens {str(path)!r}: {spaced[0]!r} is not one word (one word a line)")
    if not words:
        raise DivekitError(f"--add-tokens {str(path)!r} holds no words")
    return words


def add_words(tok: BertTokenizer, words: list[str]) -> tuple[BertTokenizer, list[str], list[str]]:
    """``(tokenizer with the words, words added, words skipped as already known)``."""
    seen, added, skipped = set(tok.vocab), [], []
    for word in words:
        w = word.lower() if tok.lowercase else word
        if w in seen:
            skipped.append(w)
            continue
        seen.add(w)
        added.append(w)
    new = BertTokenizer([*tok.vocab, *added], lowercase=tok.lowercase, max_len=tok.max_len)
    pre = new.backend.pre_tokenizer
    split = [w for w in added if len(pre.pre_tokenize_str(w)) > 1]
    if split:
        tk = _tokenizers()
        new.backend.add_tokens([tk.AddedToken(w, single_word=True, normalized=True) for w in split])
    return new, added, skipped


def predict_inputs(inputs: Any, task: str) -> list[Any]:
    """The inputs of ``divekit predict`` by head: a text; ``A ||| B`` for a pair; a sentence
    (split into words) for tagging; ``QUESTION ||| PASSAGE`` for QA (``@FILE`` reads a passage)."""
    if isinstance(inputs, str) or not inputs:
        raise DivekitError("give a non-empty list of texts to predict on")
    out: list[Any] = []
    for text in inputs:
        if not isinstance(text, str) or not text.strip():
            raise DivekitError(f"cannot predict on an empty text ({text!r})")
        if task in ("pair", "qa"):
            a, sep, b = text.partition(SEPARATOR)
            if not sep or not a.strip() or not b.strip():
                what = "PREMISE ||| HYPOTHESIS" if task == "pair" else "QUESTION ||| PASSAGE"
                raise DivekitError(f"a {task} input is {what}, got {text[:60]!r}")
            b = b.strip()
            if task == "qa" and b.startswith("@"):
                path = Path(b[1:])
                if not path.is_file():
                    raise DivekitError(f"passage file {b[1:]!r} not found")
                b = path.read_text(encoding="utf-8").strip()
            out.append((a.strip(), b))
        elif task == "tag":
            from tokenizers.pre_tokenizers import BertPreTokenizer

            out.append([w for w, _ in BertPreTokenizer().pre_tokenize_str(text)])
        else:
            out.append((text.strip(), None))
    return out


__all__ = ["SEPARATOR", "add_words", "predict_inputs", "read_words"]
