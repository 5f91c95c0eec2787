"""Metrics of the fine-tuning heads: classification, entity tagging and extractive QA.

* **Classification** — accuracy and macro-F1, the unweighted mean over the classes of
  ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` (classes absent from both gold and prediction
  are left out, as scikit-learn does).
* **Tagging** — entity-level precision, recall and F1 by the conventions of ``seqeval``: an
  entity is a ``(sentence, type, first, last)`` span; ``P = |gold ∩ pred| / |pred|``,
  ``R = |gold ∩ pred| / |gold|``, ``F1 = 2PR / (P + R)`` over all entities (micro average).
  The default (``strict=False``) reads spans as conlleval does, the same for IOB1 and IOB2
  (``I-X`` after ``O`` opens a span); ``strict=True`` follows the scheme's own rules
  (``seqeval``'s ``mode="strict"``), where IOB2 spans must open with ``B-``.
* **Question answering** — the official SQuAD v1.1 rules: both strings are normalised
  (lower case, punctuation and the articles *a an the* removed, white space collapsed);
  exact match is equality; F1 is over the bags of normalised tokens; each is the best over the
  gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first token, last token), both inclusive


# ----------------------------------------------------------------------------- classification
def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    return sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


def macro_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes seen in ``gold`` or ``pred``."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold labels")
    classes = sorted(set(pred) | set(gold))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- entities
def _split(tag: str) -> tuple[str, str]:
    """``'B-PER'`` → ``('B', 'PER')``; ``'O'`` → ``('O', '_')``."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _lenient_entities(tags: Sequence[str]) -> list[Entity]:
    """conlleval's reading (seqeval's default mode): a span ends at O, at a B, or where the
    type changes; it starts at a B, or at an I after O or after another type."""
    out: list[Entity] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, kind = _split(chunk)
        ends = (prev_tag in ("E", "S")
                or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
                or (prev_tag not in ("O", ".") and prev_type != kind))
        starts = (tag in ("B", "S")
                  or (prev_tag in ("E", "S") and tag in ("E", "I"))
                  or (prev_tag == "O" and tag in ("E", "I"))
                  or (tag not in ("O", ".") and prev_type != kind))
        if ends:
            out.append((prev_type, begin, i - 1))
        if starts:
            begin = i
        prev_tag, prev_type = tag, kind
    return out


# Strict rules as (previous prefixes, current prefixes, type condition) patterns.
_ANY = "IOB"
_INSIDE = {("B", "I", "same"), ("I", "I", "same")}
_START = {
    "iob1": {("O", "I", "any"), ("I", "I", "diff"), ("B", "I", "any"), ("I", "B", "same"),
             ("B", "B", "same")},
    "iob2": {(_ANY, "B", "any")},
}
_END = {
    "iob1": {("I", "I", "diff"), ("I", "O", "any"), ("I", "B", "any"), ("B", "O", "any"),
             ("B", "I", "diff"), ("B", "B", "same")},
    "iob2": {("I", "O", "any"), ("I", "I", "diff"), ("I", "B", "any"), ("B", "O", "any"),
             ("B", "I", "diff"), ("B", "B", "any")},
}


def _matches(prev: tuple[str, str], cur: tuple[str, str], patterns: set[tuple[str, str, str]]) -> bool:
    for p_pre, c_pre, cond in patterns:
        if prev[0] in p_pre and cur[0] in c_pre and (
                cond == "any" or (cond == "same") == (prev[1] == cur[1])):
            return True
    return False


def _strict_entities(tags: Sequence[str], scheme: str) -> list[Entity]:
    toks = [_split(t) for t in tags]
    for t, (prefix, _) in zip(tags, toks):
        if prefix not in _ANY:
            raise ValueError(f"tag {t!r} is not an {scheme.upper()} tag (B-, I- or O)")
    ext = [*toks, ("O", "_")]
    out: list[Entity] = []
    i, prev = 0, ("O", "_")
    while i < len(ext):
        if _matches(prev, ext[i], _START[scheme]):
            end, inner = i + 1, ext[i]
            while end < len(ext) and _matches(inner, ext[end], _INSIDE):
                inner, end = ext[end], end + 1
            end = min(end, len(toks))  # seqeval's walk stops at the last real token
            if _matches(ext[end - 1], ext[end], _END[scheme]):
                out.append((ext[i][1], i, end - 1))
            i = end
        else:
            i += 1
        prev = ext[i - 1]
    return out


def get_entities(tags: Sequence[str], scheme: str = "iob2", strict: bool = False) -> list[Entity]:
    """The entity spans of one tag sequence, ``[(type, first, last), ...]``."""
    scheme = scheme.lower()
    if scheme not in _START:
        raise ValueError(f"tag scheme {scheme!r} is not iob1 or iob2")
    return _strict_entities(tags, scheme) if strict else _lenient_entities(tags)


def entity_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                  scheme: str = "iob2", strict: bool = False) -> dict[str, int]:
    """``{"correct", "pred", "gold"}`` entity counts over sentences (sums add over batches)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predicted sentences for {len(gold)} gold ones")
    correct = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold tags but {len(p)} predicted")
        ge, pe = set(get_entities(g, scheme, strict)), set(get_entities(p, scheme, strict))
        correct, n_pred, n_gold = correct + len(ge & pe), n_pred + len(pe), n_gold + len(ge)
    return {"correct": correct, "pred": n_pred, "gold": n_gold}


def prf(correct: float, n_pred: float, n_gold: float) -> dict[str, float]:
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
              scheme: str = "iob2", strict: bool = False) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (``seqeval``'s)."""
    c = entity_counts(gold, pred, scheme, strict)
    return prf(c["correct"], c["pred"], c["gold"])


# ----------------------------------------------------------------------------- SQuAD v1.1
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 over the bags of normalised tokens: ``2PR/(P+R)`` with ``P = common/|pred|``."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """``(EM, F1)`` of one prediction: each the best over the gold answers."""
    if not golds:
        raise ValueError("a SQuAD question needs at least one gold answer")
    return (max(exact_match(prediction, g) for g in golds),
            max(token_f1(prediction, g) for g in golds))


__all__ = [
    "accuracy", "entity_counts", "entity_f1", "exact_match", "get_entities", "macro_f1",
    "normalize_answer", "prf", "squad_scores", "token_f1",
]
