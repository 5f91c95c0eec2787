"""BLEU: the course's sentence score against its own formula, corpus BLEU against sacrebleu."""

from __future__ import annotations

import collections
import math
import random
import string

import pytest

from divekit.errors import DivekitError
from divekit.ops.bleu import bleu, corpus_bleu, corpus_bleu_stats, tokenize_13a

# --------------------------------------------------------------------------- the course's bleu


def course_bleu(pred_seq, label_seq, k):
    """d2l's ``bleu``, loop for loop (tokens by ``split()``; only called with len_pred >= k)."""
    pred_tokens, label_tokens = pred_seq.split(), label_seq.split()
    len_pred, len_label = len(pred_tokens), len(label_tokens)
    score = math.exp(min(0, 1 - len_label / len_pred))
    for n in range(1, k + 1):
        num_matches, label_subs = 0, collections.defaultdict(int)
        for i in range(len_label - n + 1):
            label_subs[" ".join(label_tokens[i : i + n])] += 1
        for i in range(len_pred - n + 1):
            if label_subs[" ".join(pred_tokens[i : i + n])] > 0:
                num_matches += 1
                label_subs[" ".join(pred_tokens[i : i + n])] -= 1
        score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
    return score


def test_a_perfect_translation_scores_one_as_in_the_course():
    # d2l's English-French examples, translated perfectly.
    for label in ("va !", "j'ai perdu .", "il est calme .", "je suis chez moi ."):
        assert bleu(label, label, 2) == 1.0
    assert bleu("il est calme .", "il est calme .", 4) == 1.0


def test_a_partial_match_follows_the_formula():
    # p1 = 3/4 (je, suis, .), p2 = 1/3 (je suis), and the prediction is one word short.
    expected = math.exp(1 - 5 / 4) * (3 / 4) ** 0.5 * (1 / 3) ** 0.25
    assert bleu("je suis <unk> .", "je suis chez moi .", 2) == pytest.approx(expected, rel=1e-12)
    assert bleu("va !", "j'ai perdu .", 2) == 0.0
    # A longer prediction is not penalised for length; repeated words are clipped.
    assert bleu("a a a a", "a a", 1) == pytest.approx(0.5**0.5)


def test_bleu_equals_the_course_loop_on_random_pairs():
    rng = random.Random(0)
    vocab = ["il", "est", "calme", ".", "je", "suis", "chez", "moi", "!"]
    for _ in range(500):
        pred = " ".join(rng.choices(vocab, k=rng.randint(1, 9)))
        label = " ".join(rng.choices(vocab, k=rng.randint(1, 9)))
        k = rng.randint(1, 4)
        expected = course_bleu(pred, label, k) if len(pred.split()) >= k else 0.0
        assert bleu(pred, label, k) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_bleu_is_zero_where_a_precision_is_undefined():
    assert bleu("", "il est calme .", 2) == 0.0  # no prediction at all
    assert bleu("calme", "il est calme .", 2) == 0.0  # no bigram to score (the course: 1 / 0)
    assert bleu("il est", "", 2) == 0.0  # nothing to match
    assert bleu("calme", "il est calme .", 1) == pytest.approx(math.exp(1 - 4))


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_bleu_rejects_a_bad_order(k):
    with pytest.raises(DivekitError, match=r"k must be an integer >= 1") as err:
        bleu("a b", "a b", k)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- 13a tokenizer


@pytest.mark.parametrize(
    "line, tokens",
    [
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("It costs $3.50, ok?", ["It", "costs", "$", "3.50", ",", "ok", "?"]),
        ("1,000 people (roughly).", ["1,000", "people", "(", "roughly", ")", "."]),
        ("5-6 well-known cats", ["5", "-", "6", "well-known", "cats"]),
        ("&quot;don't&quot; &amp;&lt;", ['"', "don't", '"', "&", "<"]),
        ("a<skipped>b  \t c", ["ab", "c"]),
    ],
)
def test_13a_tokenizer_by_hand(line, tokens):
    assert tokenize_13a(line) == tokens


