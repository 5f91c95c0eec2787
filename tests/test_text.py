"""The text pipeline: tokens, Vocab, corpora and the course's two minibatch samplers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divekit.data.registry import dataset_info, load_dataset
from divekit.data.text import (
    TIMEMACHINE_URL,
    SeqDataLoader,
    Vocab,
    load_corpus,
    preprocess,
    seq_data_iter_random,
    seq_data_iter_sequential,
)
from divekit.errors import DataNotFoundError, DivekitError
from divekit.tokenizers import tokenize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- tokens and Vocab


def test_tokenize_words_and_chars():
    lines = ["the time machine", "by h g wells"]
    assert tokenize(lines, "word") == [["the", "time", "machine"], ["by", "h", "g", "wells"]]
    assert tokenize(["ab c"], "char") == [["a", "b", " ", "c"]]


def test_unknown_token_mode_is_an_error():
    with pytest.raises(DivekitError, match="'bpe'"):
        tokenize(["a b"], "bpe")


def test_preprocess_keeps_letters_and_spaces_lowercased():
    assert preprocess(["The Time-Machine, by H. G. Wells!", "  1895  "]) == [
        "the time machine by h g wells",
        "",
    ]


def test_vocab_orders_unk_reserved_then_by_frequency():
    tokens = [["b", "a", "b"], ["c", "a", "b", "d"]]
    vocab = Vocab(tokens, reserved_tokens=["<pad>", "<bos>"])
    # b: 3, a: 2, then c and d tie at 1 and keep their order of first appearance.
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "b", "a", "c", "d"]
    assert vocab.token_freqs == [("b", 3), ("a", 2), ("c", 1), ("d", 1)]
    assert vocab.unk == 0 and vocab["<pad>"] == 1 and len(vocab) == 7


def test_vocab_round_trips_tokens_and_indices():
    vocab = Vocab(list("hello world"))
    words = list("low"), ("o", "l")
    for toks in words:
        assert vocab.to_tokens(vocab[toks]) == list(toks)
    assert vocab.to_tokens(torch.tensor(vocab[list("hello")])) == list("hello")
    assert vocab.to_tokens(vocab["h"]) == "h"


def test_unknown_tokens_map_to_unk():
    vocab = Vocab(["a", "b", "a"], min_freq=2)
    assert vocab["b"] == vocab.unk  # below min_freq
    assert vocab[["a", "zebra"]] == [vocab["a"], 0]
    assert vocab.to_tokens(0) == "<unk>"


def test_vocab_survives_save_and_load(tmp_path):
    vocab = Vocab(tokenize(["ça va, très bien", "va va"], "word"), reserved_tokens=["<eos>"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.idx_to_token == vocab.idx_to_token and loaded.token_freqs == vocab.token_freqs
    assert loaded["très"] == vocab["très"]


def test_vocab_bad_inputs():
    with pytest.raises(DivekitError, match="<unk>"):
        Vocab(["a"], reserved_tokens=["<unk>"])
    with pytest.raises(DivekitError, match="index 5"):
        Vocab(["a"]).to_tokens(5)
    with pytest.raises(DataNotFoundError, match="nope.json"):
        Vocab.load("/nonexistent/nope.json")


# ----------------------------------------------------------------------------- corpora


def test_pydoc_corpus_is_english_letters_and_registered():
    corpus, vocab = load_corpus("pydoc", token="char")
    assert len(corpus) > 100_000
    assert set(vocab.idx_to_token) == {"<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"}
    assert vocab.idx_to_token[1] == " "  # the space is the most frequent character
    info = dataset_info("pydoc")
    assert info.task == "text" and info.offline
    words = load_dataset("pydoc", token="word", max_tokens=1000)
    assert len(words.corpus) == 1000 and "the" in words.vocab


def test_load_corpus_reuses_a_given_vocab():
    corpus, vocab = load_corpus("pydoc", token="char", max_tokens=50)
    small = Vocab(list("abc"))
    again, same = load_corpus("pydoc", token="char", max_tokens=50, vocab=small)
    assert same is small and all(0 <= i < len(small) for i in again)


def test_missing_timemachine_names_file_url_and_place(tmp_path):
    assert not dataset_info("timemachine").offline
    with pytest.raises(DataNotFoundError) as err:
        load_corpus("timemachine", data_dir=tmp_path)
    msg = str(err.value)
    assert "timemachine.txt" in msg and TIMEMACHINE_URL in msg and str(tmp_path) in msg


@pytest.mark.shared_data
@pytest.mark.skipif(
    not (SHARED_DATA / "timemachine.txt").is_file(), reason="no shared timemachine.txt"
)
def test_timemachine_matches_the_course():
    corpus, vocab = load_dataset("timemachine", data_dir=SHARED_DATA)
    assert len(vocab) == 28  # <unk>, space and 26 letters, as in the course
    assert len(corpus) == 170580
    assert "".join(vocab.to_tokens(corpus[:16])) == "the time machine"


# ----------------------------------------------------------------------------- sampling

CORPUS = list(range(100))  # token i is i, so a subsequence's start is its first value


def test_every_label_is_its_input_shifted_by_one():
    corpus, _ = load_corpus("pydoc", token="char", max_tokens=3000)
    for sampler in (seq_data_iter_random, seq_data_iter_sequential):
        for X, Y in sampler(corpus, 4, 7, generator=torch.Generator().manual_seed(0)):
            assert X.shape == Y.shape == (4, 7) and X.dtype == torch.long
            assert torch.equal(X[:, 1:], Y[:, :-1])
        for X, Y in sampler(CORPUS, 2, 5):
            assert torch.equal(Y, X + 1)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 200),
    batch_size=st.integers(1, 4),
    num_steps=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_random_sampling_never_repeats_a_start(n, batch_size, num_steps, seed):
    if batch_size * num_steps + 1 > n:
        return
    batches = list(
        seq_data_iter_random(
            range(n), batch_size, num_steps, generator=torch.Generator().manual_seed(seed)
        )
    )
    assert batches, "at least one minibatch"
    starts = torch.cat([X[:, 0] for X, _ in batches])
    assert len(set(starts.tolist())) == len(starts)
    assert len(set((starts % num_steps).tolist())) == 1  # all on one grid from a single offset
    assert int(starts.max()) + num_steps < n  # every label lies inside the corpus
    assert all(torch.equal(Y, X + 1) for X, Y in batches)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 200),
    batch_size=st.integers(1, 4),
    num_steps=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_sequential_batches_are_adjacent(n, batch_size, num_steps, seed):
    if batch_size * num_steps + 1 > n:
        return
    batches = list(
        seq_data_iter_sequential(
            range(n), batch_size, num_steps, generator=torch.Generator().manual_seed(seed)
        )
    )
    assert batches
    assert int(batches[0][0][0, 0]) < num_steps
    for (X0, _), (X1, _) in zip(batches, batches[1:]):
        assert torch.equal(X1[:, 0], X0[:, -1] + 1)  # row r goes on where it stopped
    for X, Y in batches:
        assert torch.equal(Y, X + 1)


def test_loader_replays_an_epoch_from_seed_and_epoch():
    def epoch(loader):
        return [X for X, _ in loader]

    for sampling in ("random", "sequential"):
        loader = SeqDataLoader(CORPUS, 3, 4, sampling=sampling, seed=7)
        first, second = epoch(loader), epoch(loader)  # iterating advances the epoch
        assert len(first) == len(loader)
        assert any(not torch.equal(a, b) for a, b in zip(first, second))
        resumed = SeqDataLoader(CORPUS, 3, 4, sampling=sampling, seed=7)
        resumed.set_epoch(1)
        assert all(torch.equal(a, b) for a, b in zip(epoch(resumed), second))


@pytest.mark.parametrize("sampler", [seq_data_iter_random, seq_data_iter_sequential])
def test_bad_sampling_inputs(sampler):
    with pytest.raises(DivekitError, match="empty"):
        next(sampler([], 2, 5))
    with pytest.raises(DivekitError, match="num_steps=50"):
        next(sampler(range(20), 1, 50))
    with pytest.raises(DivekitError, match="batch_size=8"):
        next(sampler(range(20), 8, 5))
    with pytest.raises(DivekitError, match="sampling"):
        SeqDataLoader(range(20), 2, 3, sampling="shuffled")
