"""The machine-translation data pipeline (the course's "Machine Translation and the Dataset").

English→French pairs, one ``English<TAB>French`` line each, become padded index arrays:

* readers: :func:`read_fra_eng` (Tatoeba's ``fra.txt``: a data folder, the cache or a verified
  download) and :func:`numbers_fr` (generated number phrases, offline);
* :func:`preprocess_nmt` and :func:`tokenize_nmt`: the course's cleaning and word splitting;
* :func:`truncate_pad` and :func:`build_array`: the course's ``truncate_pad`` and
  ``build_array_nmt``, vectorised;
* :func:`load_translation`: vocabularies and train/validation arrays in a :class:`TranslationData`.

A minibatch (from :meth:`TranslationData.train_loader`) is ``(src, src_valid_len, tgt,
tgt_valid_len)``: ``src``/``tgt`` are ``(B, num_steps)`` int64 with ``<eos>`` after each sentence
and ``<pad>`` after that, the valid lengths ``(B,)`` int64 count ``<eos>``. The decoder's input
under teacher forcing is ``<bos>`` followed by ``tgt[:, :-1]`` (:func:`decoder_inputs`); the
labels are ``tgt`` itself.

Differences from the course, on purpose:

* lines with a third column (newer Tatoeba exports add ``CC-BY 2.0 ... Attribution``) keep their
  first two columns; the course's ``len(parts) == 2`` would drop every one of them;
* ``max_examples`` means the first ``max_examples`` pairs (the course reads one line more);
* the vocabularies are built on the training split only (see :func:`load_translation`);
* ``valid_len`` is ``min(len + 1, num_steps)``: the course counts non-``<pad>`` entries, which is
  the same unless the text itself holds the token ``<pad>``.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from divekit import hub
from divekit.data.loader import TensorBatchLoader
from divekit.data.numbers_fr import NUMBERS_FR_SIZE, numbers_fr
from divekit.data.registry import register_dataset
from divekit.data.text import Vocab
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError
from divekit.tokenizers import tokenizer_from_spec

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
RESERVED_TOKENS = (PAD, BOS, EOS)  # after <unk>: indices 1, 2, 3, as in the course

FRA_ENG_FILE = "fra.txt"
FRA_ENG_FOLDER = "fra-eng"
FRA_ENG_ARCHIVE = "fra-eng.zip"


# ----------------------------------------------------------------------------- reading fra-eng


def read_fra_eng(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> str:
    """The raw text of Tatoeba's ``fra.txt`` (167,130 English→French pairs in the course's copy).

    Looked for in ``data_dir`` (as ``fra.txt``, ``fra-eng/fra.txt`` or ``fra-eng.zip``, which is
    unpacked beside itself), then in :func:`~divekit.hub.data_home` the same way. With
    ``download`` the hub's ``fra-eng`` archive is fetched (sha1-checked) into ``data_dir`` or the
    cache and unpacked. Files given by the user are trusted as they are.
    """
    path = find_fra_eng(data_dir, download)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DivekitError(f"{str(path)!r} is not UTF-8 text: {e}") from None


def find_fra_eng(data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The path of ``fra.txt`` (see :func:`read_fra_eng`), unpacking or downloading if needed."""
    roots = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DataNotFoundError(
                f"fra-eng: data folder {str(data_dir)!r} does not exist or is not a folder"
            )
        roots.append(Path(data_dir))
    roots.append(hub.data_home())
    for root in roots:
        for path in (root / FRA_ENG_FILE, root / FRA_ENG_FOLDER / FRA_ENG_FILE):
            if path.is_file():
                return path
        if (root / FRA_ENG_ARCHIVE).is_file():
            return _unpack_fra_eng(root / FRA_ENG_ARCHIVE, root)
    if download:  # into data_dir when given, as hub.locate does
        return _unpack_fra_eng(hub.download("fra-eng", roots[0]), roots[0])
    url, sha1 = hub.DATA_HUB["fra-eng"]
    looked = ", ".join(
        str(r / n)
        for r in roots
        for n in (FRA_ENG_FILE, FRA_ENG_FOLDER + "/" + FRA_ENG_FILE, FRA_ENG_ARCHIVE)
    )
    raise DataNotFoundError(
        f"fra-eng: {FRA_ENG_FILE!r} not found (looked for {looked}); download {url} (sha1 {sha1}) "
        f"and put it in {str(roots[0])!r}, or pass download=True (--download), or pass "
        f"data_dir=DIR (--data-dir DIR) for a folder that holds {FRA_ENG_FILE}, "
        f"{FRA_ENG_FOLDER}/{FRA_ENG_FILE} or {FRA_ENG_ARCHIVE}"
    )


