"""The book's text data (``divekit.compat.d2l._text``) against brute-force versions written here
from the book's description, on random inputs and tiny fixtures; the real files of
``../shared/data`` where they are present (skipped otherwise)."""

from __future__ import annotations

import collections
import random
import shutil
from pathlib import Path

import pytest
import torch

from divekit.compat import d2l
from divekit.compat.d2l import _data, _text
from divekit.data import bert_pretrain
from divekit.errors import DataNotFoundError, DivekitError

FIXTURES = Path(__file__).parent / "fixtures" / "book_text"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")


@pytest.fixture(autouse=True)
def data(tmp_path, monkeypatch) -> Path:
    """The book's layout: the working folder's ``../data`` (returned, empty), an empty home
    (divekit's cache and the stand-ins), no quick or strict mode, no note given yet."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DIVEKIT_DATA", "DIVEKIT_DOWNLOAD", "DIVEKIT_BOOK_QUICK", "DIVEKIT_BOOK_STRICT",
                 "DIVEKIT_BOOK_QUICK_BATCHES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_data, "_NOTED", set())
    monkeypatch.setattr(_text, "get_dataloader_workers", lambda: 0)
    return tmp_path / "data"


def stand_ins(tmp_path: Path, name: str) -> Path:
    return tmp_path / "home" / ".cache" / "divekit" / "d2l-substitutes" / name


def random_words(n: int, vocab_size: int, g: random.Random) -> list[str]:
    """Zipf-like draws, so frequencies tie and differ."""
    words = [f"w{i}" for i in range(vocab_size)]
    return g.choices(words, weights=[1 / (i + 1) for i in range(vocab_size)], k=n)


def brute_vocab(flat: list, min_freq: int, reserved: list[str]) -> list:
    """The book's order: <unk>, reserved, then by frequency, ties by first appearance."""
    first: dict = {}
    counts: collections.Counter = collections.Counter()
    for i, t in enumerate(flat):
        first.setdefault(t, i)
        counts[t] += 1
    order = sorted(counts, key=lambda t: (-counts[t], first[t]))
    out = ["<unk>", *reserved]
    return out + [t for t in order if counts[t] >= min_freq and t not in out]


# ------------------------------------------------------------------------------ tokens, Vocab
def test_tokenize_words_and_chars():
    lines = ["the time  machine", "", " by h g wells "]
    assert d2l.tokenize(lines) == [line.split() for line in lines]
    assert d2l.tokenize(lines, "char") == [list(line) for line in lines]
    with pytest.raises(DivekitError, match="token"):
        d2l.tokenize(lines, "bpe")


@pytest.mark.parametrize("seed", range(4))
def test_vocab_matches_counter(seed):
    g = random.Random(seed)
    lines = [random_words(g.randint(0, 12), 30, g) for _ in range(40)]
    flat = [t for line in lines for t in line]
    min_freq = g.choice([0, 1, 2, 3])
    reserved = g.choice([[], ["<pad>"], ["<pad>", "<bos>", "<eos>"]])
    vocab = d2l.Vocab(lines, min_freq=min_freq, reserved_tokens=reserved)
    expected = brute_vocab(flat, min_freq, reserved)
    assert vocab.idx_to_token == expected
    assert len(vocab) == len(expected)
    assert vocab.unk == 0 and vocab["never-seen"] == 0
    assert [vocab[t] for t in expected] == list(range(len(expected)))
    assert vocab[lines[:3]] == [[expected.index(t) if t in expected else 0 for t in line]
                                for line in lines[:3]]
    counts = collections.Counter(flat)
    assert vocab.token_freqs == sorted(counts.items(), key=lambda x: -x[1])
    assert d2l.count_corpus(lines) == counts == d2l.count_corpus(flat)
    assert d2l.Vocab(flat, min_freq, reserved).idx_to_token == expected  # flat == lines
    assert vocab.to_tokens(list(range(len(vocab)))) == expected
    assert vocab.to_tokens(len(vocab) - 1) == expected[-1]


def test_vocab_of_tuples_counts_tuples():
    """The book's bigram vocabulary: tuples are tokens, not lines."""
    corpus = "a b a b c a b".split()
    bigrams = list(zip(corpus[:-1], corpus[1:]))
    vocab = d2l.Vocab(bigrams)
    assert vocab.token_freqs[0] == (("a", "b"), 3)
    assert vocab.idx_to_token == brute_vocab(bigrams, 0, [])
    assert d2l.count_corpus(bigrams) == collections.Counter(bigrams)


