"""The data of BERT's fine-tuning tasks in their real formats, read from ``--data-dir``.

* SNLI (``snli_1.0_{train,dev}.jsonl``): ``sentence1``, ``sentence2``, ``gold_label``; an
  example whose annotators did not agree (``gold_label`` ``-``) is skipped and counted.
* GLUE-style TSV (``train.tsv``/``dev.tsv`` with a header: ``sst2``, ``rte``, ``qnli``,
  ``mnli``), or any CSV/TSV as ``csv:PATH`` with ``--text-columns a[,b] --label-column c``
  (a file: its last tenth is held out; a folder: its ``train`` and ``dev`` files).
* CoNLL-2003 (``train.txt``/``valid.txt`` or ``eng.train``/``eng.testa``): one token a line
  with POS, chunk and NER columns; ``-DOCSTART-`` lines; a blank line ends a sentence.
* SQuAD v1.1 (``train-v1.1.json``/``dev-v1.1.json``): every ``answer_start`` is checked
  against its answer text.

Every reader returns a :class:`TextTaskData`; the generated offline tasks are in
:mod:`divekit.data.text_generated`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from divekit.errors import DataNotFoundError, DivekitError


@dataclass
class TextExample:
    """One text (or pair) and its label: ``classify`` and ``pair``."""

    text: str
    label: str
    pair: str | None = None


@dataclass
class TaggedSentence:
    """Words and one tag per word (``B-PER``, ``I-LOC``, ``O``): ``tag``."""

    words: list[str]
    tags: list[str]


@dataclass
class QAExample:
    """A question on a passage and its gold answers (text and character start): ``qa``."""

    id: str
    question: str
    context: str
    answers: list[str]
    starts: list[int]


@dataclass
class TextTaskData:
    """A task's two splits, its label names (none for QA) and notes (skipped examples)."""

    kind: str  # classify | pair | tag | qa
    train: list[Any]
    valid: list[Any]
    labels: list[str]
    notes: dict[str, Any] = field(default_factory=dict)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found: {what}")
    return path


def _first(data_dir: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataNotFoundError(f"{data_dir} holds none of {', '.join(names)} ({what})")


def _data_dir(data_dir: str | Path | None, name: str) -> Path:
    if data_dir is None:
        raise DataNotFoundError(f"--data {name} reads its files from --data-dir DIR "
                                "(no download for it; the generated tasks work offline)")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"--data-dir {str(data_dir)!r} is not a folder")
    return path


# ----------------------------------------------------------------------------- SNLI
def read_snli_file(path: Path) -> tuple[list[TextExample], int]:
    """The labelled pairs of one SNLI jsonl file and the number skipped for lacking a gold label."""
    out, skipped = [], 0
    with _need(path, "an SNLI jsonl file").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label, a, b = row["gold_label"], row["sentence1"], row["sentence2"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DivekitError(f"{path}:{n}: not an SNLI record ({e})") from None
            if label not in ("entailment", "contradiction", "neutral") or not a.strip() or not b.strip():
                skipped += 1
                continue
            out.append(TextExample(a, label, b))
    return out, skipped


def load_snli(data_dir: str | Path | None = None, **_: Any) -> TextTaskData:
    root = _data_dir(data_dir, "snli")
    train, s1 = read_snli_file(root / "snli_1.0_train.jsonl")
    valid, s2 = read_snli_file(root / "snli_1.0_dev.jsonl")
    return TextTaskData("pair", train, valid, ["contradiction", "entailment", "neutral"],
                        {"skipped_no_gold_label": s1 + s2})


# ----------------------------------------------------------------------------- CSV / TSV
def read_table(path: Path, text_columns: list[str], label_column: str | None) -> list[TextExample]:
    """Rows of a CSV (``,``) or TSV (``.tsv``: tab, no quoting, as GLUE) file with a header;
    ``label_column=None`` reads the texts only (label ``""``)."""
    try:
        return _read_table(path, text_columns, label_column)
    except csv.Error as e:  # a field over csv's 128 KB limit, a NUL byte, a broken quote
        raise DivekitError(f"{path} is not a CSV/TSV file divekit can read: {e}") from None
    except UnicodeDecodeError as e:
        raise DivekitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_table(path: Path, text_columns: list[str], label_column: str | None
                ) -> list[TextExample]:
    tsv = path.suffix.lower() == ".tsv"
    with _need(path, "a CSV/TSV file").open(encoding="utf-8", newline="") as f:
        reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f))
        try:
            header = next(reader)
        except StopIteration:
            raise DivekitError(f"{path} is empty (expected a header row)") from None
        wanted = [*text_columns, *([label_column] if label_column is not None else [])]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DivekitError(f"{path} has no column {', '.join(missing)}; its columns are "
                               f"{', '.join(header)}")
        idx = [header.index(c) for c in wanted]
        out = []
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise DivekitError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            values = [row[i] for i in idx]
            pair = values[1] if len(text_columns) == 2 else None
            label = values[-1].strip() if label_column is not None else ""
            out.append(TextExample(values[0], label, pair))
    return out


def _table_data(train: list[TextExample], valid: list[TextExample], notes: dict[str, Any]) -> TextTaskData:
    if not train:
        raise DivekitError(f"{notes.get('source')}: no training rows")
    kind = "pair" if train[0].pair is not None else "classify"
    return TextTaskData(kind, train, valid, sorted({e.label for e in train}), notes)


