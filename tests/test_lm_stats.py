"""Language-model statistics: n-gram tables, Zipf's law, and the add-k n-gram model."""

from __future__ import annotations

import math

import pytest

from divekit.data.lm_stats import (
    NGramLM,
    bigram_freqs,
    ngram_freqs,
    trigram_freqs,
    unigram_freqs,
)
from divekit.data.text import preprocess, read_pydoc
from divekit.errors import DivekitError
from divekit.tokenizers import tokenize
from divekit.viz import plot_zipf


@pytest.fixture(scope="module")
def pydoc_words() -> list[str]:
    lines = preprocess(read_pydoc())
    return [w for line in tokenize(lines, "word") for w in line]


def test_ngram_tables_count_consecutive_runs():
    tokens = ["the", "time", "machine", "the", "time"]
    assert unigram_freqs(tokens)[("the",)] == 2
    assert bigram_freqs(tokens)[("the", "time")] == 2
    assert trigram_freqs(tokens) == {
        ("the", "time", "machine"): 1,
        ("time", "machine", "the"): 1,
        ("machine", "the", "time"): 1,
    }
    assert ngram_freqs([["a", "b"], ["c"]], 2) == {
        ("a", "b"): 1,
        ("b", "c"): 1,
    }  # lines concatenated


def test_zipf_plot_is_a_png(tmp_path, pydoc_words):
    tables = [unigram_freqs(pydoc_words), bigram_freqs(pydoc_words), trigram_freqs(pydoc_words)]
    path = plot_zipf(tables, ["unigram", "bigram", "trigram"], tmp_path / "zipf.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DivekitError, match="labels"):
        plot_zipf(tables, ["unigram"], tmp_path / "bad.png")


def test_smoothed_probabilities_sum_to_one():
    lm = NGramLM(2, k=0.5).fit(list("abracadabra"))
    for context in (["a"], ["r"], ["z"]):  # seen, seen, unseen context
        total = sum(lm.prob(context, tok) for tok in lm.vocab)
        assert total == pytest.approx(1.0)
    assert lm.prob(["q"], "a") == pytest.approx(1 / lm.vocab_size)


def test_bigram_beats_unigram_on_held_out_text(pydoc_words):
    split = int(0.9 * len(pydoc_words))
    train, held_out = pydoc_words[:split], pydoc_words[split:]
    ppl = {n: NGramLM(n, k=0.1).fit(train).perplexity(held_out) for n in (1, 2)}
    assert all(math.isfinite(p) for p in ppl.values())
    assert ppl[2] < ppl[1]


def test_without_smoothing_an_unseen_bigram_makes_perplexity_infinite():
    lm = NGramLM(2, k=0.0).fit(["a", "b", "a", "b"])
    assert lm.perplexity(["a", "b"]) == pytest.approx(1.0)
    assert lm.perplexity(["a", "a"]) == math.inf
    assert math.isfinite(
        NGramLM(2, k=1.0).fit(["a", "b", "a", "b"]).perplexity(["a", "a", "zebra"])
    )


def test_ngram_bad_inputs():
    with pytest.raises(DivekitError, match="n must be"):
        NGramLM(0)
    with pytest.raises(DivekitError, match="not fitted"):
        NGramLM(2).perplexity(["a", "b"])
    with pytest.raises(DivekitError, match="at least n=3"):
        NGramLM(3).fit(["a", "b"])
    with pytest.raises(DivekitError, match="context"):
        NGramLM(3).fit(list("abcd")).prob(["a"], "b")
