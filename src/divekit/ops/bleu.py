"""BLEU: the course's per-sentence score (d2l 10.7) and standard corpus BLEU (Papineni et al., 2002).

``bleu(pred_seq, label_seq, k)`` is the course's definition, for one prediction and one label::

    BLEU = exp(min(0, 1 - len_label / len_pred)) * prod_{n=1..k} p_n ** (1 / 2**n)

where ``p_n`` is the clipped n-gram precision: each predicted n-gram counts as a match at most as
many times as it occurs in the label. Scores lie in ``[0, 1]``.

``corpus_bleu(hypotheses, references)`` is the BLEU that papers report, computed the way
sacrebleu computes it (and checked against it in ``tests/test_bleu.py``): clipped n-gram matches
and totals are summed over the whole corpus before dividing (a sentence's clip is the largest
count in any one of its references), the brevity penalty compares the total hypothesis length
``c`` with the total of each sentence's closest reference length ``r`` (ties: the shorter),
``BP = 1 if c >= r else exp(1 - r / c)``, and::

    BLEU = 100 * BP * exp(mean_{n=1..N} log p_n)

on a 0-100 scale, like sacrebleu. Text is tokenized with mteval-v13a's rules (``tokenize="13a"``,
the WMT standard and sacrebleu's default) or split on whitespace (``tokenize="none"``).
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from divekit.errors import DivekitError

__all__ = ["BleuStats", "bleu", "corpus_bleu", "corpus_bleu_stats", "tokenize_13a"]

Smoothing = Literal["none", "floor", "add-k", "exp"]
Tokenizer = Literal["13a", "none"]

# Default smoothing values (Chen & Cherry 2014, "A Systematic Comparison of Smoothing Techniques
# for Sentence-Level BLEU"; also sacrebleu's): floor is method 1, add-k method 2.
_SMOOTH_DEFAULTS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}

Ngram = tuple[str, ...]


def _ngram_counts(tokens: Sequence[str], max_order: int) -> Counter[Ngram]:
    """All n-grams of ``tokens`` with ``1 <= n <= max_order``, counted."""
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_order + 1):
        counts.update(zip(*(tokens[i:] for i in range(n))))  # Counter.update counts in C
    return counts


# --------------------------------------------------------------------------- the course's BLEU


def bleu(pred_seq: str, label_seq: str, k: int) -> float:
    """The course's BLEU of one predicted sentence against one label sentence, in ``[0, 1]``.

    Tokens are whitespace-separated words (``str.split()``; the course splits on single spaces,
    which is the same for the space-joined sentences it produces). ``k`` is the longest n-gram
    order. Counting is the course's (a table of the label's n-grams, consumed by the
    prediction's), with n-grams as tuples from ``zip`` instead of joined strings.

    Where a precision is undefined the score is 0.0: an empty prediction, or a prediction shorter
    than ``k`` tokens (it has no ``k``-grams). The course divides by zero for ``len_pred == k - 1``
    and gets 0 for shorter predictions. An empty label gives 0.0 too (nothing can match).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DivekitError(f"k must be an integer >= 1 (the longest n-gram order), got {k!r}")
    for name, seq in (("pred_seq", pred_seq), ("label_seq", label_seq)):
        if not isinstance(seq, str):
            raise DivekitError(f"{name} must be a string, got {type(seq).__name__}")
    pred_tokens, label_tokens = pred_seq.split(), label_seq.split()
    len_pred, len_label = len(pred_tokens), len(label_tokens)
    if len_pred < k:  # includes len_pred == 0: p_n = 0 / 0 for n > len_pred
        return 0.0
    score = math.exp(min(0.0, 1 - len_label / len_pred))
    for n in range(1, k + 1):
        label_grams = label_tokens if n == 1 else list(zip(*[label_tokens[i:] for i in range(n)]))
        pred_grams = pred_tokens if n == 1 else zip(*[pred_tokens[i:] for i in range(n)])
        label_ngrams: dict = {}
        for gram in label_grams:
            label_ngrams[gram] = label_ngrams.get(gram, 0) + 1
        num_matches = 0
        for gram in pred_grams:
            left = label_ngrams.get(gram, 0)
            if left:  # clipped: each label n-gram matches at most as often as it occurs
                num_matches += 1
                label_ngrams[gram] = left - 1
        score *= (num_matches / (len_pred - n + 1)) ** (0.5**n)
    return score


# --------------------------------------------------------------------------- 13a tokenizer