def load_csv(spec: str, text_columns: list[str], label_column: str) -> TextTaskData:
    """``csv:PATH``: a file (its last tenth held out) or a folder with train/dev files."""
    if not 1 <= len(text_columns) <= 2:
        raise DivekitError(f"--text-columns takes one or two columns, got {','.join(text_columns)!r}")
    path = Path(spec.removeprefix("csv:")).expanduser()
    if path.is_dir():
        train_path = _first(path, ["train.tsv", "train.csv"], "the training rows")
        dev_path = _first(path, ["dev.tsv", "dev.csv", "valid.tsv", "valid.csv"], "the held-out rows")
        return _table_data(read_table(train_path, text_columns, label_column),
                           read_table(dev_path, text_columns, label_column), {"source": str(path)})
    rows = read_table(path, text_columns, label_column)
    cut = len(rows) - max(1, len(rows) // 10)
    return _table_data(rows[:cut], rows[cut:], {"source": str(path)})


# name: (text columns, label column, held-out file)
GLUE = {
    "sst2": (["sentence"], "label", "dev.tsv"),
    "rte": (["sentence1", "sentence2"], "label", "dev.tsv"),
    "qnli": (["question", "sentence"], "label", "dev.tsv"),
    "mnli": (["sentence1", "sentence2"], "gold_label", "dev_matched.tsv"),
}


def load_glue(name: str, data_dir: str | Path | None = None, **_: Any) -> TextTaskData:
    root = _data_dir(data_dir, name)
    cols, label, dev = GLUE[name]
    return _table_data(read_table(root / "train.tsv", cols, label), read_table(root / dev, cols, label),
                       {"source": str(root)})


# ----------------------------------------------------------------------------- CoNLL-2003
def read_conll(path: Path, columns: int = 4) -> list[TaggedSentence]:
    """Sentences of a CoNLL-2003 file: the first column is the word, the last the NER tag."""
    sentences, words, tags = [], [], []
    with _need(path, "a CoNLL-2003 file").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append(TaggedSentence(words, tags))
                words, tags = [], []
                continue
            if len(parts) != columns:
                raise DivekitError(f"{path}:{n}: {len(parts)} columns, expected {columns} "
                                   "(token, POS, chunk, NER)")
            tag = parts[-1]
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise DivekitError(f"{path}:{n}: NER tag {tag!r} is not O, B-TYPE or I-TYPE")
            words.append(parts[0])
            tags.append(tag)
    if words:
        sentences.append(TaggedSentence(words, tags))
    return sentences


def guess_scheme(sentences: list[TaggedSentence]) -> str:
    """``iob1`` when some entity opens with ``I-`` (CoNLL-2003's original files), else ``iob2``."""
    for s in sentences:
        prev = "O"
        for t in s.tags:
            if t.startswith("I-") and (prev == "O" or prev[2:] != t[2:]):
                return "iob1"
            prev = t
    return "iob2"


def tag_labels(sentences: list[TaggedSentence]) -> list[str]:
    return sorted({t for s in sentences for t in s.tags}, key=lambda t: (t != "O", t[2:], t))


def load_conll(data_dir: str | Path | None = None, **_: Any) -> TextTaskData:
    root = _data_dir(data_dir, "conll2003")
    train = read_conll(_first(root, ["train.txt", "eng.train"], "the training sentences"))
    valid = read_conll(_first(root, ["valid.txt", "eng.testa", "dev.txt"], "the held-out sentences"))
    return TextTaskData("tag", train, valid, tag_labels(train + valid),
                        {"scheme": guess_scheme(train)})


# ----------------------------------------------------------------------------- SQuAD v1.1
def read_squad(path: Path) -> list[QAExample]:
    try:
        doc = json.loads(_need(path, "a SQuAD v1.1 JSON file").read_text(encoding="utf-8"))
        articles = doc["data"]
    except UnicodeDecodeError as e:  # UTF-16 or binary: one line, as the other readers say it
        raise DivekitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DivekitError(f"{path} is not SQuAD v1.1 JSON ({e})") from None
    out = []
    for article in articles:
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                texts, starts = [], []
                for ans in qa["answers"]:
                    text, start = ans["text"], int(ans["answer_start"])
                    if context[start : start + len(text)] != text:
                        found = context[start : start + len(text)]
                        raise DivekitError(f"{path}: question {qa['id']}: answer_start {start} "
                                           f"points at {found!r}, not the answer {text!r}")
                    texts.append(text)
                    starts.append(start)
                if texts:
                    out.append(QAExample(str(qa["id"]), qa["question"], context, texts, starts))
    return out


def load_squad(data_dir: str | Path | None = None, **_: Any) -> TextTaskData:
    root = _data_dir(data_dir, "squad")
    return TextTaskData("qa", read_squad(root / "train-v1.1.json"), read_squad(root / "dev-v1.1.json"), [])


REAL = {"snli": load_snli, "conll2003": load_conll, "squad": load_squad,
        **{name: (lambda n: lambda **kw: load_glue(n, **kw))(name) for name in GLUE}}
KIND_OF_REAL = {"snli": "pair", "conll2003": "tag", "squad": "qa", "sst2": "classify",
                "rte": "pair", "qnli": "pair", "mnli": "pair"}

__all__ = ["GLUE", "QAExample", "TaggedSentence", "TextExample", "TextTaskData", "guess_scheme",
           "load_conll", "load_csv", "load_glue", "load_snli", "load_squad", "read_conll",
           "read_snli_file", "read_squad", "read_table"]