def _unpack_fra_eng(archive: Path, root: Path) -> Path:
    """Unpack ``archive`` safely into ``root/fra-eng``; the path of its ``fra.txt``.

    The archive goes to a temporary folder first and its files are moved into place after, so an
    interrupted unpacking never leaves a truncated ``fra.txt`` that would later look complete.
    """
    try:
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".fra-eng."))
    except OSError as e:
        raise DivekitError(f"cannot unpack {str(archive)!r} in {str(root)!r}: {e}") from None
    try:
        hub.extract(archive, tmp)
        inner = next(
            (p for p in (tmp / FRA_ENG_FOLDER / FRA_ENG_FILE, tmp / FRA_ENG_FILE) if p.is_file()),
            None,
        )
        if inner is None:
            raise DataNotFoundError(f"{str(archive)!r} holds no {FRA_ENG_FOLDER}/{FRA_ENG_FILE}")
        dest = root / FRA_ENG_FOLDER
        dest.mkdir(exist_ok=True)
        for item in inner.parent.iterdir():
            if item.is_file():
                os.replace(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / FRA_ENG_FILE


# ----------------------------------------------------------------------------- preprocessing


def preprocess_nmt(text: str) -> str:
    """The course's cleaning: non-breaking spaces (U+202F, U+00A0) become spaces, letters are
    lower-cased, and a space is put before each of ``,.!?`` whose previous character is not a
    space (the first character of the text has none).

    Done with C-speed ``bytes.replace`` on the UTF-8 bytes (over 10x faster than the course's
    character loop): a space or ASCII punctuation byte never occurs inside a multi-byte UTF-8 character,
    so "previous byte" and "previous character" agree. ``" ,"`` pairs are parked on a byte that
    is not in the text while every other ``","`` gets its space.
    """
    text = text.replace("\u202f", " ").replace("\xa0", " ").lower()
    data = text.encode("utf-8")
    park = next((bytes([b]) for b in range(32) if bytes([b]) not in data), None)
    if park is None:  # every control byte occurs: the plain regex, same result
        return re.sub(r"(?<=[^ ])(?=[,.!?])", " ", text)
    data = b" " + data  # the first character has no previous one: it gets no space either
    for mark in (b",", b".", b"!", b"?"):
        data = data.replace(b" " + mark, park).replace(mark, b" " + mark).replace(park, b" " + mark)
    return data[1:].decode("utf-8")


# Whitespace that str.split() splits on but the course's split(' ') does not (tab and newline
# separate columns and lines first): every other character with str.isspace(). fra.txt has 89
# thin spaces (U+2009) that the course keeps inside words ('recule\u2009').
_OTHER_SPACES = (
    "\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _split_on_spaces(s: str) -> list[str]:
    """The course's word split: on single spaces, empty tokens dropped."""
    return [t for t in s.split(" ") if t]


def _lines_with_other_space(text: str) -> set[int]:
    """Indices of the lines (``text.split("\\n")``) where ``str.split()`` is not the course's
    split: one C-speed ``str.find`` scan per kind of space (a regex class is 3x slower)."""
    positions = []
    for space in _OTHER_SPACES:
        pos = text.find(space)
        while pos >= 0:
            positions.append(pos)
            pos = text.find(space, pos + 1)
    lines: set[int] = set()
    line, last = 0, 0
    for pos in sorted(positions):
        line += text.count("\n", last, pos)
        last = pos
        lines.add(line)
    return lines


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building ~10^5 lists of ~10^6 strings would trigger many full cyclic collections (none
    of which frees anything); pausing the collector halves the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tokenize_nmt(
    text: str, max_examples: int | None = None
) -> tuple[list[list[str]], list[list[str]]]:
    """Source and target token lists of the first ``max_examples`` pairs (all when ``None``).

    Each line is ``source<TAB>target[<TAB>anything]``; a line without a tab is skipped. Words
    are separated by single spaces and empty words dropped, as in the course (run
    :func:`preprocess_nmt` first so that punctuation marks are tokens of their own). The C-speed
    ``str.split()`` does this for every line that holds no other whitespace character.
    """
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise DivekitError(
            f"max_examples must be a positive number of pairs or None, got {max_examples!r}"
        )
    slow = _lines_with_other_space(text)
    src: list[list[str]] = []
    tgt: list[list[str]] = []
    limit = max_examples if max_examples is not None else -1
    with _gc_paused():
        for i, line in enumerate(text.split("\n")):
            parts = line.split("\t", 2)
            if len(parts) < 2:
                continue
            if len(src) == limit:
                break
            split = _split_on_spaces if i in slow else str.split
            src.append(split(parts[0]))
            tgt.append(split(parts[1]))
    return src, tgt


# ----------------------------------------------------------------------------- arrays


def truncate_pad(line: Sequence[Any], num_steps: int, padding_token: Any) -> list[Any]:
    """The course's ``truncate_pad``: cut ``line`` to ``num_steps`` or pad it up to that."""
    if len(line) > num_steps:
        return list(line[:num_steps])
    return list(line) + [padding_token] * (num_steps - len(line))


def build_array(
    lines: Sequence[Sequence[str]], vocab: Vocab, num_steps: int
) -> tuple[Tensor, Tensor]:
    """The course's ``build_array_nmt``: token lines → ``(array (N, num_steps), valid_len (N,))``.

    Each line gets ``<eos>``, then is truncated or padded with ``<pad>`` to ``num_steps``
    (a line of ``num_steps`` tokens or more loses its ``<eos>``, as in the course). ``valid_len``
    is ``min(len(line) + 1, num_steps)``. Both are int64. One dict lookup per kept token, the
    rest is array indexing.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise DivekitError(f"num_steps must be a positive integer, got {num_steps!r}")
    for token in (PAD, EOS):
        if token not in vocab:
            raise DivekitError(
                f"the vocabulary has no {token!r}; build it with reserved_tokens={list(RESERVED_TOKENS)}"
            )
    n = len(lines)
    lengths = np.fromiter(map(len, lines), dtype=np.int64, count=n)  # (N,)
    tokens = chain.from_iterable(lines)
    ids = np.fromiter(
        map(vocab.token_to_idx.get, tokens, repeat(vocab.unk)),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    position = np.arange(ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # in its line
    kept = np.minimum(lengths, num_steps)
    array = np.full((n, num_steps), vocab[PAD], dtype=np.int64)  # (N, num_steps)
    array[np.arange(num_steps) < kept[:, None]] = ids[position < num_steps]  # row-major order
    short = np.flatnonzero(lengths < num_steps)
    array[short, lengths[short]] = vocab[EOS]
    valid_len = np.minimum(lengths + 1, num_steps)
    return torch.from_numpy(array), torch.from_numpy(valid_len)


def decoder_inputs(tgt: Tensor, bos_index: int) -> Tensor:
    """Teacher forcing: the decoder reads ``<bos>`` then the target shifted right, ``(B, T)``."""
    bos = torch.full((tgt.shape[0], 1), bos_index, dtype=tgt.dtype, device=tgt.device)
    return torch.cat([bos, tgt[:, :-1]], dim=1)


def sentence_tokens(sentences: Sequence[str], tokenizer: Any = None) -> list[list[str]]:
    """Raw sentences cleaned and split as the training pairs were: words, or subword pieces."""
    words = [_split_on_spaces(preprocess_nmt(s)) for s in sentences]
    if tokenizer is None:
        return words
    return tokenizer.encode_lines([" ".join(w) for w in words])


def tokens_to_text(tokens: Sequence[str], tokenizer: Any = None) -> str:
    """The inverse of :func:`sentence_tokens` for one sentence: words joined by spaces, or
    pieces decoded to words (the cleaned, lower-cased text)."""
    return tokenizer.decode(list(tokens)) if tokenizer is not None else " ".join(tokens)


def detokenize(text: str) -> str:
    """Cleaned text back to ordinary spacing: no space before ``,`` and ``.`` (which
    :func:`preprocess_nmt` put there); French keeps its space before ``!`` and ``?``."""
    return re.sub(r" (?=[,.])", "", text)


def encode_sentences(
    sentences: Sequence[str], vocab: Vocab, num_steps: int, tokenizer: Any = None
) -> tuple[Tensor, Tensor]:
    """Raw sentences (e.g. a user's input to translate) → :func:`build_array` of their tokens."""
    return build_array(sentence_tokens(sentences, tokenizer), vocab, num_steps)


# ----------------------------------------------------------------------------- datasets


class TranslationArrays(NamedTuple):
    """One split; unpacks in the order of a minibatch."""

    src: Tensor  # (N, num_steps) int64, <eos> then <pad>
    src_valid_len: Tensor  # (N,) int64
    tgt: Tensor  # (N, num_steps) int64
    tgt_valid_len: Tensor  # (N,) int64


@dataclass
class TranslationData:
    """Vocabularies and the train/validation arrays of a translation dataset.

    ``val_pairs`` keeps the validation sentences as untruncated ``(source tokens, target
    tokens)``, the references for BLEU.
    """

    name: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    train: TranslationArrays
    val: TranslationArrays
    val_pairs: list[tuple[list[str], list[str]]]
    num_steps: int
    tokenizer: Any = None  # a SentencePieceTokenizer when the pairs are subword pieces

    def text(self, tokens: Sequence[str]) -> str:
        """Tokens (words, or pieces decoded by the tokenizer) as a sentence."""
        return tokens_to_text(tokens, self.tokenizer)

    def train_loader(
        self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> TensorBatchLoader:
        """Minibatches ``(src, src_valid_len, tgt, tgt_valid_len)``, reshuffled every epoch."""
        return TensorBatchLoader(
            *self.train, batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    def val_loader(self, batch_size: int) -> TensorBatchLoader:
        return TensorBatchLoader(*self.val, batch_size=batch_size)


def _read_numbers_fr(
    data_dir: Any = None, download: bool = False, max_examples: int | None = None
) -> str:
    return numbers_fr(n=max_examples or NUMBERS_FR_SIZE, seed=0)  # the corpus is fixed; seed splits


def _read_fra_eng(
    data_dir: Any = None, download: bool = False, max_examples: int | None = None
) -> str:
    return read_fra_eng(data_dir, download)


_READERS: dict[str, Callable[..., str]] = {"fra-eng": _read_fra_eng, "numbers-fr": _read_numbers_fr}


def _head(text: str, max_examples: int) -> str:
    """The first ``max_examples`` lines when they all are pairs, else the whole text.

    Preprocessing a prefix that ends at a line break gives the same lines as preprocessing the
    whole text, so the course's 600-example runs need not clean all 167,130 pairs.
    """
    lines = text.split("\n", max_examples)[:max_examples]
    return "\n".join(lines) if sum("\t" in line for line in lines) == max_examples else text


def load_translation(
    name: str,
    num_steps: int = 9,
    max_examples: int | None = None,
    min_freq: int = 2,
    val_fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    tokenizer: Any = None,
    val_size: int | None = None,
) -> TranslationData:
    """The course's ``load_data_nmt`` with a validation split: ``name`` is ``'fra-eng'`` or
    ``'numbers-fr'``.

    The first ``max_examples`` pairs (all when ``None``; the course uses 600) are cleaned and
    tokenized, then split by a shuffle fixed by ``seed``: ``round(val_fraction * N)`` pairs (at
    least one) for validation, the rest for training, each kept in file order. Vocabularies
    (``<unk>``, ``<pad>``, ``<bos>``, ``<eos>``, then tokens seen ``min_freq`` times) come from the
    training pairs only: words that occur only in validation sentences then map to ``<unk>``, as
    unseen words do at translation time, so validation loss and BLEU are not flattered by a
    vocabulary that has seen them (the course counts all pairs; it has no validation split).
    ``tokenizer`` (a :class:`~divekit.tokenizers.SentencePieceTokenizer`, one for both
    languages, or a spec such as ``"bpe:8000"``, trained here on the training split's cleaned
    sentences of both sides) replaces the word split of each cleaned sentence by its pieces.
    ``val_size`` holds out exactly that many pairs instead of ``val_fraction``.
    """
    if name not in _READERS:
        raise UnknownNameError("translation dataset", name, _READERS)
    if not 0 < val_fraction < 1:
        raise DivekitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise DivekitError(
            f"max_examples must be a positive number of pairs or None, got {max_examples!r}"
        )
    text = _READERS[name](data_dir=data_dir, download=download, max_examples=max_examples)
    if max_examples is not None:
        text = _head(text, max_examples)
    with _gc_paused():
        src, tgt = tokenize_nmt(preprocess_nmt(text), max_examples)
        if val_size is not None:
            val_fraction = val_size / max(len(src), 1)
        train_idx, val_idx = split_indices(len(src), val_fraction, seed)
        if isinstance(tokenizer, str):  # a spec: trained on the training pairs only
            lines = [" ".join(side[i]) for side in (src, tgt) for i in train_idx]
            tokenizer = tokenizer_from_spec(tokenizer, lines)
        if tokenizer is not None:
            src = tokenizer.encode_lines([" ".join(s) for s in src])
            tgt = tokenizer.encode_lines([" ".join(t) for t in tgt])
        reserved = list(RESERVED_TOKENS)
        src_vocab = Vocab([src[i] for i in train_idx], min_freq=min_freq, reserved_tokens=reserved)
        tgt_vocab = Vocab([tgt[i] for i in train_idx], min_freq=min_freq, reserved_tokens=reserved)
        src_array, src_len = build_array(src, src_vocab, num_steps)
        tgt_array, tgt_len = build_array(tgt, tgt_vocab, num_steps)
        val_pairs = [(src[i], tgt[i]) for i in val_idx]

    def split(index: np.ndarray) -> TranslationArrays:
        rows = torch.from_numpy(index)
        return TranslationArrays(src_array[rows], src_len[rows], tgt_array[rows], tgt_len[rows])

    return TranslationData(
        name, src_vocab, tgt_vocab, split(train_idx), split(val_idx), val_pairs, num_steps,
        tokenizer,
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` row indices, each ascending: ``round(val_fraction * n)`` rows (at least
    one, never all) drawn for validation by a permutation fixed by ``seed``."""
    if n < 2:
        raise DivekitError(
            f"{n} sentence pair(s) found; a train and a validation split need at least 2"
        )
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@register_dataset("fra-eng", task="translate", offline=False)
def load_fra_eng(
    *, data_dir: Any = None, download: bool = False, seed: int = 0, **options: Any
) -> TranslationData:
    """English→French sentence pairs from Tatoeba (the course's fra-eng.zip, fra.txt)."""
    return load_translation("fra-eng", data_dir=data_dir, download=download, seed=seed, **options)


@register_dataset("numbers-fr", task="translate", offline=True)
def load_numbers_fr(
    *, data_dir: Any = None, download: bool = False, seed: int = 0, **options: Any
) -> TranslationData:
    """Generated English→French number phrases ('twenty-one apples.' → 'vingt et une pommes .').

    20,000 pairs from :func:`numbers_fr` (seed 0; ``seed`` picks the split). The longest pair
    has 12 French words, so ``num_steps=13`` keeps every ``<eos>``; the course's 9 cuts one
    pair in six.
    """
    return load_translation(
        "numbers-fr", data_dir=data_dir, download=download, seed=seed, **options
    )