def test_13a_tokenizer_equals_sacrebleus_on_random_text():
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    theirs = Tokenizer13a()
    rng = random.Random(1)
    alphabet = "abcXY0129" + string.punctuation + "  \n\t" + "éß" + "&amp;&quot;<skipped>-\n"
    for _ in range(3000):
        line = "".join(rng.choices(alphabet, k=rng.randint(0, 25)))
        assert tokenize_13a(line) == theirs(line).split(), repr(line)


# --------------------------------------------------------------------------- corpus BLEU by hand


def test_corpus_bleu_perfect_and_hopeless():
    hyps = ["the cat sat on the mat .", "a dog barked at the moon"]
    assert corpus_bleu(hyps, hyps) == pytest.approx(100.0)
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0


def test_multiple_references_clip_by_the_most_generous_one():
    # Papineni et al.'s example: "the" may match at most twice (the first reference has two).
    hyp = ["the the the the the the the"]
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    stats = corpus_bleu_stats(hyp, refs, max_order=1)
    assert stats.counts == (2,) and stats.totals == (7,)
    assert stats.ref_len == 7 and stats.bp == 1.0  # the closest reference has 7 words
    assert stats.score == pytest.approx(100 * 2 / 7)


def test_brevity_penalty_uses_the_closest_reference_and_ties_go_to_the_shorter():
    stats = corpus_bleu_stats(["a b c"], [["a b", "a b c d"]], max_order=1)
    assert stats.ref_len == 2 and stats.bp == 1.0
    stats = corpus_bleu_stats(["a b"], ["a b c d"], max_order=1)
    assert stats.sys_len == 2 and stats.ref_len == 4
    assert stats.bp == pytest.approx(math.exp(1 - 4 / 2))
    assert stats.score == pytest.approx(100 * math.exp(1 - 4 / 2))


def test_counts_are_summed_over_the_corpus_before_dividing():
    # The first sentence alone has no 4-gram, but the corpus has: corpus BLEU is not 0.
    hyps, refs = ["a b", "c d e f g"], ["a b", "c d e f g"]
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)


def test_smoothing_changes_only_unmatched_orders():
    hyps, refs = ["the cat sat"], ["the cat ran"]  # no 3- or 4-gram match
    assert corpus_bleu(hyps, refs) == 0.0
    stats = corpus_bleu_stats(hyps, refs, smooth="exp")
    assert stats.precisions == pytest.approx((200 / 3, 50.0, 100 / 2, 0.0))  # no 4-gram at all
    assert stats.score == 0.0
    stats = corpus_bleu_stats(hyps, refs, max_order=3, smooth="floor")
    assert stats.precisions == pytest.approx((200 / 3, 50.0, 10.0))


# --------------------------------------------------------------------------- parity with sacrebleu

# Words that overlap often, with the punctuation, numbers and entities that 13a cares about.
WORDS = (
    "the cat dog sat on a mat The CAT 3.5 1,000 well-known 5-6 don't &amp; &quot;hi&quot; "
    "(yes) end. so, what?! $4 : ."
).split()


def random_sentence(rng: random.Random, max_len: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(0, max_len))
    glue = [rng.choice([" ", " ", " ", "", "  "]) for _ in words]
    return "".join(w + s for w, s in zip(words, glue)).strip()


def random_corpus(rng: random.Random):
    n = rng.randint(1, 12)
    max_len = rng.choice([2, 4, 12])
    hyps = [random_sentence(rng, max_len) for _ in range(n)]
    refs = [[random_sentence(rng, max_len) for _ in range(rng.randint(1, 3))] for _ in range(n)]
    return hyps, refs