def test_empty_vocab_then_assigned():
    """natural-language-inference-bert loads a pretrained vocabulary this way."""
    vocab = d2l.Vocab()
    assert len(vocab) == 1 and vocab.token_freqs == []
    vocab.idx_to_token = ["<unk>", "<pad>", "<cls>", "<sep>", "a", "crane"]
    vocab.token_to_idx = {t: i for i, t in enumerate(vocab.idx_to_token)}
    assert len(vocab) == 6
    assert vocab[["<cls>", "a", "crane", "flies"]] == [2, 4, 5, 0]
    assert vocab.to_tokens([5, 4]) == ["crane", "a"]


# ------------------------------------------------------------------------------ LM sampling
@pytest.mark.parametrize("n,batch_size,num_steps", [(35, 2, 5), (200, 3, 7), (101, 4, 4)])
def test_seq_data_iter_random(n, batch_size, num_steps):
    corpus = list(range(n))
    random.seed(n)
    batches = list(d2l.seq_data_iter_random(corpus, batch_size, num_steps))
    random.seed(n)
    again = list(d2l.seq_data_iter_random(corpus, batch_size, num_steps))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # random.seed repeats
    assert len(batches) == (n - 1 - (num_steps - 1)) // num_steps // batch_size
    starts = []
    for X, Y in batches:
        assert X.shape == Y.shape == (batch_size, num_steps) and X.dtype == torch.int64
        assert torch.equal(Y, X + 1)  # the label is the next token
        assert torch.equal(X, X[:, :1] + torch.arange(num_steps))  # contiguous text
        starts += X[:, 0].tolist()
    assert len(set(starts)) == len(starts)  # each subsequence at most once
    assert len({s % num_steps for s in starts}) == 1  # one random offset per epoch
    assert max(starts) + num_steps < n  # every label inside the corpus


@pytest.mark.parametrize("n,batch_size,num_steps", [(35, 2, 5), (200, 3, 7)])
def test_seq_data_iter_sequential(n, batch_size, num_steps):
    batches = list(d2l.seq_data_iter_sequential(list(range(n)), batch_size, num_steps))
    assert batches
    offset = int(batches[0][0][0, 0])
    assert 0 <= offset < num_steps
    for (X, _), (X2, _) in zip(batches, batches[1:]):
        assert torch.equal(X2[:, 0], X[:, -1] + 1)  # each row continues in the next batch
    for X, Y in batches:
        assert X.shape == (batch_size, num_steps) and torch.equal(Y, X + 1)
        assert torch.equal(X, X[:, :1] + torch.arange(num_steps))
    rows = batches[0][0][:, 0]
    stride = rows[1:] - rows[:-1]
    assert (stride == stride[0]).all() and int(stride[0]) >= len(batches) * num_steps


def write_time_machine(tmp_path: Path) -> Path:
    path = tmp_path / "timemachine.txt"
    body = ("The Time Traveller (for so it will be convenient to speak of him)\n"
            "was expounding a recondite matter to us.\n")
    path.write_text("The Time Machine, by H. G. Wells [1898]\n\n\nI\n" + body * 20,
                    encoding="utf-8")
    return path


def test_time_machine_corpus_and_loader(tmp_path, monkeypatch):
    path = write_time_machine(tmp_path)  # not the book's sha1: _data would refuse it
    monkeypatch.setattr(_data, "download", lambda name, cache_dir=None: str(path))
    lines = d2l.read_time_machine()
    assert lines[0] == "the time machine by h g wells"
    assert lines[1] == "" and lines[3] == "i" and len(lines) == 4 + 2 * 20
    assert lines[5] == "was expounding a recondite matter to us"
    corpus, vocab = d2l.load_corpus_time_machine()
    chars = [c for line in lines for c in line]
    assert isinstance(vocab, d2l.Vocab) and vocab.idx_to_token == brute_vocab(chars, 0, [])
    assert corpus == [vocab[c] for c in chars]
    assert d2l.load_corpus_time_machine(100)[0] == corpus[:100]

    data_iter, vocab2 = d2l.load_data_time_machine(4, 10, max_tokens=1000)
    assert vocab2.idx_to_token == vocab.idx_to_token and data_iter.corpus == corpus[:1000]
    for use_random in (True, False):
        loader = d2l.SeqDataLoader(4, 10, use_random, 1000)
        epoch = list(loader)
        assert len(epoch) == len(loader) > 4
        windows = torch.tensor(loader.corpus).unfold(0, 11, 1)  # every 11 tokens of the text
        for X, Y in epoch:
            assert X.shape == Y.shape == (4, 10) and torch.equal(X[:, 1:], Y[:, :-1])
            rows = torch.cat([X, Y[:, -1:]], 1)  # X then its last label: 11 tokens of the text
            assert all((windows == row).all(1).any() for row in rows)
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "3")
    assert len(list(data_iter)) == len(data_iter) == 3


