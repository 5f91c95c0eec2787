"""BERT pretraining data (d2l 15.9): paragraphs, next-sentence pairs, masked-LM targets.

Text comes as *paragraphs of at least two sentences*: WikiText-2 (``wiki.train.tokens`` and
``wiki.valid.tokens``, from ``--data-dir`` or downloaded) or the embedded ``pydoc`` corpus
(Python's own help topics). The task tokenizes the sentences once; this module then turns the
token ids into minibatches, all with tensor operations:

* **Next-sentence prediction.** Every sentence ``a`` that has a successor in its paragraph
  gives one pair; with probability ½ its ``b`` is that successor (label 1), else a random
  sentence of *another document* (label 0), as BERT's own data pipeline draws it (a WikiText
  article, a pydoc help topic; the course draws from any paragraph). Within one document the
  random sentence is often on the same subject, which leaves the model little to tell the
  pairs apart by and slows NSP down (measured: docs/bert.md). A pair longer than ``max_len − 3`` tokens is cut, the
  longer sentence first, as BERT's ``truncate_seq_pair`` (the course drops such pairs).
* **Masked language model.** Of a sequence's ``n`` *eligible* tokens (not ``[CLS]``,
  ``[SEP]`` or padding) ``k = ⌊0.15 n + u⌋``, ``u ~ U(0, 1)``, are chosen (so exactly 15% in
  expectation); a chosen token becomes ``[MASK]`` with probability 0.8, a random non-special
  token with probability 0.1, and stays itself with probability 0.1. The model predicts the
  original at each chosen position.

A batch is the course's 7-tuple ``(tokens (B, T), segments (B, T), valid_lens (B,),
pred_positions (B, P), mlm_weights (B, P), mlm_labels (B, P), nsp_labels (B,))``, padded to its
longest pair; unused prediction slots point at position 0 with weight 0. Pairs and masks are
drawn afresh every epoch from ``(seed, epoch, batch)`` (dynamic masking, as RoBERTa), so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from divekit.data.loader import shard_bounds
from divekit.data.registry import register_dataset
from divekit.errors import DataNotFoundError, DivekitError

MASK_RATE = 0.15
# WikiText-2 v1 (tokens): the course's sha1 of the zip (d2l DATA_HUB['wikitext-2']); the
# course's own address (s3 research.metamind.io) is dead, the dataset's author hosts it here.
WIKITEXT2_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"
WIKITEXT2_SHA1 = "3c914d17d80b1459be871a5039ac23e752a53cbe"
# sha1 of the zip's members, as GluonNLP publishes them beside the same zip sha1 (a second,
# independent record of the archive): ../shared/data's valid.txt and test.txt match these.
WIKITEXT2_MEMBER_SHA1 = {"wiki.train.tokens": "863f29c46ef9d167fff4940ec821195882fe29d1",
                         "wiki.valid.tokens": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
                         "wiki.test.tokens": "c7b8ce0aa086fb34dab808c5c49224211eb2b172"}
WIKI_SPLITS = {"train": ("wiki.train.tokens", "train.txt"), "valid": ("wiki.valid.tokens", "valid.txt")}



class Paragraph(list):  # type: ignore[type-arg]
    """A paragraph's sentences (a ``list[str]``, equal to a plain list) with the index of the
    document it belongs to: negatives of next-sentence prediction come from other documents."""

    def __init__(self, sentences: Sequence[str] = (), document: int = 0):
        super().__init__(sentences)
        self.document = document


# ----------------------------------------------------------------------------- paragraphs
def wiki_paragraphs(lines: Sequence[str]) -> list[Paragraph]:
    """The course's ``_read_wiki``: each line split at ``' . '``, kept with ≥ 2 sentences.
    WikiText's ``<unk>`` becomes ``[UNK]`` and its ``@-@``-style joins their plain characters."""
    paragraphs, document = [], 0
    for line in lines:
        line = line.strip()
        if line.startswith("=") and not line.startswith("= ="):
            document += 1  # " = Title = " starts an article; " = = Section = = " does not
        if not line or line.startswith("="):
            continue
        line = line.replace("<unk>", "[UNK]").replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        sentences = [s.strip() for s in line.split(" . ") if s.strip()]
        if len(sentences) >= 2:
            paragraphs.append(Paragraph(sentences, document))
    return paragraphs


def _wiki_file(root: Path, split: str) -> Path | None:
    for folder in (root, root / "wikitext-2"):
        for name in WIKI_SPLITS[split]:
            if (folder / name).is_file():
                return folder / name
    return None