def sacrebleu_score(hyps, refs, max_order, smooth, smooth_value, tokenize, lowercase):
    from sacrebleu.metrics import BLEU

    # sacrebleu takes reference streams, refs[j][i], padded with None where a sentence has fewer.
    n_streams = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    metric = BLEU(
        lowercase=lowercase,
        force=True,
        tokenize=tokenize,
        smooth_method=smooth,
        smooth_value=smooth_value,
        max_ngram_order=max_order,
    )
    return metric.corpus_score(hyps, streams)


@pytest.mark.parametrize("smooth", ["none", "floor", "add-k", "exp"])
@pytest.mark.parametrize("tokenize", ["13a", "none"])
def test_corpus_bleu_equals_sacrebleu_on_random_corpora(smooth, tokenize):
    pytest.importorskip("sacrebleu")
    rng = random.Random(f"{smooth}-{tokenize}")
    for trial in range(60):
        hyps, refs = random_corpus(rng)
        max_order = rng.choice([4, 4, 2, 1])
        lowercase = rng.random() < 0.3
        smooth_value = rng.choice([None, 0.3]) if smooth in ("floor", "add-k") else None
        ours = corpus_bleu_stats(
            hyps,
            refs,
            max_order=max_order,
            smooth=smooth,
            tokenize=tokenize,
            lowercase=lowercase,
            smooth_value=smooth_value,
        )
        theirs = sacrebleu_score(hyps, refs, max_order, smooth, smooth_value, tokenize, lowercase)
        where = f"trial {trial}: {hyps} {refs}"
        assert ours.score == pytest.approx(theirs.score, rel=1e-6, abs=1e-9), where
        assert ours.precisions == pytest.approx(theirs.precisions, rel=1e-9, abs=1e-12), where
        assert ours.bp == pytest.approx(theirs.bp, rel=1e-12), where
        assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len), where
        if smooth != "add-k":  # sacrebleu reports add-k's counts after adding k
            assert list(ours.counts) == list(theirs.counts), where
            assert list(ours.totals) == list(theirs.totals), where
        plain = corpus_bleu(
            hyps,
            refs,
            max_order=max_order,
            smooth=smooth,
            tokenize=tokenize,
            lowercase=lowercase,
            smooth_value=smooth_value,
        )
        assert plain == ours.score


def test_corpus_bleu_equals_sacrebleus_default_call():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(7)
    hyps = [random_sentence(rng, 15) for _ in range(40)]
    refs = [random_sentence(rng, 15) for _ in range(40)]
    theirs = sacrebleu.corpus_bleu(hyps, [refs])  # smooth_method="exp", tokenize="13a"
    assert corpus_bleu(hyps, refs, smooth="exp") == pytest.approx(theirs.score, rel=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: corpus_bleu(["a", "b"], ["a"]), r"got 2 hypotheses but 1 references"),
        (lambda: corpus_bleu([], []), r"hypotheses is empty"),
        (lambda: corpus_bleu("a b", ["a b"]), r"hypotheses must be a list of strings"),
        (lambda: corpus_bleu(["a", 3], ["a", "b"]), r"hypotheses\[1\] must be a string"),
        (lambda: corpus_bleu(["a"], [[]]), r"references\[0\] must be a string or a non-empty"),
        (lambda: corpus_bleu(["a"], [["a", None]]), r"references\[0\]\[1\] must be a string"),
        (lambda: corpus_bleu(["a"], ["a"], max_order=0), r"max_order must be an integer >= 1"),
        (lambda: corpus_bleu(["a"], ["a"], smooth="add-one"), r"unknown smoothing 'add-one'"),
        (lambda: corpus_bleu(["a"], ["a"], tokenize="intl"), r"unknown tokenizer 'intl'"),
        (
            lambda: corpus_bleu(["a"], ["a"], smooth="floor", smooth_value=-1),
            r"smooth_value must be a number >= 0",
        ),
    ],
)
def test_corpus_bleu_errors_are_one_line(call, match):
    with pytest.raises(DivekitError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