def test_time_machine_substitute_note_once(capsys, monkeypatch):
    lines = d2l.read_time_machine()
    corpus, vocab = d2l.load_corpus_time_machine(500)
    err = capsys.readouterr().err
    assert err.count("d2l: The Time Machine (timemachine.txt) not found") == 1
    assert "pydoc" in err and err.count("\n") == 1
    assert len(lines) > 1000 and all(line == line.lower() for line in lines[:50])
    assert len(corpus) == 500 and len(vocab) <= 28
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError):
        d2l.read_time_machine()


@needs_shared
def test_real_time_machine(data):
    (data / "timemachine.txt").symlink_to(SHARED / "timemachine.txt")
    lines = d2l.read_time_machine()
    assert len(lines) == 3221 and lines[0] == "the time machine by h g wells"
    corpus, vocab = d2l.load_corpus_time_machine()
    assert (len(corpus), len(vocab)) == (170580, 28)  # the book's numbers
    words = [t for line in d2l.tokenize(lines) for t in line]
    assert d2l.Vocab(words).token_freqs[:2] == [("the", 2261), ("i", 1267)]


# ------------------------------------------------------------------------------ fra-eng
@pytest.mark.parametrize("seed", range(3))
def test_truncate_pad_and_build_array(seed):
    g = random.Random(seed)
    lines = [random_words(g.randint(0, 12), 20, g) for _ in range(30)]
    vocab = d2l.Vocab(lines, min_freq=2, reserved_tokens=["<pad>", "<bos>", "<eos>"])
    num_steps = g.randint(1, 10)
    for line in lines:
        ids = vocab[line]
        out = d2l.truncate_pad(ids, num_steps, 1)
        assert out == (ids[:num_steps] if len(ids) > num_steps
                       else ids + [1] * (num_steps - len(ids)))
    array, valid_len = d2l.build_array_nmt(lines, vocab, num_steps)
    expected = [d2l.truncate_pad(vocab[line] + [vocab["<eos>"]], num_steps, vocab["<pad>"])
                for line in lines]
    assert array.tolist() == expected
    assert valid_len.tolist() == [sum(t != vocab["<pad>"] for t in row) for row in expected]


def write_fra(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = random.Random(0)
    pairs = [f"{' '.join(random_words(g.randint(1, 6), 15, g)).capitalize()}!\t"
             f"{' '.join(random_words(g.randint(1, 9), 15, g))}\u202f?" for _ in range(n)]
    (folder / "fra.txt").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return folder


def test_load_data_nmt(data, monkeypatch):
    write_fra(data / "fra-eng", 50)
    text = d2l.preprocess_nmt(d2l.read_data_nmt())
    assert "\u202f" not in text and text == text.lower() and " !\t" in text
    source, target = d2l.tokenize_nmt(text, 20)
    assert len(source) == len(target) == 20
    data_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(batch_size=4, num_steps=8,
                                                        num_examples=30)
    assert src_vocab.idx_to_token[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
    src, tgt = d2l.tokenize_nmt(text, 30)
    assert src_vocab.idx_to_token == brute_vocab([t for s in src for t in s], 2,
                                                 ["<pad>", "<bos>", "<eos>"])
    seen = 0
    for X, X_valid_len, Y, Y_valid_len in data_iter:
        assert X.shape == Y.shape == (len(X), 8) and len(X) <= 4
        for A, L in ((X, X_valid_len), (Y, Y_valid_len)):
            assert torch.equal(L, (A != 1).sum(1))  # valid length: entries that are not <pad>
            short = L < 8
            assert (A[short, L[short] - 1] == 3).all()  # <eos> ends every sentence that fits
        seen += len(X)
    assert seen == 30
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "2")
    assert len(list(data_iter)) == len(data_iter) == 2


def test_fra_eng_substitute(tmp_path, capsys, monkeypatch):
    text = d2l.read_data_nmt()
    d2l.read_data_nmt()
    err = capsys.readouterr().err
    assert err.count("d2l: fra-eng.zip") == 1 and "number phrases" in err
    assert err.count("\n") == 1 and "numbers differ from the book's" in err
    assert text.count("\t") == text.count("\n") == 20000  # 20,000 English<TAB>French lines
    assert (stand_ins(tmp_path, "fra-eng") / "fra-eng" / "fra.txt").is_file()
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError):
        d2l.read_data_nmt()


