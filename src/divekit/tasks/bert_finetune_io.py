"""Helpers of the text fine-tuning task: the domain vocabulary and the inputs of ``predict``.

Domain vocabulary (the course's "adjust the tokenizer"): every added word becomes one vocabulary
entry, so WordPiece's greedy longest match takes it whole; a word that BERT's pre-tokenizer would
cut at punctuation (``covid-19``) is also registered with the backend as an added token, which
is matched before pre-tokenization. Words already in the vocabulary are skipped and returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from divekit.errors import DivekitError
from divekit.tokenizers import BertTokenizer, _tokenizers

SEPARATOR = "|||"
# the longest input ``predict`` takes, in characters (a text, or a QA passage given inline or as
# @FILE, which is read no further): about 250,000 tokens, some 3,000 windows of --max-len 128
# that run 32 at a time (a 50 MB passage took 6 GB and timed out)
MAX_INPUT_CHARS = 1_000_000


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


def table_inputs(path: Path, text_columns: Sequence[str], label_column: str,
                 known: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
    """``(a, b or None, gold label or None)`` for every row of a CSV/TSV file with the run's
    text columns. When the file has the run's label column, every label must be one the run was
    trained on: an unseen one is refused in one line that lists the known labels."""
    from divekit.data.text_features import label_ids
    from divekit.data.text_tasks import read_table

    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t" if path.suffix.lower() == ".tsv" else ",")
    labelled = label_column in [h.strip().strip('"') for h in header]
    rows = read_table(path, list(text_columns), label_column if labelled else None)
    if not rows:
        raise DivekitError(f"{path} has no rows to predict on")
    if labelled:
        label_ids([r.label for r in rows], known, f"{path} (column {label_column!r})")
    return [(r.text, r.pair, r.label if labelled else None) for r in rows]


def predict_inputs(inputs: Any, task: str, columns: tuple[Sequence[str], str] | None = None,
                   known: Sequence[str] = ()) -> list[Any]:
    """The inputs of ``divekit predict`` by head: a text; ``A ||| B`` for a pair; a sentence
    (split into words) for tagging; ``QUESTION ||| PASSAGE`` for QA (``@FILE`` reads a passage).
    For ``classify`` and ``pair`` a ``.csv``/``.tsv`` file names its rows (``columns``: the run's
    text columns and label column; see :func:`table_inputs`); such items carry a third element,
    the gold label (None for text given on the command line or a file without labels)."""
    if isinstance(inputs, str) or not inputs:
        raise DivekitError("give a non-empty list of texts to predict on")
    out: list[Any] = []
    for text in inputs:
        if not isinstance(text, str) or not text.strip():
            raise DivekitError(f"cannot predict on an empty text ({text!r})")
        if len(text) > MAX_INPUT_CHARS:
            raise DivekitError(f"an input of {len(text):,} characters is over the limit of "
                               f"{MAX_INPUT_CHARS:,} ({text[:40]!r}...)")
        path = Path(text)
        if (task in ("classify", "pair") and columns is not None
                and path.suffix.lower() in (".csv", ".tsv") and path.is_file()):
            out.extend(table_inputs(path, columns[0], columns[1], known))
            continue
        _refuse_file_name(text, task)
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
                b = _read_passage(path)
            out.append((a.strip(), b))
        elif task == "tag":
            from tokenizers.pre_tokenizers import BertPreTokenizer

            out.append([w for w, _ in BertPreTokenizer().pre_tokenize_str(text)])
        else:
            out.append((text.strip(), None))
    if task in ("classify", "pair"):
        out = [item if len(item) == 3 else (*item, None) for item in out]
    return out


FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".bin", ".npy", ".pt", ".gz")


def _refuse_file_name(text: str, task: str) -> None:
    """A file's name given where a text is expected is refused, not classified as a sentence:
    an existing file other than a ``.csv``/``.tsv`` table (those only for classify and pair),
    or a single word that ends like a file name and names nothing."""
    if len(text) > 1024 or any(c in text for c in "\n\0") or SEPARATOR in text:
        return
    path = Path(text)
    try:
        exists = path.is_file()
    except OSError:
        return
    tables = "a .csv or .tsv file of texts, or " if task in ("classify", "pair") else ""
    if exists:
        raise DivekitError(f"{text!r} is a file; predict on a {task} run takes {tables}the "
                           "texts themselves")
    if " " not in text.strip() and path.suffix.lower() in FILE_SUFFIXES:
        raise DivekitError(f"{text!r} looks like a file name but there is no such file; "
                           f"predict on a {task} run takes {tables}the texts themselves")


def _read_passage(path: Path) -> str:
    """A QA passage file's text, read no further than :data:`MAX_INPUT_CHARS` (one more
    character tells that it is longer: refused in one line)."""
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(MAX_INPUT_CHARS + 1)
    except UnicodeDecodeError as e:
        raise DivekitError(f"passage file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    except OSError as e:
        raise DivekitError(f"passage file {str(path)!r} cannot be read: {e.strerror}") from None
    if len(text) > MAX_INPUT_CHARS:
        raise DivekitError(f"passage file {str(path)!r} is longer than the limit of "
                           f"{MAX_INPUT_CHARS:,} characters")
    return text.strip()


__all__ = ["MAX_INPUT_CHARS", "SEPARATOR", "add_words", "predict_inputs", "read_words", "table_inputs"]