# mteval-v13a.pl's rules: ASCII punctuation other than ' - . , becomes its own token; a period or
# comma is split off unless it sits between digits (3.5 and 1,000 stay whole); a dash is split
# off after a digit. Each rule consumes the characters it matches, exactly as the Perl s///g does,
# so e.g. in "a.." only the first period is split off by the "not after a digit" rule.
_PUNCTUATION = "".join(c for c in string.punctuation if c not in "'-.,")
_RULES_13A = (
    (re.compile(f"([{re.escape(_PUNCTUATION)}])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period/comma not preceded by a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period/comma not followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash preceded by a digit
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> list[str]:
    """Tokens of ``line`` by mteval-v13a's rules (WMT's standard, sacrebleu's default ``13a``).

    Drops ``<skipped>`` markers and hyphenated line breaks, unescapes ``&quot; &amp; &lt; &gt;``
    (in that order), then applies the punctuation rules above and splits on whitespace.
    """
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        for entity, char in _ENTITIES:
            line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _RULES_13A:
        line = pattern.sub(replacement, line)
    return line.split()


# --------------------------------------------------------------------------- corpus BLEU


@dataclass(frozen=True)
class BleuStats:
    """Corpus BLEU and its parts.

    ``score`` is on the 0-100 scale; ``precisions[n - 1]`` is the n-gram precision in percent
    after smoothing (sacrebleu's ``precisions``); ``counts`` and ``totals`` are the clipped
    matches and the hypothesis n-grams per order, before any smoothing; ``bp`` is the brevity
    penalty; ``sys_len`` and ``ref_len`` the total hypothesis and (closest) reference lengths.
    """

    score: float
    precisions: tuple[float, ...]
    counts: tuple[int, ...]
    totals: tuple[int, ...]
    bp: float
    sys_len: int
    ref_len: int


def _closest_ref_len(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to ``hyp_len``; on a tie the shorter one."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _reference_lists(
    references: Sequence[str] | Sequence[Sequence[str]], n_hyp: int
) -> list[list[str]]:
    """``references`` as one non-empty list of strings per hypothesis; else a ``DivekitError``."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise DivekitError(
            "references must be a list with one entry per hypothesis (a string or a list of "
            f"strings), got {type(references).__name__}"
        )
    if len(references) != n_hyp:
        raise DivekitError(
            f"got {n_hyp} hypotheses but {len(references)} references; give one reference "
            "(or a list of references) per hypothesis"
        )
    out = []
    for i, refs in enumerate(references):
        refs_i = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs_i, Sequence) or not refs_i:
            raise DivekitError(
                f"references[{i}] must be a string or a non-empty list of strings, got {refs!r}"
            )
        for j, ref in enumerate(refs_i):
            if not isinstance(ref, str):
                raise DivekitError(
                    f"references[{i}][{j}] must be a string, got {type(ref).__name__}"
                )
        out.append(list(refs_i))
    return out


def _check_options(max_order: int, smooth: str, tokenize: str) -> None:
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
        raise DivekitError(f"max_order must be an integer >= 1, got {max_order!r}")
    if smooth not in _SMOOTH_DEFAULTS:
        raise DivekitError(
            f"unknown smoothing {smooth!r}; choose one of: {', '.join(_SMOOTH_DEFAULTS)}"
        )
    if tokenize not in ("13a", "none"):
        raise DivekitError(f"unknown tokenizer {tokenize!r}; choose one of: 13a, none")


def _corpus_statistics(
    hypotheses: Sequence[str],
    references: list[list[str]],
    max_order: int,
    split: Callable[[str], list[str]],
) -> tuple[list[int], list[int], int, int]:
    """Clipped matches and totals per order, summed over the corpus, and the two lengths."""
    counts, totals = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = split(hyp)
        ref_tokens = [split(ref) for ref in refs]
        max_ref_counts = _ngram_counts(ref_tokens[0], max_order)
        for more in ref_tokens[1:]:
            max_ref_counts |= _ngram_counts(more, max_order)  # |: the max of the counts
        n_hyp = len(hyp_tokens)
        sys_len += n_hyp
        ref_len += _closest_ref_len(n_hyp, [len(r) for r in ref_tokens])
        for n in range(max_order):
            totals[n] += max(0, n_hyp - n)
        get = max_ref_counts.get
        for ngram, count in _ngram_counts(hyp_tokens, max_order).items():
            matched = get(ngram, 0)
            if matched:
                counts[len(ngram) - 1] += count if count < matched else matched
    return counts, totals, sys_len, ref_len


def _smoothed_precisions(
    counts: Sequence[int], totals: Sequence[int], smooth: str, smooth_value: float
) -> list[float]:
    """n-gram precisions in percent; 0.0 where an order is undefined or unmatched (no smoothing).

    floor: an order with no match gets ``smooth_value / total``; add-k: orders ``n >= 2`` get
    ``(matches + k) / (total + k)``; exp (NIST, mteval-v13a): the i-th order with no match gets
    ``1 / (2**i * total)``.
    """
    precisions = [0.0] * len(counts)
    unmatched_orders = 0
    for n, (correct, total) in enumerate(zip(counts, totals), start=1):
        correct_f, total_f = float(correct), float(total)
        if smooth == "add-k" and n > 1:
            correct_f += smooth_value
            total_f += smooth_value
        if total_f == 0:  # no n-grams of this order (nor, then, of any longer one)
            break
        if correct_f > 0:
            precisions[n - 1] = 100.0 * correct_f / total_f
        elif smooth == "exp":
            unmatched_orders += 1
            precisions[n - 1] = 100.0 / (2**unmatched_orders * total_f)
        elif smooth == "floor":
            precisions[n - 1] = 100.0 * smooth_value / total_f
    return precisions


def corpus_bleu_stats(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    max_order: int = 4,
    smooth: Smoothing = "none",
    tokenize: Tokenizer = "13a",
    lowercase: bool = False,
    smooth_value: float | None = None,
) -> BleuStats:
    """Corpus BLEU with its parts (see ``corpus_bleu`` for the arguments)."""
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise DivekitError(f"hypotheses must be a list of strings, got {type(hypotheses).__name__}")
    if not hypotheses:
        raise DivekitError("hypotheses is empty; corpus BLEU needs at least one sentence")
    for i, hyp in enumerate(hypotheses):
        if not isinstance(hyp, str):
            raise DivekitError(f"hypotheses[{i}] must be a string, got {type(hyp).__name__}")
    refs = _reference_lists(references, len(hypotheses))
    _check_options(max_order, smooth, tokenize)
    if smooth_value is None:
        smooth_value = _SMOOTH_DEFAULTS[smooth] or 0.0
    elif (
        isinstance(smooth_value, bool)
        or not isinstance(smooth_value, int | float)
        or not smooth_value >= 0
    ):
        raise DivekitError(f"smooth_value must be a number >= 0, got {smooth_value!r}")

    tokenizer = tokenize_13a if tokenize == "13a" else str.split

    def split(line: str) -> list[str]:
        line = line.lower() if lowercase else line
        return tokenizer(line.rstrip())

    counts, totals, sys_len, ref_len = _corpus_statistics(hypotheses, refs, max_order, split)
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    if not any(counts):  # nothing matched: 0 whatever the smoothing (as in sacrebleu)
        precisions = [0.0] * max_order
    else:
        precisions = _smoothed_precisions(counts, totals, smooth, float(smooth_value))
    if min(precisions) > 0:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_order)
    else:
        score = 0.0  # the geometric mean of anything with a zero is zero
    return BleuStats(score, tuple(precisions), tuple(counts), tuple(totals), bp, sys_len, ref_len)


def corpus_bleu(*args: Any, **kwargs: Any) -> float:
    """Standard corpus BLEU on a 0-100 scale (sacrebleu's number for the same options).

    ``hypotheses`` is one string per sentence; ``references`` has one entry per hypothesis, a
    string or a list of strings (any number, at least one, per sentence). Note the layout:
    ``references[i]`` belongs to ``hypotheses[i]``; sacrebleu instead takes reference *streams*,
    ``refs[j][i]``.

    ``smooth`` handles n-gram orders with no match (Chen & Cherry 2014): ``"none"`` (Papineni's
    BLEU: the score is then 0; the default), ``"floor"`` (``smooth_value``, default 0.1, matches),
    ``"add-k"`` (add ``smooth_value``, default 1, to matches and totals of orders >= 2) or
    ``"exp"`` (NIST's, sacrebleu's default). A corpus with no matching unigram scores 0 whatever
    the smoothing. ``tokenize="13a"`` is mteval-v13a's tokenizer (``tokenize_13a``); ``"none"``
    splits on whitespace. ``lowercase`` folds case first. ``corpus_bleu_stats`` returns the
    precisions, brevity penalty and lengths as well; this is its ``score``, and its arguments are
    these (one list of them, shown by ``help`` and ``inspect.signature`` here too).
    """
    return corpus_bleu_stats(*args, **kwargs).score


corpus_bleu.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    corpus_bleu_stats
).replace(return_annotation="float")