# ------------------------------------------------------------------------------ BERT data
def bert_vocab(n_words: int = 50) -> d2l.Vocab:
    words = [f"w{i}" for i in range(n_words)]
    return d2l.Vocab(words, reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])


def test_replace_mlm_tokens_proportions():
    random.seed(0)
    vocab = bert_vocab(2000)
    counts = collections.Counter()
    for _ in range(40):
        tokens = [f"w{random.randrange(2000)}" for _ in range(300)]
        candidates = [i for i in range(300) if i % 3]  # 200 candidates
        out, pred = d2l._replace_mlm_tokens(tokens, list(candidates), 100, vocab)
        positions = [p for p, _ in pred]
        assert len(positions) == len(set(positions)) == 100
        assert set(positions) <= set(candidates)
        assert [label for _, label in pred] == [tokens[p] for p in positions]
        assert all(out[i] == tokens[i] for i in range(300) if i not in set(positions))
        for p in positions:
            kind = "mask" if out[p] == "<mask>" else "kept" if out[p] == tokens[p] else "random"
            counts[kind] += 1
    total = sum(counts.values())
    assert total == 4000
    assert abs(counts["mask"] / total - 0.8) < 0.03
    assert abs(counts["kept"] / total - 0.1) < 0.02
    assert abs(counts["random"] / total - 0.1) < 0.02
    # fewer candidates than asked for: all of them, no more
    out, pred = d2l._replace_mlm_tokens(["w1", "w2", "w3"], [1], 2, vocab)
    assert [p for p, _ in pred] == [1]


def test_divekit_replace_mlm_num_preds_hook():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 50, (6, 12), generator=g)
    eligible = torch.rand(6, 12, generator=g) < 0.5
    want = torch.tensor([0, 1, 3, 5, 12, 2])
    masked, pos, weights, labels = bert_pretrain.replace_mlm_tokens(
        tokens, eligible, 12, 1, torch.arange(10, 50), g, num_preds=want)
    k = torch.minimum(want, eligible.sum(1))
    assert torch.equal(weights.sum(1).long(), k)
    for i in range(6):
        chosen = pos[i, : int(k[i])]
        assert eligible[i, chosen].all() and len(set(chosen.tolist())) == int(k[i])
        assert torch.equal(labels[i, : int(k[i])], tokens[i, chosen])
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[chosen] = False
        assert torch.equal(masked[i, untouched], tokens[i, untouched])


def test_get_mlm_data_from_tokens():
    random.seed(1)
    vocab = bert_vocab()
    for length in (1, 4, 10, 37):
        body = [f"w{random.randrange(60)}" for _ in range(length)]  # some unknown
        tokens = ["<cls>", *body, "<sep>", *body[:3], "<sep>"]
        ids, positions, labels = d2l._get_mlm_data_from_tokens(tokens, vocab)
        assert len(positions) == max(1, round(len(tokens) * 0.15))
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert all(tokens[p] not in ("<cls>", "<sep>") for p in positions)
        assert labels == vocab[[tokens[p] for p in positions]]
        assert len(ids) == len(tokens)
        assert [ids[i] for i in range(len(tokens)) if i not in positions] == \
            [vocab[tokens[i]] for i in range(len(tokens)) if i not in positions]


