"""Entity F1 against seqeval, SQuAD v1.1 EM/F1 on hand-worked cases, macro-F1 against sklearn."""

from __future__ import annotations

import random

import pytest

from divekit.ops.seq_metrics import (
    accuracy,
    entity_f1,
    exact_match,
    get_entities,
    macro_f1,
    normalize_answer,
    squad_scores,
    token_f1,
)

seqeval_metrics = pytest.importorskip("seqeval.metrics")
seqeval_scheme = pytest.importorskip("seqeval.scheme")


def _random_tags(rng: random.Random, n_sent: int) -> list[list[str]]:
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    return [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(n_sent)]


@pytest.mark.parametrize("scheme", ["iob1", "iob2"])
@pytest.mark.parametrize("seed", range(5))
def test_entity_f1_equals_seqeval_on_random_tags(scheme, seed):
    rng = random.Random(seed)
    gold = _random_tags(rng, 40)
    pred = [[t if rng.random() < 0.6 else rng.choice(["O", "B-PER", "I-LOC", "I-PER"]) for t in s]
            for s in gold]
    ours = entity_f1(gold, pred, scheme)
    assert ours["f1"] == pytest.approx(seqeval_metrics.f1_score(gold, pred), abs=1e-12)
    assert ours["precision"] == pytest.approx(seqeval_metrics.precision_score(gold, pred), abs=1e-12)
    assert ours["recall"] == pytest.approx(seqeval_metrics.recall_score(gold, pred), abs=1e-12)
    cls = {"iob1": seqeval_scheme.IOB1, "iob2": seqeval_scheme.IOB2}[scheme]
    strict = entity_f1(gold, pred, scheme, strict=True)
    want = seqeval_metrics.f1_score(gold, pred, mode="strict", scheme=cls)
    assert strict["f1"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("scheme", ["iob1", "iob2"])
def test_strict_spans_equal_seqeval_spans(scheme):
    cls = {"iob1": seqeval_scheme.IOB1, "iob2": seqeval_scheme.IOB2}[scheme]
    rng = random.Random(7)
    for tags in _random_tags(rng, 300):
        theirs = [(e.tag, e.start, e.end - 1) for e in seqeval_scheme.Tokens(tags, cls).entities]
        assert get_entities(tags, scheme, strict=True) == theirs, tags


def test_iob1_and_iob2_spans_read_as_the_course_says():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # IOB1: a span may open with I-; B- only separates two adjacent spans of one type
    assert get_entities(["I-PER", "I-PER", "B-PER"], "iob1", strict=True) == [("PER", 0, 1), ("PER", 2, 2)]
    # IOB2 strict: I- without its B- is not an entity
    assert get_entities(["O", "I-PER", "I-PER"], "iob2", strict=True) == []


def test_squad_normalisation_and_scores_hand_worked():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    # pred "denver broncos team" vs gold "denver broncos": P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert token_f1("Carolina", "Denver Broncos") == 0.0
    # best over the gold answers
    em, f1 = squad_scores("Broncos", ["Denver Broncos", "the Broncos"])
    assert (em, f1) == (1.0, 1.0)
    em, f1 = squad_scores("in 1990 or so", ["1990", "around 1990"])
    # vs "1990": P 1/4, R 1 -> 0.4; vs "around 1990": P 1/4, R 1/2 -> 1/3; best 0.4
    assert em == 0.0 and f1 == pytest.approx(0.4)


def test_macro_f1_equals_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(3)
    gold = [rng.randrange(4) for _ in range(200)]
    pred = [g if rng.random() < 0.5 else rng.randrange(5) for g in gold]
    assert macro_f1(pred, gold) == pytest.approx(sklearn_metrics.f1_score(gold, pred, average="macro"))
    assert accuracy(pred, gold) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
