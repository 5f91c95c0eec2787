"""Language-model statistics: n-gram frequency tables and an add-k n-gram model.

The course's "Language Models" section: word frequencies follow Zipf's law (a straight line on a
log-log plot of frequency against rank, :func:`divekit.viz.plot_zipf` draws it from these
tables), and so do bigrams and trigrams, with a smaller slope.
An n-gram model estimates ``P(x_t | x_{t-n+1}, ..., x_{t-1})`` from counts; add-k (Laplace for
``k = 1``) smoothing gives unseen n-grams a small probability so perplexity stays finite.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from divekit.errors import DivekitError

UNK = "<unk>"


def _flat(tokens: Sequence[Any]) -> list[str]:
    if tokens and isinstance(tokens[0], list | tuple):
        return [tok for line in tokens for tok in line]
    return list(tokens)


def ngram_freqs(tokens: Sequence[Any], n: int) -> Counter[tuple[str, ...]]:
    """Counts of every run of ``n`` consecutive tokens, keyed by tuples (lines are concatenated)."""
    if n < 1:
        raise DivekitError(f"n must be >= 1, got {n}")
    flat = _flat(tokens)
    return Counter(zip(*(flat[i:] for i in range(n))))


def unigram_freqs(tokens: Sequence[Any]) -> Counter[tuple[str, ...]]:
    return ngram_freqs(tokens, 1)


def bigram_freqs(tokens: Sequence[Any]) -> Counter[tuple[str, ...]]:
    return ngram_freqs(tokens, 2)


def trigram_freqs(tokens: Sequence[Any]) -> Counter[tuple[str, ...]]:
    return ngram_freqs(tokens, 3)


class NGramLM:
    """An n-gram language model with add-k smoothing.

    ``P(w | c) = (count(c, w) + k) / (count(c) + k * V)`` where ``c`` is the previous ``n - 1``
    tokens and ``V`` the training vocabulary plus one ``<unk>`` slot that every unseen token maps
    to. An unseen context gets the uniform ``1 / V`` (the formula's value for any ``k > 0``, and
    its limit as ``k -> 0``). With ``k = 0`` an unseen n-gram in a seen context has probability 0
    and the perplexity is infinite.
    """

    def __init__(self, n: int, k: float = 1.0):
        if n < 1:
            raise DivekitError(f"n must be >= 1, got {n}")
        if not k >= 0:
            raise DivekitError(f"smoothing k must be >= 0, got {k}")
        self.n, self.k = n, float(k)
        self.ngrams: Counter[tuple[str, ...]] = Counter()
        self.contexts: Counter[tuple[str, ...]] = Counter()
        self.vocab: set[str] = set()

    def fit(self, tokens: Sequence[Any]) -> NGramLM:
        """Count n-grams and their contexts in a flat or nested token list; returns ``self``."""
        flat = _flat(tokens)
        if len(flat) < self.n:
            raise DivekitError(f"need at least n={self.n} tokens to fit, got {len(flat)}")
        self.vocab = set(flat) | {UNK}
        self.ngrams = ngram_freqs(flat, self.n)
        self.contexts = Counter()
        for gram, count in self.ngrams.items():
            self.contexts[gram[:-1]] += count
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _check_fitted(self) -> None:
        if not self.ngrams:
            raise DivekitError("the n-gram model is not fitted; call fit(tokens) first")

    def _known(self, tok: str) -> str:
        return tok if tok in self.vocab else UNK

    def prob(self, context: Sequence[str], token: str) -> float:
        """``P(token | context)``; only the last ``n - 1`` tokens of ``context`` are used."""
        self._check_fitted()
        context = list(context)
        if len(context) < self.n - 1:
            raise DivekitError(
                f"a {self.n}-gram model needs {self.n - 1} context tokens, got {len(context)}"
            )
        ctx = tuple(self._known(t) for t in context[len(context) - (self.n - 1) :])
        return self._prob(ctx, self._known(token))

    def _prob(self, ctx: tuple[str, ...], tok: str) -> float:
        ctx_count = self.contexts.get(ctx, 0)
        if ctx_count == 0:
            return 1.0 / self.vocab_size
        return (self.ngrams.get((*ctx, tok), 0) + self.k) / (ctx_count + self.k * self.vocab_size)

    def perplexity(self, tokens: Sequence[Any]) -> float:
        """``exp`` of the mean negative log-likelihood of every token that has a full context."""
        self._check_fitted()
        flat = [self._known(t) for t in _flat(tokens)]
        if len(flat) < self.n:
            raise DivekitError(f"need at least n={self.n} tokens to score, got {len(flat)}")
        nll = 0.0
        m = self.n - 1
        for t in range(m, len(flat)):
            p = self._prob(tuple(flat[t - m : t]), flat[t])
            if p == 0.0:
                return math.inf
            nll -= math.log(p)
        return math.exp(nll / (len(flat) - m))