def test_nsp_data_and_next_sentence():
    random.seed(2)
    paragraphs = [[["a"] * 3, ["b"] * 4, ["c"] * 20, ["d"] * 2]]
    outs = [d2l._get_nsp_data_from_paragraph(paragraphs[0], paragraphs, None, 12)
            for _ in range(200)]
    nexts = []
    for out in outs:
        for tokens, segments, is_next in out:
            assert len(tokens) <= 12 and tokens[0] == "<cls>" and tokens[-1] == "<sep>"
            cut = tokens.index("<sep>")
            assert segments == [0] * (cut + 1) + [1] * (len(tokens) - cut - 1)
            a, b = tokens[1:cut], tokens[cut + 1 : -1]
            if is_next:
                assert b[0] == chr(ord(a[0]) + 1)
            nexts.append(is_next)
    assert any(nexts) and not all(nexts)
    draws = [d2l._get_next_sentence(["x"], ["y"], paragraphs) for _ in range(1000)]
    assert all(a == ["x"] and (b == ["y"]) == is_next or b in paragraphs[0] and not is_next
               for a, b, is_next in draws)
    assert 0.45 < sum(is_next for _, _, is_next in draws) / 1000 < 0.55
    # a pair with the 20-token sentence never fits in 12 tokens
    assert all("c" not in tokens for out in outs for tokens, _, _ in out)
    assert any(tokens[1] == "b" for out in outs for tokens, _, _ in out)


def test_pad_bert_inputs():
    vocab = bert_vocab()
    examples = [([3, 5, 6, 4], [1], [5], [0, 0, 0, 1], True),
                ([3, 7, 8, 9, 4, 10, 4], [2, 5], [8, 10], [0] * 5 + [1] * 2, False)]
    out = d2l._pad_bert_inputs(examples, 10, vocab)
    tokens, segments, valid_lens, positions, weights, labels, nsp = (torch.stack(t) for t in out)
    assert tokens.shape == segments.shape == (2, 10) and positions.shape == (2, 2)
    assert tokens[0].tolist() == [3, 5, 6, 4] + [vocab["<pad>"]] * 6
    assert segments[1].tolist() == [0] * 5 + [1] * 2 + [0] * 3
    assert valid_lens.tolist() == [4.0, 7.0] and valid_lens.dtype == torch.float32
    assert positions.tolist() == [[1, 0], [2, 5]] and labels.tolist() == [[5, 0], [8, 10]]
    assert weights.tolist() == [[1.0, 0.0], [1.0, 1.0]] and nsp.tolist() == [1, 0]
    with pytest.raises(DivekitError):
        d2l._pad_bert_inputs([([3] * 11, [1], [5], [0] * 11, True)], 10, vocab)


WIKI = "".join(line + "\n" for line in [
    " ", " = Homarus = ", " ",
    " The lobster is a large crustacean . It lives in the sea . It is <unk> blue . ", " ",
    " = = Life = = ", " ",
    " A red @-@ tipped claw is big . The eggs hatch at night . ",
    " One sentence only here . "])


def wiki_text(n: int) -> str:
    g = random.Random(0)
    paragraphs = []
    for _ in range(n):
        sentences = [" ".join(random_words(g.randint(3, 9), 40, g)) for _ in range(g.randint(1, 5))]
        paragraphs.append(" " + " . ".join(sentences) + " . \n")
    return WIKI + "".join(paragraphs)


def test_read_wiki_and_notes(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_text(WIKI, encoding="utf-8")
    paragraphs = d2l._read_wiki(folder)
    assert sorted(paragraphs) == [
        ["a red-tipped claw is big", "the eggs hatch at night ."],
        ["the lobster is a large crustacean", "it lives in the sea", "it is <unk> blue ."]]
    assert capsys.readouterr().err == ""

    (folder / "wiki.train.tokens").rename(folder / "valid.txt")
    assert sorted(d2l._read_wiki(folder)) == sorted(paragraphs)
    d2l._read_wiki(folder)
    err = capsys.readouterr().err
    assert err == (f"d2l: WikiText-2's train split not found in {str(folder)!r}; using its "
                   "validation split instead (numbers differ from the book's)\n")

    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setattr(_data, "_NOTED", set())
    pydoc = d2l._read_wiki(empty)
    assert len(pydoc) > 100 and all(len(p) >= 2 for p in pydoc)
    assert "pydoc" in capsys.readouterr().err
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError, match="train split"):
        d2l._read_wiki(folder)


