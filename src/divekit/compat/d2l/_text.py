"""The book's text data: The Time Machine, ``Vocab``, language-model minibatches, English→French
pairs, WikiText-2 for BERT pretraining, SNLI (and, outside the course, PTB and IMDb).

Each name keeps the book's signature and return types and is an adapter over divekit's own
text pipeline: :mod:`divekit.data.text` (``tokenize``, ``Vocab``, the two samplers,
``SeqDataLoader``, ``load_corpus``), :mod:`divekit.data.translation` (``preprocess_nmt``,
``tokenize_nmt``, ``truncate_pad``, ``build_array``, ``read_fra_eng``) and
:mod:`divekit.data.bert_pretrain` (``wiki_paragraphs``, ``replace_mlm_tokens``). Files are
found offline by :mod:`divekit.compat.d2l._data` (``../data``, ``$DIVEKIT_DATA`` or divekit's
cache). Data loaders come wrapped in :class:`~divekit.compat.d2l._util.BoundedLoader`, so
``divekit book run --quick`` bounds every epoch.

Where the book's data is missing, the nearest data that is here stands in, with one line on
stderr per data set and process (``d2l: ... not found ...; using ... instead``);
``DIVEKIT_BOOK_STRICT=1`` turns that into the one-line not-found error instead. The archives'
stand-ins are registered with ``_data``, so the sections' own ``d2l.download_extract(name)``
calls get them too; each is written once, in the archive's extracted layout, into divekit's
cache (``~/.cache/divekit/d2l-substitutes/<name>``):

* The Time Machine → Python's own help text (``pydoc_data``), cleaned the same way;
* fra-eng → divekit's generated English→French number phrases (``numbers_fr``, 20,000 pairs)
  as ``fra-eng/fra.txt``;
* WikiText-2 → when its folder holds no train split, ``_read_wiki`` reads the validation split
  (``wiki.valid.tokens`` or ``valid.txt``); with no folder at all, the stand-in is
  ``wikitext-2/wiki.{train,valid}.tokens`` holding a validation split found elsewhere, else the
  paragraphs of Python's help text;
* SNLI → divekit's generated premise/hypothesis pairs (``nli-gen``: 3,000 train, 600 test)
  written as SNLI's own ``snli_1.0/snli_1.0_{train,test}.txt``, so ``read_snli`` reads them as
  it reads SNLI;
* IMDb (``aclImdb``) → the 40-review ``aclImdb_tiny`` when it is found.

Differences from the book:

* ``tokenize`` with an unknown ``token`` raises an error (the book prints a message and returns
  ``None``); a single string is one line (the book would take each character as a line).
* ``Vocab`` refuses ``'<unk>'`` or duplicates in ``reserved_tokens`` (the book gives them two
  indices); ``to_tokens`` also takes tensors and refuses indices outside the vocabulary.
* ``seq_data_iter_random``/``seq_data_iter_sequential`` draw their offset in
  ``[0, num_steps - 1]`` (the book's sequential one in ``[0, num_steps]``), yield the same
  number of minibatches whatever the offset, and refuse a corpus too short for one minibatch
  (the book yields nothing, and training then divides by zero). Their randomness comes from
  Python's ``random``, as the book's, so ``random.seed`` repeats them.
* ``tokenize_nmt(text, num_examples)`` keeps the first ``num_examples`` pairs (the book reads one
  line more) and lines with a third column (newer Tatoeba exports); ``build_array_nmt``'s
  ``valid_len`` is ``min(len + 1, num_steps)``, which is the book's count of non-``<pad>``
  entries unless a sentence holds the token ``<pad>`` itself.
* ``_read_wiki`` turns WikiText's ``@-@``, ``@,@`` and ``@.@`` joins into the plain characters
  (divekit's ``wiki_paragraphs``).
* ``_WikiTextDataset`` keeps its seven fields as stacked tensors (the book: lists of rows;
  indexing gives the same items) and draws the masks of all its pairs in one call.
* ``_pad_bert_inputs`` keeps at least one prediction slot (the book has none for
  ``max_len < 4``, and then fails) and refuses an example longer than ``max_len``.
* ``read_imdb`` reads each folder's reviews in sorted file order (the book: ``os.listdir``'s
  order, which differs between machines).
* ``read_snli`` also reads a folder that holds only the ``.jsonl`` files (their raw sentences).
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import data as torch_data

from divekit import tokenizers
from divekit.compat.d2l import _data
from divekit.compat.d2l._util import BoundedLoader, bounded, get_dataloader_workers
from divekit.data import bert_pretrain as _bert
from divekit.data import text as _text
from divekit.data import translation as _nmt
from divekit.data.numbers_fr import NUMBERS_FR_SIZE, numbers_fr
from divekit.errors import DataNotFoundError, DivekitError
from divekit.models.bert import get_tokens_and_segments

__all__ = [
    "read_time_machine", "tokenize", "Vocab", "count_corpus", "load_corpus_time_machine",
    "seq_data_iter_random", "seq_data_iter_sequential", "SeqDataLoader", "load_data_time_machine",
    "read_data_nmt", "preprocess_nmt", "tokenize_nmt", "truncate_pad", "build_array_nmt",
    "load_data_nmt",
    "_read_wiki", "_get_next_sentence", "_get_nsp_data_from_paragraph", "_replace_mlm_tokens",
    "_get_mlm_data_from_tokens", "_pad_bert_inputs", "_WikiTextDataset", "load_data_wiki",
    "read_snli", "SNLIDataset", "load_data_snli",
    "read_ptb", "read_imdb", "load_data_imdb",
]

BERT_RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]
NMT_RESERVED = ["<pad>", "<bos>", "<eos>"]
SNLI_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def _note(key: str, message: str) -> None:
    _data._note(key, message)  # one note per key and process, shared with _data's stand-ins


def _generator() -> torch.Generator:
    """A torch generator seeded from Python's ``random``, which the book's functions draw from:
    ``random.seed(n)`` makes them repeatable, as in the book."""
    return torch.Generator().manual_seed(random.getrandbits(63))


# ------------------------------------------------------------------------------ tokens, Vocab
def tokenize(lines: Sequence[str], token: str = "word") -> list[list[str]]:
    """Split each line into words (``line.split()``) or characters (divekit's ``tokenize``)."""
    return tokenizers.tokenize(lines, token)


def _book_flat(tokens: Sequence[Any] | None) -> list[Any]:
    """The tokens as one flat list: a list of lists (lines) is flattened; anything else,
    tuples included (the book's bigrams and trigrams), is a token."""
    if not tokens:
        return []
    if isinstance(tokens[0], list):
        return [tok for line in tokens for tok in line]
    return list(tokens)


def count_corpus(tokens: Sequence[Any]) -> collections.Counter:
    """Token frequencies of a flat token list or a list of token lines."""
    return collections.Counter(_book_flat(tokens))


class Vocab(_text.Vocab):
    """The book's ``Vocab``: ``<unk>`` at index 0, then ``reserved_tokens``, then the tokens
    seen at least ``min_freq`` times, most frequent first (divekit's ``Vocab``).

    ``tokens`` is a flat token list or a list of token lines; tuples are tokens (the book's
    bigram and trigram vocabularies). ``Vocab()`` is empty: the book then assigns
    ``idx_to_token`` and ``token_to_idx`` of a pretrained model's vocabulary."""

    def __init__(self, tokens: Sequence[Any] | None = None, min_freq: int = 0,
                 reserved_tokens: Sequence[str] | None = None):
        # one line holding every token: divekit's Vocab flattens lines, never the tokens
        super().__init__([_book_flat(tokens)], min_freq, reserved_tokens)

    @classmethod
    def _of(cls, vocab: _text.Vocab) -> Vocab:
        """The same vocabulary as this class (for divekit's corpora, which build their own)."""
        return cls.from_dict(vocab.to_dict())  # type: ignore[return-value]


# ------------------------------------------------------------------------------ time machine
def _time_machine_file() -> Path | None:
    try:
        return Path(_data.download("time_machine"))
    except DataNotFoundError:
        if _data._strict():
            raise
        _note("time_machine", "The Time Machine (timemachine.txt) not found in ../data, "
              "$DIVEKIT_DATA or divekit's cache; using Python's help text (pydoc) instead "
              "(numbers differ from the book's)")
        return None


def read_time_machine() -> list[str]:
    """The Time Machine's lines, letters only, lower-cased (3,221 lines)."""
    path = _time_machine_file()
    if path is None:
        return _text.preprocess(_text.read_pydoc())
    with open(path, encoding="utf-8") as f:
        return _text.preprocess(f.readlines())


def load_corpus_time_machine(max_tokens: int = -1) -> tuple[list[int], Vocab]:
    """``(corpus, vocab)``: the character indices of the whole book (the first ``max_tokens``
    when positive) and its character vocabulary (divekit's ``load_corpus``)."""
    path = _time_machine_file()
    if path is None:
        corpus, vocab = _text.load_corpus("pydoc", token="char", max_tokens=max_tokens)
    elif path.name == _text.TIMEMACHINE_FILE:
        corpus, vocab = _text.load_corpus("timemachine", token="char", max_tokens=max_tokens,
                                          data_dir=path.parent)
    else:  # a file under another name: the same steps on its lines
        tokens = tokenize(read_time_machine(), "char")
        vocab = Vocab(tokens)
        corpus = [vocab[ch] for line in tokens for ch in line]
        corpus = corpus[:max_tokens] if max_tokens > 0 else corpus
    return list(corpus), Vocab._of(vocab)


# ------------------------------------------------------------------------------ LM minibatches
def seq_data_iter_random(corpus: Sequence[int], batch_size: int, num_steps: int
                         ) -> Iterator[tuple[Tensor, Tensor]]:
    """Random partitioning: ``(X, Y)`` of shape ``(batch_size, num_steps)``, ``Y`` is ``X``
    shifted by one; subsequences start at a random offset and come in random order."""
    return _text.seq_data_iter_random(corpus, batch_size, num_steps, generator=_generator())


def seq_data_iter_sequential(corpus: Sequence[int], batch_size: int, num_steps: int
                             ) -> Iterator[tuple[Tensor, Tensor]]:
    """Sequential partitioning: row ``r`` of each minibatch continues row ``r`` of the one
    before; ``Y`` is ``X`` shifted by one."""
    return _text.seq_data_iter_sequential(corpus, batch_size, num_steps, generator=_generator())


class SeqDataLoader:
    """The Time Machine's character minibatches (divekit's ``SeqDataLoader``): a fresh random
    partition every epoch; in quick mode at most ``DIVEKIT_BOOK_QUICK_BATCHES`` per epoch."""

    def __init__(self, batch_size: int, num_steps: int, use_random_iter: bool, max_tokens: int):
        self.data_iter_fn = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
        self.corpus, self.vocab = load_corpus_time_machine(max_tokens)
        self.batch_size, self.num_steps = batch_size, num_steps
        self.loader = _text.SeqDataLoader(
            self.corpus, batch_size, num_steps, "random" if use_random_iter else "sequential",
            seed=random.getrandbits(32))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return bounded(self.loader)

    def __len__(self) -> int:
        return len(BoundedLoader(self.loader))


def load_data_time_machine(batch_size: int, num_steps: int, use_random_iter: bool = False,
                           max_tokens: int = 10000) -> tuple[SeqDataLoader, Vocab]:
    """``(data_iter, vocab)`` of The Time Machine's first ``max_tokens`` characters."""
    data_iter = SeqDataLoader(batch_size, num_steps, use_random_iter, max_tokens)
    return data_iter, data_iter.vocab


# ------------------------------------------------------------------------------ fra-eng
def read_data_nmt() -> str:
    """The raw text of ``fra-eng/fra.txt``: one ``English<TAB>French`` pair a line."""
    return _nmt.read_fra_eng(_data.download_extract("fra-eng"))


def preprocess_nmt(text: str) -> str:
    """Spaces for non-breaking spaces, lower case, a space before ``,.!?`` (divekit's)."""
    return _nmt.preprocess_nmt(text)


def tokenize_nmt(text: str, num_examples: int | None = None
                 ) -> tuple[list[list[str]], list[list[str]]]:
    """``(source, target)`` word lists of the first ``num_examples`` pairs (all when None)."""
    return _nmt.tokenize_nmt(text, num_examples or None)


def truncate_pad(line: Sequence[Any], num_steps: int, padding_token: Any) -> list[Any]:
    """``line`` cut to ``num_steps`` items or padded up to it with ``padding_token``."""
    return _nmt.truncate_pad(line, num_steps, padding_token)


def build_array_nmt(lines: Sequence[Sequence[str]], vocab: _text.Vocab, num_steps: int
                    ) -> tuple[Tensor, Tensor]:
    """``(array (N, num_steps), valid_len (N,))``: each line's indices, ``<eos>``, then
    ``<pad>`` (or cut to ``num_steps``); ``valid_len`` counts the entries that are not
    padding (divekit's ``build_array``)."""
    return _nmt.build_array(lines, vocab, num_steps)


def load_data_nmt(batch_size: int, num_steps: int, num_examples: int = 600
                  ) -> tuple[BoundedLoader, Vocab, Vocab]:
    """``(data_iter, src_vocab, tgt_vocab)``; batches are ``(X, X_valid_len, Y, Y_valid_len)``.
    Vocabularies keep words seen twice, after ``<unk> <pad> <bos> <eos>``."""
    text = read_data_nmt()
    if num_examples:
        text = _nmt._head(text, num_examples)  # cleaning a prefix gives the same first lines
    source, target = tokenize_nmt(preprocess_nmt(text), num_examples)
    src_vocab = Vocab(source, min_freq=2, reserved_tokens=NMT_RESERVED)
    tgt_vocab = Vocab(target, min_freq=2, reserved_tokens=NMT_RESERVED)
    src_array, src_valid_len = build_array_nmt(source, src_vocab, num_steps)
    tgt_array, tgt_valid_len = build_array_nmt(target, tgt_vocab, num_steps)
    data_iter = _data.load_array((src_array, src_valid_len, tgt_array, tgt_valid_len),
                                 batch_size)
    return data_iter, src_vocab, tgt_vocab


# ------------------------------------------------------------------------------ WikiText-2, BERT
def _wiki_lines(data_dir: str | os.PathLike[str]) -> list[str] | None:
    """The lines of WikiText-2's train split in ``data_dir``, else of its validation split
    (with a note), else None (with a note)."""
    root = Path(data_dir)
    path = _bert._wiki_file(root, "train")
    if path is None:
        valid = _bert._wiki_file(root, "valid")
        if _data._strict():
            raise DataNotFoundError(
                f"WikiText-2's train split (wiki.train.tokens) not found in {str(root)!r}")
        if valid is not None:
            _note("wikitext-2", f"WikiText-2's train split not found in {str(root)!r}; using "
                  "its validation split instead (numbers differ from the book's)")
            path = valid
        else:
            _note("wikitext-2", f"WikiText-2 not found in {str(root)!r}; using paragraphs of "
                  "Python's help text (pydoc) instead (numbers differ from the book's)")
            return None
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def _read_wiki(data_dir: str | os.PathLike[str]) -> list[list[str]]:
    """Paragraphs of at least two sentences (split at ``' . '``), lower-cased, shuffled."""
    lines = _wiki_lines(data_dir)
    if lines is None:
        source: list[Any] = _bert.pydoc_paragraphs()["train"]
    else:
        source = _bert.wiki_paragraphs(lines)
    # divekit writes WikiText's <unk> as [UNK]; the book keeps <unk>, which Vocab maps to unk
    paragraphs = [[s.lower().replace("[unk]", "<unk>") for s in p] for p in source]
    random.shuffle(paragraphs)
    return paragraphs


def _get_next_sentence(sentence: list[str], next_sentence: list[str],
                       paragraphs: list[list[list[str]]]) -> tuple[list[str], list[str], bool]:
    """``(sentence, next_sentence, True)`` half the time, else ``(sentence, a random sentence
    of a random paragraph, False)``."""
    if random.random() < 0.5:
        return sentence, next_sentence, True
    return sentence, random.choice(random.choice(paragraphs)), False


def _get_nsp_data_from_paragraph(paragraph: list[list[str]], paragraphs: list[list[list[str]]],
                                 vocab: _text.Vocab, max_len: int
                                 ) -> list[tuple[list[str], list[int], bool]]:
    """``(tokens, segments, is_next)`` for each sentence followed by another in ``paragraph``;
    pairs longer than ``max_len`` with ``<cls>`` and two ``<sep>`` are left out."""
    out = []
    for a, b in zip(paragraph[:-1], paragraph[1:]):
        tokens_a, tokens_b, is_next = _get_next_sentence(a, b, paragraphs)
        if len(tokens_a) + len(tokens_b) + 3 <= max_len:
            tokens, segments = get_tokens_and_segments(tokens_a, tokens_b)
            out.append((tokens, segments, is_next))
    return out


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int = 0) -> Tensor:
    """Integer rows left-aligned in an ``(N, width)`` int64 tensor filled with ``fill``."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if lengths.size and int(lengths.max()) > width:
        i = int(lengths.argmax())
        raise DivekitError(f"row {i} has {lengths[i]} entries, more than the {width} allowed")
    out = np.full((len(rows), width), fill, dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                       count=int(lengths.sum()))
    out[np.arange(width) < lengths[:, None]] = flat  # row-major: each row's entries in order
    return torch.from_numpy(out)


def _ids(rows: Sequence[Sequence[str]], vocab: _text.Vocab) -> list[list[int]]:
    index, unk = vocab.token_to_idx.get, vocab.unk  # vocab[row], one dict lookup a token
    return [[index(t, unk) for t in row] for row in rows]


def _mlm_batch(rows: Sequence[Sequence[str]], candidates: Sequence[Sequence[int]],
               num_preds: Sequence[int], vocab: _text.Vocab
               ) -> tuple[list[list[int]], list[list[int]]]:
    """The 80/10/10 rule on many token rows at once (divekit's ``replace_mlm_tokens``): up to
    ``num_preds[i]`` of row ``i``'s ``candidates`` are chosen; each becomes ``<mask>`` (80%),
    a random token of the vocabulary (10%) or stays (10%). Returns each row's token ids after
    replacement and its chosen positions, in the order they were drawn."""
    n = len(rows)
    if n == 0:
        return [], []
    width = max(1, max(map(len, rows)))
    ids = _padded(_ids(rows, vocab), width)
    eligible = torch.zeros((n, width + 1), dtype=torch.bool)  # column `width`: padding, dropped
    eligible.scatter_(1, _padded(candidates, max(1, max(map(len, candidates))), width), True)
    eligible = eligible[:, :width]
    k = torch.tensor(list(num_preds), dtype=torch.long)
    masked, positions, weights, _ = _bert.replace_mlm_tokens(
        ids, eligible, max(1, int(k.max())), vocab["<mask>"], torch.arange(len(vocab)),
        _generator(), num_preds=k)
    lengths = [len(r) for r in rows]
    counts = weights.sum(1).long().tolist()
    out_ids = [row[:m] for row, m in zip(masked.tolist(), lengths)]
    out_pos = [row[:c] for row, c in zip(positions.tolist(), counts)]  # chosen slots come first
    return out_ids, out_pos


def _replace_mlm_tokens(tokens: list[str], candidate_pred_positions: list[int],
                        num_mlm_preds: int, vocab: _text.Vocab
                        ) -> tuple[list[str], list[tuple[int, str]]]:
    """``(mlm_input_tokens, pred_positions_and_labels)``: ``num_mlm_preds`` random positions of
    ``candidate_pred_positions`` replaced by the 80/10/10 rule, with their original tokens."""
    (ids,), (positions,) = _mlm_batch([tokens], [candidate_pred_positions], [num_mlm_preds],
                                      vocab)
    out = list(tokens)
    for p in positions:
        if ids[p] != vocab[tokens[p]]:  # kept tokens stay as written (also unknown words)
            out[p] = vocab.idx_to_token[ids[p]]
    return out, [(p, tokens[p]) for p in positions]


def _mlm_data(examples: Sequence[Sequence[str]], vocab: _text.Vocab
              ) -> list[tuple[list[int], list[int], list[int]]]:
    """``_get_mlm_data_from_tokens`` for many token lists, in one vectorised draw."""
    candidates = [[i for i, t in enumerate(tokens) if t not in ("<cls>", "<sep>")]
                  for tokens in examples]
    num_preds = [max(1, round(len(tokens) * 0.15)) for tokens in examples]
    ids, positions = _mlm_batch(examples, candidates, num_preds, vocab)
    index, unk = vocab.token_to_idx.get, vocab.unk
    out = []
    for tokens, row, pos in zip(examples, ids, positions):
        pos = sorted(pos)
        out.append((row, pos, [index(tokens[p], unk) for p in pos]))  # the original tokens
    return out


def _get_mlm_data_from_tokens(tokens: list[str], vocab: _text.Vocab
                              ) -> tuple[list[int], list[int], list[int]]:
    """``(token ids after masking, pred_positions, label ids)``: 15% of the tokens (at least
    one; never ``<cls>``/``<sep>``) to predict, positions ascending."""
    return _mlm_data([tokens], vocab)[0]


def _pad_bert_arrays(examples: Sequence[tuple[list[int], list[int], list[int], list[int], bool]],
                     max_len: int, vocab: _text.Vocab) -> tuple[Tensor, ...]:
    """:func:`_pad_bert_inputs` as seven stacked tensors."""
    num_preds = max(1, round(max_len * 0.15))
    ids, positions, labels, segments, is_next = (list(c) for c in zip(*examples)) if examples \
        else ([], [], [], [], [])
    tokens = _padded(ids, max_len, vocab["<pad>"])
    valid_lens = torch.tensor([len(r) for r in ids], dtype=torch.float32)
    weights = (torch.arange(num_preds) < torch.tensor([len(r) for r in labels],
                                                      dtype=torch.long)[:, None]).float()
    return (tokens, _padded(segments, max_len), valid_lens, _padded(positions, num_preds),
            weights.reshape(len(ids), num_preds), _padded(labels, num_preds),
            torch.tensor([int(b) for b in is_next], dtype=torch.long))


def _pad_bert_inputs(examples: Sequence[tuple[list[int], list[int], list[int], list[int], bool]],
                     max_len: int, vocab: _text.Vocab) -> tuple[list[Tensor], ...]:
    """Pad ``(token_ids, pred_positions, mlm_label_ids, segments, is_next)`` examples to
    ``max_len`` tokens and ``round(0.15 max_len)`` predictions: seven lists of tensors
    (token ids, segments, valid_lens (float), pred_positions, mlm_weights, mlm_labels,
    nsp_labels)."""
    return tuple(list(t) for t in _pad_bert_arrays(examples, max_len, vocab))


class _WikiTextDataset(torch_data.Dataset):
    """NSP pairs with masked-LM targets from paragraphs of sentence strings; ``vocab`` keeps
    words seen 5 times, after ``<unk> <pad> <mask> <cls> <sep>``."""

    def __init__(self, paragraphs: Sequence[Sequence[str]], max_len: int):
        token_paragraphs = [tokenize(list(p), token="word") for p in paragraphs]
        sentences = [s for p in token_paragraphs for s in p]
        self.vocab = Vocab(sentences, min_freq=5, reserved_tokens=BERT_RESERVED)
        pairs = []
        for p in token_paragraphs:
            pairs.extend(_get_nsp_data_from_paragraph(p, token_paragraphs, self.vocab, max_len))
        mlm = _mlm_data([tokens for tokens, _, _ in pairs], self.vocab)
        examples = [(*m, segments, is_next) for m, (_, segments, is_next) in zip(mlm, pairs)]
        # stacked tensors rather than the book's lists of rows: indexed alike, built faster
        (self.all_token_ids, self.all_segments, self.valid_lens, self.all_pred_positions,
         self.all_mlm_weights, self.all_mlm_labels, self.nsp_labels) = _pad_bert_arrays(
            examples, max_len, self.vocab)

    def __getitem__(self, idx: int) -> tuple[Tensor, ...]:
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx],
                self.all_pred_positions[idx], self.all_mlm_weights[idx],
                self.all_mlm_labels[idx], self.nsp_labels[idx])

    def __len__(self) -> int:
        return len(self.all_token_ids)


def load_data_wiki(batch_size: int, max_len: int) -> tuple[BoundedLoader, Vocab]:
    """``(train_iter, vocab)`` of WikiText-2's train split for BERT pretraining; batches are
    ``(tokens, segments, valid_lens, pred_positions, mlm_weights, mlm_labels, nsp_labels)``."""
    num_workers = get_dataloader_workers()
    data_dir = _data.download_extract("wikitext-2", "wikitext-2")
    train_set = _WikiTextDataset(_read_wiki(data_dir), max_len)
    train_iter = torch_data.DataLoader(train_set, batch_size, shuffle=True,
                                       num_workers=num_workers)
    return BoundedLoader(train_iter), train_set.vocab


# ------------------------------------------------------------------------------ SNLI
SNLI_COLUMNS = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "captionID",
                "pairID", "label1", "label2", "label3", "label4", "label5"]


def _snli_text(s: str) -> str:
    """A binary parse without its brackets, single-spaced."""
    return re.sub(r"\s{2,}", " ", s.replace("(", "").replace(")", "")).strip()


def read_snli(data_dir: str | os.PathLike[str], is_train: bool
              ) -> tuple[list[str], list[str], list[int]]:
    """``(premises, hypotheses, labels)`` of SNLI's train or test split; labels are
    0 entailment, 1 contradiction, 2 neutral; pairs without a gold label are left out."""
    split = "train" if is_train else "test"
    root = Path(data_dir)
    path = root / f"snli_1.0_{split}.txt"
    if not path.is_file() and (root / f"snli_1.0_{split}.jsonl").is_file():
        examples, _ = _text_tasks().read_snli_file(root / f"snli_1.0_{split}.jsonl")
        return ([e.text for e in examples], [str(e.pair) for e in examples],
                [SNLI_LABELS[e.label] for e in examples])
    if not path.is_file():
        raise DataNotFoundError(f"SNLI: {path.name!r} not found in {str(root)!r}")
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    rows = [r for r in rows if len(r) >= 3 and r[0] in SNLI_LABELS]
    return ([_snli_text(r[1]) for r in rows], [_snli_text(r[2]) for r in rows],
            [SNLI_LABELS[r[0]] for r in rows])


def _text_tasks() -> Any:
    from divekit.data import text_tasks

    return text_tasks


def _binary_parse(sentence: str) -> str:
    """A right-branching binary parse of a sentence, final punctuation split off as SNLI's."""
    words = re.sub(r"([.!?,])", r" \1", sentence).split()
    parse = words[-1]
    for w in reversed(words[:-1]):
        parse = f"( {w} {parse} )"
    return parse


def _build_snli(dest: Path, _src: Any) -> None:
    """Divekit's generated NLI pairs (``nli-gen``: 3,000 train, 600 test, seed 0) in SNLI's own
    format: ``dest/snli_1.0/snli_1.0_{train,test}.txt``, tab-separated with SNLI's header."""
    from divekit.data.text_generated import nli_gen

    task = nli_gen(seed=0)
    folder = dest / "snli_1.0"
    folder.mkdir(parents=True)
    for split, examples in (("train", task.train), ("test", task.valid)):
        lines = ["\t".join(SNLI_COLUMNS)]
        for i, e in enumerate(examples):
            b1, b2 = _binary_parse(e.text), _binary_parse(str(e.pair))
            lines.append("\t".join([e.label, b1, b2, f"(ROOT {b1})", f"(ROOT {b2})", e.text,
                                    str(e.pair), f"gen{split}{i}", f"gen{split}{i}p", e.label,
                                    "", "", "", ""]))
        (folder / f"snli_1.0_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


class SNLIDataset(torch_data.Dataset):
    """SNLI pairs as padded index tensors: items are ``((premise, hypothesis), label)``; the
    vocabulary (words seen 5 times, after ``<unk> <pad>``) comes from ``dataset`` unless given."""

    def __init__(self, dataset: tuple[list[str], list[str], list[int]], num_steps: int,
                 vocab: _text.Vocab | None = None):
        self.num_steps = num_steps
        premise_tokens, hypothesis_tokens = tokenize(dataset[0]), tokenize(dataset[1])
        self.vocab = vocab if vocab is not None else Vocab(
            premise_tokens + hypothesis_tokens, min_freq=5, reserved_tokens=["<pad>"])
        self.premises = self._pad(premise_tokens)
        self.hypotheses = self._pad(hypothesis_tokens)
        self.labels = torch.tensor(dataset[2])
        print(f"read {len(self.premises)} examples")

    def _pad(self, lines: Sequence[Sequence[str]]) -> Tensor:
        pad = self.vocab["<pad>"]
        rows = [truncate_pad(self.vocab[list(line)], self.num_steps, pad) for line in lines]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.num_steps)

    def __getitem__(self, idx: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        return (self.premises[idx], self.hypotheses[idx]), self.labels[idx]

    def __len__(self) -> int:
        return len(self.premises)


def load_data_snli(batch_size: int, num_steps: int = 50
                   ) -> tuple[BoundedLoader, BoundedLoader, _text.Vocab]:
    """``(train_iter, test_iter, vocab)`` of SNLI; batches are ``((premises, hypotheses),
    labels)`` with ``(batch_size, num_steps)`` index tensors."""
    num_workers = get_dataloader_workers()
    data_dir = _data.download_extract("SNLI")
    train_set = SNLIDataset(read_snli(data_dir, True), num_steps)
    test_set = SNLIDataset(read_snli(data_dir, False), num_steps, train_set.vocab)
    train_iter = torch_data.DataLoader(train_set, batch_size, shuffle=True,
                                       num_workers=num_workers)
    test_iter = torch_data.DataLoader(test_set, batch_size, shuffle=False,
                                      num_workers=num_workers)
    return BoundedLoader(train_iter), BoundedLoader(test_iter), train_set.vocab


# ------------------------------------------------------------------------------ PTB, IMDb
def read_ptb() -> list[list[str]]:
    """PTB's training sentences as word lists (``ptb/ptb.train.txt``)."""
    folder = _data.download_extract("ptb")
    with open(os.path.join(folder, "ptb.train.txt"), encoding="utf-8") as f:
        return tokenize(f.read().split("\n"))


def read_imdb(data_dir: str | os.PathLike[str], is_train: bool) -> tuple[list[str], list[int]]:
    """``(reviews, labels)`` of ``data_dir/{train,test}/{pos,neg}/*.txt``; 1 positive,
    0 negative."""
    reviews, labels = [], []
    for label in ("pos", "neg"):
        folder = Path(data_dir) / ("train" if is_train else "test") / label
        if not folder.is_dir():
            raise DataNotFoundError(f"IMDb: folder {str(folder)!r} not found")
        for file in sorted(folder.iterdir()):
            if file.is_file():
                reviews.append(file.read_text(encoding="utf-8").replace("\n", ""))
                labels.append(1 if label == "pos" else 0)
    return reviews, labels


def load_data_imdb(batch_size: int, num_steps: int = 500
                   ) -> tuple[BoundedLoader, BoundedLoader, Vocab]:
    """``(train_iter, test_iter, vocab)`` of IMDb reviews padded to ``num_steps`` words."""
    data_dir = _data.download_extract("aclImdb", "aclImdb")
    train_data, test_data = read_imdb(data_dir, True), read_imdb(data_dir, False)
    train_tokens, test_tokens = tokenize(train_data[0]), tokenize(test_data[0])
    vocab = Vocab(train_tokens, min_freq=5, reserved_tokens=["<pad>"])
    pad = vocab["<pad>"]

    def features(lines: list[list[str]]) -> Tensor:
        rows = [truncate_pad(vocab[line], num_steps, pad) for line in lines]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), num_steps)

    train_iter = _data.load_array((features(train_tokens), torch.tensor(train_data[1])),
                                  batch_size)
    test_iter = _data.load_array((features(test_tokens), torch.tensor(test_data[1])),
                                 batch_size, is_train=False)
    return train_iter, test_iter, vocab


