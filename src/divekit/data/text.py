"""The text pipeline: ``Vocab``, corpora, and minibatch sampling for language models.

Follows the course's chapter "Text Preprocessing" and "Language Models" (``d2l``'s ``Vocab``,
``load_corpus_time_machine``, ``seq_data_iter_random``, ``seq_data_iter_sequential``,
``SeqDataLoader``) with the same argument orders; the sampling is vectorised with tensor indexing
and reproducible from a ``torch.Generator``. The course's ``tokenize`` lives with every other
tokenizer, :func:`divekit.tokenizers.tokenize`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from divekit import hub
from divekit.data.loader import shard_bounds
from divekit.data.registry import register_dataset
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError
from divekit.tokenizers import tokenize

UNK = "<unk>"

TIMEMACHINE_FILE = "timemachine.txt"
TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


# ----------------------------------------------------------------------------- vocabulary


def _flatten(tokens: Sequence[Any]) -> list[str]:
    """A flat token list from a flat or nested (list of lines) one."""
    if tokens and isinstance(tokens[0], list | tuple):
        return [tok for line in tokens for tok in line]
    return list(tokens)


class Vocab:
    """Map tokens to indices and back.

    Index 0 is ``<unk>``, then the ``reserved_tokens`` in the order given, then every token seen
    at least ``min_freq`` times, most frequent first. Ties in frequency keep the order of first
    appearance in ``tokens`` (a stable sort of a ``Counter``), so the same text always gives the
    same vocabulary.
    """

    def __init__(
        self,
        tokens: Sequence[Any] | None = None,
        min_freq: int = 0,
        reserved_tokens: Sequence[str] | None = None,
    ):
        reserved = list(reserved_tokens or [])
        if UNK in reserved:
            raise DivekitError(
                f"reserved_tokens {reserved!r} must not contain {UNK!r}; it is always index 0"
            )
        if len(set(reserved)) != len(reserved):
            raise DivekitError(f"reserved_tokens {reserved!r} has duplicates")
        counter = Counter(_flatten(tokens or []))
        self.min_freq = min_freq
        self.reserved_tokens = reserved
        self.token_freqs: list[tuple[str, int]] = sorted(
            counter.items(), key=lambda x: x[1], reverse=True
        )
        self.idx_to_token: list[str] = [UNK, *reserved]
        seen = set(self.idx_to_token)
        for tok, freq in self.token_freqs:
            if freq >= min_freq and tok not in seen:
                self.idx_to_token.append(tok)
                seen.add(tok)
        self.token_to_idx = {tok: i for i, tok in enumerate(self.idx_to_token)}

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_idx

    def __getitem__(self, tokens: Any) -> Any:
        """A token's index (``<unk>``'s for unknown ones); lists and tuples map elementwise."""
        if isinstance(tokens, list | tuple):
            return [self.__getitem__(tok) for tok in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices: Any) -> Any:
        """The token of an index, or a list of tokens for a list, tuple or tensor of indices."""
        if isinstance(indices, Tensor | np.ndarray):
            indices = indices.tolist()
        if isinstance(indices, list | tuple):
            return [self.to_tokens(i) for i in indices]
        index = int(indices)
        if not 0 <= index < len(self):
            raise DivekitError(f"index {index} is outside the vocabulary of {len(self)} tokens")
        return self.idx_to_token[index]

    @property
    def unk(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocab)
            and self.idx_to_token == other.idx_to_token
            and self.token_freqs == other.token_freqs
            and self.min_freq == other.min_freq
            and self.reserved_tokens == other.reserved_tokens
        )

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self.idx_to_token[:8])
        return f"Vocab({len(self)} tokens: {head}{', ...' if len(self) > 8 else ''})"

    # -- JSON round trip
    def to_dict(self) -> dict[str, Any]:
        return {
            "idx_to_token": self.idx_to_token,
            "token_freqs": [[tok, freq] for tok, freq in self.token_freqs],
            "min_freq": self.min_freq,
            "reserved_tokens": self.reserved_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocab:
        vocab = cls.__new__(cls)
        try:
            vocab.idx_to_token = list(data["idx_to_token"])
            vocab.token_freqs = [(str(tok), int(freq)) for tok, freq in data["token_freqs"]]
            vocab.min_freq = data["min_freq"]
            vocab.reserved_tokens = list(data["reserved_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise DivekitError(f"not a saved Vocab: missing or malformed field ({e})") from None
        if not vocab.idx_to_token or vocab.idx_to_token[0] != UNK:
            raise DivekitError(f"not a saved Vocab: index 0 must be {UNK!r}")
        vocab.token_to_idx = {tok: i for i, tok in enumerate(vocab.idx_to_token)}
        return vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as UTF-8 JSON; :meth:`load` restores it exactly."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"vocabulary file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DivekitError(f"vocabulary file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- corpora


def preprocess(lines: Sequence[str]) -> list[str]:
    """The course's time-machine cleaning: non-letters become one space, then strip and lower-case."""
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def read_pydoc() -> list[str]:
    """Raw lines of English prose: Python's own help topics (``pydoc_data.topics``), in key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).split("\n")


def read_timemachine(
    data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> list[str]:
    """Raw lines of H. G. Wells' *The Time Machine* from ``data_dir`` or the hub's cache
    (:func:`divekit.hub.data_home`)."""
    root = Path(data_dir) if data_dir is not None else hub.data_home()
    path = root / TIMEMACHINE_FILE
    if not path.is_file() and download:
        path = _download_timemachine(root)
    if not path.is_file():
        raise DataNotFoundError(
            f"{TIMEMACHINE_FILE!r} not found at {str(path)!r}; download {TIMEMACHINE_URL} "
            f"(sha1 {TIMEMACHINE_SHA1}) and put it there, or pass data_dir=DIR (--data-dir DIR) "
            "for a folder that holds it"
        )
    return path.read_text(encoding="utf-8").split("\n")


def _download_timemachine(root: Path) -> Path:
    return Path(hub.download(TIMEMACHINE_URL, root, sha1=TIMEMACHINE_SHA1))


_CORPUS_READERS: dict[str, Callable[..., list[str]]] = {
    "pydoc": lambda data_dir=None, download=False: read_pydoc(),
    "timemachine": read_timemachine,
}


def corpus_lines(
    name: str, *, data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> list[str]:
    """The lines of corpus ``name``, cleaned by :func:`preprocess` (what tokenizers see)."""
    if name not in _CORPUS_READERS:
        raise UnknownNameError("text corpus", name, _CORPUS_READERS)
    return preprocess(_CORPUS_READERS[name](data_dir=data_dir, download=download))


class TextCorpus(NamedTuple):
    """A corpus of token indices and its vocabulary; unpacks as ``corpus, vocab``."""

    corpus: list[int]
    vocab: Vocab


def load_corpus(
    name: str,
    *,
    token: str = "char",
    max_tokens: int = -1,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    vocab: Vocab | None = None,
) -> TextCorpus:
    """Token indices of a whole corpus and its vocabulary, like ``d2l.load_corpus_time_machine``.

    Lines are cleaned by :func:`preprocess` and concatenated (as in the course, character corpora
    have no separator between lines). ``max_tokens > 0`` keeps only the first ``max_tokens``
    tokens. Pass ``vocab`` to encode with an existing vocabulary (e.g. a trained model's).
    """
    if name not in _CORPUS_READERS:
        raise UnknownNameError("text corpus", name, _CORPUS_READERS)
    lines = preprocess(_CORPUS_READERS[name](data_dir=data_dir, download=download))
    tokens = tokenize(lines, token)
    vocab = vocab if vocab is not None else Vocab(tokens)
    index = vocab.token_to_idx.get  # a plain dict lookup: corpora have ~10^5-10^6 tokens
    corpus = [index(tok, vocab.unk) for line in tokens for tok in line]
    if max_tokens > 0:
        corpus = corpus[:max_tokens]
    return TextCorpus(corpus, vocab)


@register_dataset("pydoc", task="text", offline=True)
def load_pydoc(
    *, data_dir: Any = None, download: bool = False, seed: int = 0, **options: Any
) -> TextCorpus:
    """English prose from Python's own help topics (pydoc_data), cleaned like the course's text."""
    return load_corpus("pydoc", data_dir=data_dir, download=download, **options)


@register_dataset("timemachine", task="text", offline=False)
def load_timemachine(
    *, data_dir: Any = None, download: bool = False, seed: int = 0, **options: Any
) -> TextCorpus:
    """H. G. Wells' The Time Machine, the course's language-model corpus (timemachine.txt)."""
    return load_corpus("timemachine", data_dir=data_dir, download=download, **options)


# ----------------------------------------------------------------------------- sampling


def _as_corpus(corpus: Sequence[int] | Tensor) -> Tensor:
    data = torch.as_tensor(corpus, dtype=torch.long)
    if data.dim() != 1:
        raise DivekitError(
            f"corpus must be a flat sequence of token indices, got shape {tuple(data.shape)}"
        )
    if data.numel() == 0:
        raise DivekitError("corpus is empty; nothing to sample")
    return data


def _max_offset(n: int, batch_size: int, num_steps: int) -> int:
    """The largest random offset: ``num_steps - 1`` as in the course, less when the corpus is so
    short that a larger offset would leave no full minibatch (so no epoch is ever empty)."""
    if batch_size < 1 or num_steps < 1:
        raise DivekitError(
            f"batch_size and num_steps must be >= 1, got {batch_size} and {num_steps}"
        )
    if num_steps >= n:
        raise DivekitError(
            f"num_steps={num_steps} is longer than the corpus allows ({n} tokens give at most "
            f"{n - 1} input/label steps)"
        )
    spare = n - 1 - batch_size * num_steps
    if spare < 0:
        raise DivekitError(
            f"batch_size={batch_size} is too large: {batch_size} x num_steps={num_steps} needs "
            f"{batch_size * num_steps + 1} tokens, the corpus has {n}"
        )
    return min(num_steps - 1, spare)


def _random_offset(max_offset: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(max_offset + 1, (1,), generator=generator))


def seq_data_iter_random(
    corpus: Sequence[int] | Tensor,
    batch_size: int,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Random partitioning: ``(X, Y)`` minibatches of shape ``(batch_size, num_steps)``.

    The corpus is cut at a random offset in ``[0, num_steps - 1]`` into subsequences of
    ``num_steps`` tokens; the subsequences are shuffled and each starts at most one row of the
    epoch. ``Y`` is ``X`` shifted by one token. Adjacent minibatches are not adjacent in the text.
    Every epoch yields the same number of minibatches (counted for the largest offset).
    """
    data = _as_corpus(corpus)
    max_offset = _max_offset(len(data), batch_size, num_steps)
    num_batches = (len(data) - 1 - max_offset) // num_steps // batch_size
    offset = _random_offset(max_offset, generator)
    num_subseqs = (len(data) - 1 - offset) // num_steps
    starts = offset + num_steps * torch.randperm(num_subseqs, generator=generator)
    starts = starts[: num_batches * batch_size].reshape(num_batches, batch_size)
    steps = torch.arange(num_steps)
    for batch_starts in starts:
        index = batch_starts[:, None] + steps  # (batch_size, num_steps)
        yield data[index], data[index + 1]


def seq_data_iter_sequential(
    corpus: Sequence[int] | Tensor,
    batch_size: int,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Sequential partitioning: row ``r`` of minibatch ``i + 1`` continues row ``r`` of minibatch ``i``.

    From a random offset in ``[0, num_steps - 1]`` the corpus is split into ``batch_size``
    contiguous streams, read ``num_steps`` tokens at a time, so a hidden state can be carried
    across minibatches. ``Y`` is ``X`` shifted by one token.
    """
    data = _as_corpus(corpus)
    max_offset = _max_offset(len(data), batch_size, num_steps)
    stream_len = (len(data) - 1 - max_offset) // batch_size
    num_batches = stream_len // num_steps
    offset = _random_offset(max_offset, generator)
    num_tokens = stream_len * batch_size
    Xs = data[offset : offset + num_tokens].reshape(batch_size, stream_len)
    Ys = data[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, stream_len)
    for i in range(0, num_batches * num_steps, num_steps):
        yield Xs[:, i : i + num_steps], Ys[:, i : i + num_steps]


SAMPLERS = {"random": seq_data_iter_random, "sequential": seq_data_iter_sequential}


class SeqDataLoader:
    """Iterate language-model minibatches; epoch ``e``'s batches depend only on ``(seed, e)``.

    Each ``iter()`` uses the current epoch and then advances it, so plain ``for X, Y in loader``
    in a loop gives a fresh partition every epoch (as in the course). To resume a run exactly,
    call :meth:`set_epoch` with the epoch to replay, like ``DistributedSampler``.
    """

    def __init__(
        self,
        corpus: Sequence[int] | Tensor,
        batch_size: int,
        num_steps: int,
        sampling: str = "random",
        seed: int = 0,
    ):
        if sampling not in SAMPLERS:
            raise DivekitError(
                f"unknown sampling {sampling!r}; choose one of: {', '.join(SAMPLERS)}"
            )
        self.corpus = _as_corpus(corpus)
        _max_offset(len(self.corpus), batch_size, num_steps)  # validate now, not mid-training
        self.batch_size, self.num_steps = batch_size, num_steps
        self.sampling, self.seed, self.epoch = sampling, seed, 0
        self.rank, self.world_size, self._skip = 0, 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> SeqDataLoader:
        """Data parallelism: ``batch_size`` becomes the per-process share. Every process draws
        the same global minibatches of ``batch_size × world_size`` rows (same seed and epoch)
        and keeps its own rows. A row is one stream of text, so with sequential sampling each
        process carries the hidden state of its own rows, exactly as one process reading the
        global batch would."""
        if not 0 <= rank < world_size:
            raise DivekitError(f"rank {rank} is not in 0..{world_size - 1}")
        _max_offset(len(self.corpus), self.batch_size * world_size, self.num_steps)
        self.rank, self.world_size = rank, world_size
        return self

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def skip_batches(self, count: int) -> None:
        """The next ``iter()`` starts at batch ``count`` (mid-epoch resume)."""
        self._skip = count

    def global_batch_size(self, index: int) -> int:
        """Tokens of global minibatch ``index`` over all processes (every batch is full), the
        unit the language-model task counts a batch in."""
        return self.global_batch * self.num_steps

    def generator(self, epoch: int) -> torch.Generator:
        """The generator for ``epoch``, seeded by mixing ``(seed, epoch)``."""
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self._skip = self._skip, 0
        sampler = SAMPLERS[self.sampling]
        batches = sampler(self.corpus, self.global_batch, self.num_steps, generator=self.generator(epoch))
        if skip:
            batches = itertools.islice(batches, skip, None)
        if self.world_size == 1:
            return iter(batches)
        lo, hi = shard_bounds(self.global_batch, self.rank, self.world_size)
        return ((X[lo:hi], Y[lo:hi]) for X, Y in batches)

    def __len__(self) -> int:
        n, rows = len(self.corpus), self.global_batch
        max_offset = _max_offset(n, rows, self.num_steps)
        if self.sampling == "random":
            return (n - 1 - max_offset) // self.num_steps // rows
        return (n - 1 - max_offset) // rows // self.num_steps

    @property
    def sequential(self) -> bool:
        """True when the hidden state may be carried (detached) across minibatches."""
        return self.sampling == "sequential"