def read_wikitext2(data_dir: str | os.PathLike[str] | None = None, download: bool = False
                   ) -> dict[str, list[Paragraph]]:
    """``{'train', 'valid'}`` paragraphs of WikiText-2 from ``data_dir`` (``wiki.*.tokens`` or
    PyTorch's ``train.txt``/``valid.txt``, also under ``wikitext-2/``), or the hub."""
    from divekit import hub

    root = Path(data_dir) if data_dir is not None else hub.data_home() / "wikitext-2"
    if _wiki_file(root, "train") is None and download:
        archive = hub.download(WIKITEXT2_URL, root, sha1=WIKITEXT2_SHA1)
        hub.extract(archive, root)
    out = {}
    for split in WIKI_SPLITS:
        path = _wiki_file(root, split)
        if path is None:
            raise DataNotFoundError(
                f"wikitext2: missing {WIKI_SPLITS[split][0]} in {str(root)!r}; pass --data-dir DIR "
                f"holding it, or --download ({WIKITEXT2_URL}, sha1 {WIKITEXT2_SHA1})")
        out[split] = wiki_paragraphs(path.read_text(encoding="utf-8").split("\n"))
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def pydoc_paragraphs(held_out_every: int = 10) -> dict[str, list[Paragraph]]:
    """Prose paragraphs (≥ 2 sentences) of Python's help topics; every ``held_out_every``-th
    paragraph is held out for validation. Indented blocks (code, tables) are left out. A help
    topic is a document."""
    from pydoc_data.topics import topics

    paragraphs = []
    for document, key in enumerate(sorted(topics)):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            if not block.strip() or lines[0][:1].isspace():
                continue
            sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(ln.strip() for ln in lines))]
            sentences = [s for s in sentences if s]
            if len(sentences) >= 2:
                paragraphs.append(Paragraph(sentences, document))
    train = [p for i, p in enumerate(paragraphs) if i % held_out_every]
    valid = [p for i, p in enumerate(paragraphs) if not i % held_out_every]
    return {"train": train, "valid": valid}


@register_dataset("wikitext2", task="bert_pretrain", offline=False)
def load_wikitext2(*, data_dir: Any = None, download: bool = False, seed: int = 0,
                   **options: Any) -> dict[str, list[Paragraph]]:
    """WikiText-2 token files (wiki.train/valid.tokens), as paragraphs of sentences."""
    return read_wikitext2(data_dir, download)


PARAGRAPH_SOURCES = {"pydoc": lambda data_dir=None, download=False: pydoc_paragraphs(),
                     "wikitext2": read_wikitext2}


# ----------------------------------------------------------------------------- token ids
@dataclass
class SentenceCorpus:
    """Sentences as one flat id tensor: sentence ``s`` is ``ids[start[s] : start[s] + length[s]]``;
    ``pairs`` are the sentences followed by another in their paragraph; ``document`` numbers
    each sentence's document (consecutive sentences of one document are contiguous)."""

    ids: Tensor  # (N_tokens,)
    start: Tensor  # (N_sentences,)
    length: Tensor  # (N_sentences,)
    pairs: Tensor  # (N_pairs,) sentence indices a with a + 1 its successor
    document: Tensor  # (N_sentences,) 0, 1, 2, ... in order

    @classmethod
    def from_ids(cls, paragraphs: Sequence[Sequence[Sequence[int]]],
                 documents: Sequence[int] | None = None) -> SentenceCorpus:
        """``documents[i]`` is paragraph ``i``'s document (default: every paragraph its own);
        a change of value starts a new document."""
        lengths = [len(s) for p in paragraphs for s in p]
        if not lengths:
            raise DivekitError("no paragraphs of at least two sentences to pretrain on")
        flat = np.fromiter((t for p in paragraphs for s in p for t in s), dtype=np.int64,
                           count=sum(lengths))
        length = torch.tensor(lengths, dtype=torch.long)
        start = torch.cumsum(length, 0) - length
        sizes = torch.tensor([len(p) for p in paragraphs])
        last = torch.cumsum(sizes, 0) - 1  # the last sentence of each paragraph has no successor
        has_next = torch.ones(len(lengths), dtype=torch.bool)
        has_next[last] = False
        has_next &= length > 0
        has_next[:-1] &= length[1:] > 0
        docs = torch.tensor(list(documents) if documents is not None else range(len(paragraphs)))
        if len(docs) != len(paragraphs):
            raise DivekitError(f"{len(docs)} document ids for {len(paragraphs)} paragraphs")
        new_doc = torch.ones(len(docs), dtype=torch.long)
        new_doc[1:] = (docs[1:] != docs[:-1]).long()
        document = torch.repeat_interleave(torch.cumsum(new_doc, 0) - 1, sizes)  # (N_sentences,)
        return cls(torch.from_numpy(flat), start, length, torch.nonzero(has_next).squeeze(1), document)