# ------------------------------------------------------------------------------ stand-ins
def _build_fra_eng(dest: Path, _src: Any) -> None:
    (dest / "fra-eng").mkdir(parents=True)
    (dest / "fra-eng" / "fra.txt").write_text(numbers_fr(), encoding="utf-8")


def _wikitext_lines(paragraphs: Sequence[_bert.Paragraph]) -> str:
    """Paragraphs in WikiText's layout: a `` = Title = `` line per document, sentences joined
    by `` . ``."""
    lines, document = [], None
    for p in paragraphs:
        if p.document != document:
            document = p.document
            lines += [" ", f" = Document {document} = ", " "]
        lines.append(" " + " . ".join(s.rstrip(".").strip() for s in p) + " . ")
    return "\n".join(lines) + "\n"


def _wiki_valid_split() -> Path | None:
    """A WikiText-2 validation split in the search folders (``wikitext-2/valid.txt``, ...)."""
    for root, _ in _data._search_roots(name="wikitext-2"):
        path = _bert._wiki_file(root / "wikitext-2", "valid")
        if path is not None:
            return path
    return None


def _build_wikitext(dest: Path, src: Path | str) -> None:
    """``wikitext-2/wiki.{train,valid}.tokens``: the validation split ``src`` as both, or
    (``src == 'pydoc'``) the paragraphs of Python's help text."""
    folder = dest / "wikitext-2"
    folder.mkdir(parents=True)
    if isinstance(src, Path):
        for split in ("train", "valid"):
            shutil.copyfile(src, folder / f"wiki.{split}.tokens")
        return
    for split, paragraphs in _bert.pydoc_paragraphs().items():
        (folder / f"wiki.{split}.tokens").write_text(_wikitext_lines(paragraphs),
                                                      encoding="utf-8")