def test_load_data_wiki_batches(data, monkeypatch):
    folder = data / "wikitext-2"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_text(wiki_text(150), encoding="utf-8")
    random.seed(3)
    train_iter, vocab = d2l.load_data_wiki(batch_size=16, max_len=24)
    assert vocab.idx_to_token[:5] == ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>"]
    P = round(24 * 0.15)
    n = 0
    for tokens, segments, valid_lens, positions, weights, labels, nsp in train_iter:
        B = len(tokens)
        assert tokens.shape == segments.shape == (B, 24)
        assert valid_lens.shape == nsp.shape == (B,) and valid_lens.dtype == torch.float32
        assert positions.shape == weights.shape == labels.shape == (B, P)
        for i in range(B):
            v = int(valid_lens[i])
            assert tokens[i, 0] == vocab["<cls>"] and tokens[i, v - 1] == vocab["<sep>"]
            assert (tokens[i, v:] == vocab["<pad>"]).all() and (segments[i, v:] == 0).all()
            k = int(weights[i].sum())
            assert k == max(1, round(v * 0.15)) and (weights[i, :k] == 1).all()
            assert (positions[i, :k] < v).all() and (positions[i, k:] == 0).all()
        n += B
    assert n == len(train_iter.dataset) > 16
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "1")
    assert len(list(train_iter)) == len(train_iter) == 1


def test_wiki_substitute(tmp_path, capsys, monkeypatch):
    train_iter, vocab = d2l.load_data_wiki(batch_size=32, max_len=64)
    folder = d2l.download_extract("wikitext-2", "wikitext-2")  # the section's own call
    assert Path(folder) == stand_ins(tmp_path, "wikitext-2") / "wikitext-2"
    err = capsys.readouterr().err
    assert err.count("d2l: ") == 1 and "pydoc" in err and "wikitext-2-v1.zip" in err
    paragraphs = d2l._read_wiki(folder)
    assert len(paragraphs) > 100 and all(len(p) >= 2 for p in paragraphs)
    assert len(train_iter.dataset) > 500 and len(vocab) > 100
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    monkeypatch.setattr(_data, "_NOTED", set())
    with pytest.raises(DataNotFoundError):
        d2l.load_data_wiki(batch_size=32, max_len=64)


def test_partial_wiki_folder_passed_over_for_the_stand_in(tmp_path, capsys):
    """A WikiText-2 folder without its train split (as ../shared/data has it) is not what the
    section's own ``open(os.path.join(data_dir, 'wiki.train.tokens'))`` can read: the stand-in
    built from its validation split takes its place, with the note."""
    partial = tmp_path / "data" / "wikitext-2"
    partial.mkdir()
    (partial / "valid.txt").write_text(wiki_text(5), encoding="utf-8")
    folder = Path(d2l.download_extract("wikitext-2", "wikitext-2"))
    assert folder == stand_ins(tmp_path, "wikitext-2") / "wikitext-2"
    assert (folder / "wiki.train.tokens").read_text(encoding="utf-8") == wiki_text(5)
    err = capsys.readouterr().err
    assert err.count("d2l: ") == 1 and "validation split" in err
    (partial / "wiki.train.tokens").write_text(wiki_text(5), encoding="utf-8")
    used = Path(d2l.download_extract("wikitext-2", "wikitext-2"))  # complete: used as it is
    assert used.resolve() == partial.resolve()


def test_wiki_stand_in_from_validation_split(tmp_path):
    valid = tmp_path / "valid.txt"
    valid.write_text(wiki_text(5), encoding="utf-8")
    _text._build_wikitext(tmp_path / "out", valid)
    for split in ("train", "valid"):
        assert (tmp_path / "out" / "wikitext-2" / f"wiki.{split}.tokens").read_text(
            encoding="utf-8") == wiki_text(5)
    assert "validation split" in _text._describe_wikitext(tmp_path / "out", valid)


@needs_shared
def test_real_wiki_validation_split(capsys):
    folder = SHARED / "wikitext-2"
    if not (folder / "valid.txt").is_file() or (folder / "wiki.train.tokens").is_file():
        pytest.skip("not the validation-only copy of WikiText-2")
    paragraphs = d2l._read_wiki(folder)
    assert len(paragraphs) > 1000 and all(s == s.lower() for s in paragraphs[0])
    assert "validation split" in capsys.readouterr().err