def _generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def nsp_plan(corpus: SentenceCorpus, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, b, is_next)`` sentence indices of every pair: ``b`` is ``a``'s successor when
    ``is_next`` (probability ½), else a uniformly random non-empty sentence of another document
    (of any document, ``a``'s own aside, when the corpus is a single document)."""
    a = corpus.pairs
    is_next = torch.rand(len(a), generator=generator) < 0.5
    nonempty = torch.nonzero(corpus.length > 0).squeeze(1)  # (S,) sorted, documents contiguous
    doc = corpus.document[nonempty]
    if int(doc[-1]) == int(doc[0]):  # one document: anything but a itself
        doc = torch.arange(len(nonempty))
    first = torch.searchsorted(doc, doc[-1].new_tensor(range(int(doc[-1]) + 1)))  # (D,)
    count = torch.bincount(doc, minlength=len(first))  # (D,) sentences per document
    own = doc[torch.searchsorted(nonempty, a).clamp(max=len(nonempty) - 1)]  # a's document
    # uniform over the sentences outside a's document: draw r < S − |doc(a)|, skip doc(a)'s block
    r = (torch.rand(len(a), generator=generator, dtype=torch.float64)
         * (len(nonempty) - count[own])).long()
    other = nonempty[torch.where(r < first[own], r, r + count[own])]
    return a, torch.where(is_next, a + 1, other), is_next.long()


def pack_pairs(corpus: SentenceCorpus, a: Tensor, b: Tensor, max_len: int, cls_id: int,
               sep_id: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[CLS] a [SEP] b [SEP]`` for every pair at once: ``(tokens, segments, valid_lens)``,
    padded to the longest (≤ ``max_len``); over-long pairs cut the longer sentence first."""
    budget = max_len - 3
    la, lb = corpus.length[a], corpus.length[b]
    la = torch.minimum(la, torch.clamp(budget - lb, min=budget - budget // 2))  # longest first
    lb = torch.minimum(lb, budget - la)
    valid = la + lb + 3  # (B,)
    t = torch.arange(int(valid.max()))[None, :]  # (1, T)
    la_, lb_ = la[:, None], lb[:, None]
    in_a = (t >= 1) & (t <= la_)
    in_b = (t >= la_ + 2) & (t < la_ + lb_ + 2)
    last = corpus.ids.numel() - 1
    from_a = corpus.ids[(corpus.start[a][:, None] + t - 1).clamp(0, last)]
    from_b = corpus.ids[(corpus.start[b][:, None] + t - la_ - 2).clamp(0, last)]
    tokens = torch.full(in_a.shape, pad_id, dtype=torch.long)
    tokens = torch.where(in_a, from_a, torch.where(in_b, from_b, tokens))
    tokens[t.expand_as(tokens) == 0] = cls_id
    tokens[(t == la_ + 1) | (t == la_ + lb_ + 2)] = sep_id
    segments = ((t >= la_ + 2) & (t < valid[:, None])).long()
    return tokens, segments, valid


def replace_mlm_tokens(tokens: Tensor, eligible: Tensor, max_preds: int, mask_id: int,
                       regular_ids: Tensor, generator: torch.Generator,
                       num_preds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 80/10/10 rule on a batch: ``(masked tokens, pred_positions (B, P), weights (B, P),
    labels (B, P))``. Only ``eligible`` positions are ever chosen; random replacements are
    drawn from ``regular_ids`` (the vocabulary less its special tokens). ``num_preds`` (B,)
    fixes how many positions each row chooses (at most its eligible ones; the course's
    ``max(1, round(0.15 len))``) instead of ``⌊0.15 n + u⌋``."""
    B, T = tokens.shape
    n = eligible.sum(1)  # (B,)
    if num_preds is None:
        k = torch.floor(MASK_RATE * n + torch.rand(B, generator=generator)).long()
    else:
        k = torch.minimum(torch.as_tensor(num_preds, dtype=torch.long), n)
    k = k.clamp(max=max_preds)
    scores = torch.rand(B, T, generator=generator).masked_fill(~eligible, 2.0)
    order = scores.argsort(dim=1)[:, :max_preds]  # random eligible positions first
    if order.shape[1] < max_preds:
        order = torch.cat([order, order.new_zeros(B, max_preds - order.shape[1])], 1)
    weights = torch.arange(max_preds)[None, :] < k[:, None]  # (B, P)
    positions = torch.where(weights, order, 0)
    labels = torch.where(weights, tokens.gather(1, positions), 0)
    r = torch.rand(B, max_preds, generator=generator)
    rows = torch.arange(B)[:, None].expand(B, max_preds)
    masked = tokens.clone()
    to_mask, to_random = weights & (r < 0.8), weights & (r >= 0.8) & (r < 0.9)
    masked[rows[to_mask], positions[to_mask]] = mask_id
    draws = regular_ids[torch.randint(len(regular_ids), (int(to_random.sum()),), generator=generator)]
    masked[rows[to_random], positions[to_random]] = draws
    return masked, positions, weights.float(), labels


class BertPretrainLoader:
    """Minibatches of NSP pairs with masked-LM targets; epoch ``e`` depends only on
    ``(seed, e)``, batch ``i`` of it on ``(seed, e, i)``. ``fixed=True`` (validation) draws
    every epoch as epoch 0. Supports the Trainer's ``set_epoch``, ``shard``, ``skip_batches``
    and ``global_batch_size``."""

    def __init__(self, corpus: SentenceCorpus, *, batch_size: int, max_len: int, vocab_size: int,
                 special_ids: dict[str, int], shuffle: bool = True, seed: int = 0,
                 fixed: bool = False, limit: int | None = None):
        if max_len < 5:
            raise DivekitError(f"max_len must be at least 5 ([CLS] a [SEP] b [SEP]), got {max_len}")
        if len(corpus.pairs) == 0:
            raise DivekitError("the corpus has no sentence followed by another: no NSP pairs")
        self.corpus, self.batch_size, self.max_len = corpus, batch_size, max_len
        self.special, self.shuffle, self.seed, self.fixed = special_ids, shuffle, seed, fixed
        specials = torch.tensor(sorted(special_ids.values()))
        everything = torch.arange(vocab_size)
        self.regular_ids = everything[~torch.isin(everything, specials)]
        self.max_preds = int(MASK_RATE * (max_len - 3)) + 1
        self.num_pairs = min(len(corpus.pairs), limit) if limit else len(corpus.pairs)
        self.epoch, self.rank, self.world_size, self._skip = 0, 0, 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> BertPretrainLoader:
        if not 0 <= rank < world_size or world_size > self.num_pairs:
            raise DivekitError(f"rank {rank} of {world_size} cannot share {self.num_pairs} pairs")
        self.rank, self.world_size = rank, world_size
        return self

    def skip_batches(self, count: int) -> None:
        self._skip = count

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return -(-self.num_pairs // self.global_batch)

    def global_batch_size(self, index: int) -> int:
        return min(self.global_batch, self.num_pairs - index * self.global_batch)

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, ...]]:
        """Every global batch of ``epoch`` from batch ``skip`` on, this rank's rows."""
        epoch = 0 if self.fixed else epoch
        a, b, is_next = nsp_plan(self.corpus, _generator(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(len(a), generator=_generator(self.seed, epoch, 1))[: self.num_pairs]
        else:
            order = torch.arange(self.num_pairs)
        skip, self._skip = self._skip, 0
        for i in range(skip, len(self)):
            idx = order[i * self.global_batch : (i + 1) * self.global_batch]
            batch = self.make_batch(a[idx], b[idx], is_next[idx], _generator(self.seed, epoch, 2, i))
            lo, hi = shard_bounds(len(idx), self.rank, self.world_size)
            yield tuple(x[lo:hi] for x in batch)

    def make_batch(self, a: Tensor, b: Tensor, is_next: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, ...]:
        s = self.special
        tokens, segments, valid = pack_pairs(self.corpus, a, b, self.max_len, s["cls"], s["sep"], s["pad"])
        t = torch.arange(tokens.shape[1])[None, :]
        eligible = (t < valid[:, None]) & ~torch.isin(tokens, torch.tensor(list(s.values())))
        masked, positions, weights, labels = replace_mlm_tokens(
            tokens, eligible, self.max_preds, s["mask"], self.regular_ids, generator)
        return masked, segments, valid, positions, weights, labels, is_next

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self.batches(self.epoch)