def _describe_wikitext(base: Path, src: Path | str) -> str:
    if isinstance(src, Path):
        return f"WikiText-2's validation split {src} as its train split (copied to {base})"
    return f"paragraphs of Python's help text (pydoc) as WikiText-2 files in {base}"


def _imdb_tiny() -> Path | None:
    return _data._find_folder("aclImdb_tiny")


def _build_imdb(dest: Path, src: Path) -> None:
    shutil.copytree(src, dest / "aclImdb")


_data._register_substitute(
    "fra-eng", _build_fra_eng,
    lambda base, _: f"divekit's generated English-French number phrases from {base} "
                    f"({NUMBERS_FR_SIZE:,} pairs)")
_data._register_substitute(
    "wikitext-2", _build_wikitext, _describe_wikitext,
    source=lambda: _wiki_valid_split() or "pydoc",
    version=lambda: f"1 {_wiki_valid_split() or 'pydoc'}",
    complete=lambda folder: (folder / "wiki.train.tokens").is_file())
_data._register_substitute(
    "SNLI", _build_snli,
    lambda base, _: f"divekit's generated premise/hypothesis pairs in SNLI's format from {base} "
                    "(3,000 train, 600 test)")
_data._register_substitute(
    "aclImdb", _build_imdb,
    lambda base, src: f"the 40-review aclImdb_tiny from {src} (copied to {base})",
    source=_imdb_tiny, version=lambda: f"1 {_imdb_tiny()}")