# ------------------------------------------------------------------------------ SNLI
def test_read_snli_txt_and_jsonl(tmp_path):
    folder = FIXTURES / "snli_1.0"
    premises, hypotheses, labels = d2l.read_snli(folder, is_train=True)
    assert labels == [2, 1, 0]  # neutral, contradiction, entailment; the '-' row is left out
    assert premises[0] == "A person on a horse jumps over a broken down airplane ."
    assert hypotheses[1] == "A person is at a diner , ordering an omelette ."
    test = d2l.read_snli(folder, is_train=False)
    assert test[2] == [0, 2, 1] and test[1][0] == "There are children present"
    only_jsonl = tmp_path / "jsonl"
    only_jsonl.mkdir()
    shutil.copy(folder / "snli_1.0_train.jsonl", only_jsonl)
    p, h, y = d2l.read_snli(only_jsonl, True)
    assert y == labels and p[0] == "A person on a horse jumps over a broken down airplane."
    with pytest.raises(DataNotFoundError):
        d2l.read_snli(only_jsonl, False)


def test_snli_dataset_and_loader(data):
    shutil.copytree(FIXTURES / "snli_1.0", data / "snli_1.0")
    train_iter, test_iter, vocab = d2l.load_data_snli(batch_size=2, num_steps=6)
    assert vocab.idx_to_token[:2] == ["<unk>", "<pad>"]
    (X0, X1), Y = next(iter(test_iter))
    assert X0.shape == X1.shape == (2, 6) and Y.tolist() == [0, 2]
    data = d2l.read_snli(FIXTURES / "snli_1.0", False)
    ds = d2l.SNLIDataset(data, 6, vocab)
    expected = [d2l.truncate_pad(vocab[s.split()], 6, vocab["<pad>"]) for s in data[0]]
    assert ds.premises.tolist() == expected and len(ds) == 3
    assert sum(len(y) for _, y in train_iter) == 3


def test_snli_substitute(capsys, tmp_path, monkeypatch):
    train_iter, test_iter, vocab = d2l.load_data_snli(batch_size=64, num_steps=12)
    d2l.load_data_snli(batch_size=64, num_steps=12)
    err = capsys.readouterr().err
    assert err.count("d2l: snli_1.0.zip") == 1 and "premise/hypothesis" in err
    folder = stand_ins(tmp_path, "SNLI") / "snli_1.0"
    assert Path(d2l.download_extract("SNLI")) == folder  # the section's own call
    header = (folder / "snli_1.0_train.txt").read_text(encoding="utf-8").split("\n")[0]
    assert header.split("\t")[:3] == ["gold_label", "sentence1_binary_parse",
                                      "sentence2_binary_parse"]
    p, h, y = d2l.read_snli(folder, True)
    assert len(p) == 3000 and set(y) == {0, 1, 2}
    assert p[0].endswith(" .") and "(" not in p[0]
    assert len(d2l.read_snli(folder, False)[0]) == 600
    (X0, X1), Y = next(iter(train_iter))
    assert X0.shape == (64, 12)
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError):
        d2l.load_data_snli(64)


# ------------------------------------------------------------------------------ PTB, IMDb
@needs_shared
def test_real_ptb_and_imdb(data, capsys):
    (data / "ptb").symlink_to(SHARED / "ptb")
    sentences = d2l.read_ptb()
    assert len(sentences) > 40000 and sentences[0][:2] == ["aer", "banknote"]
    if not (SHARED / "aclImdb_tiny").is_dir():
        pytest.skip("no aclImdb_tiny")
    (data / "aclImdb_tiny").symlink_to(SHARED / "aclImdb_tiny")
    reviews, labels = d2l.read_imdb(SHARED / "aclImdb_tiny", is_train=True)
    assert len(reviews) == len(labels) and 1 in labels and 0 in labels
    assert labels == sorted(labels, reverse=True)  # positives first, as the book reads them
    train_iter, test_iter, vocab = d2l.load_data_imdb(batch_size=4, num_steps=50)
    X, y = next(iter(train_iter))
    assert X.shape == (4, 50) and vocab["<pad>"] == 1
    err = capsys.readouterr().err
    assert err.count("d2l: aclImdb_v1.tar.gz") == 1 and "40-review aclImdb_tiny" in err


def test_all_names_exported():
    for name in _text.__all__:
        assert getattr(d2l, name) is getattr(_text, name)
    assert {"_read_wiki", "_WikiTextDataset", "_pad_bert_inputs"} <= set(_text.__all__)
    assert "get_tokens_and_segments" not in _text.__all__
