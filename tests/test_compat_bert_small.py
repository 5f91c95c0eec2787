"""The ``bert.small`` stand-in (``divekit.compat.d2l._bert_small``): the folder the book's
fine-tuning section reads, its strict ``load_state_dict``, one note, strict mode, versions, and
that the pretraining learned (tiny step counts; Python's help text as the corpus)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from divekit.compat import d2l
from divekit.compat.d2l import _bert_small, _data
from divekit.errors import DataNotFoundError, UnknownNameError

ENTRY = (d2l.DATA_URL + "bert.small.torch.zip", "c72329e68a732bef0452e4b96a1c341c8910f81f")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty home and working folder, no quick or strict mode, no note given yet, tiny
    pretraining on one thread (2 contended cores run it far slower on two); ``DATA_HUB['bert.small']``
    as the section adds it. Yields the stand-in root."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("DIVEKIT_DATA", "DIVEKIT_DOWNLOAD", "DIVEKIT_BOOK_QUICK", "DIVEKIT_BOOK_STRICT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_data, "_NOTED", set())
    monkeypatch.setattr(_bert_small, "_STEPS", {False: 12, True: 4})
    monkeypatch.setattr(_bert_small, "_BATCH_SIZE", 16)
    monkeypatch.setattr(_bert_small, "_MAX_LEN", 32)
    monkeypatch.setattr(_bert_small, "try_gpu", lambda: torch.device("cpu"))
    monkeypatch.setitem(d2l.DATA_HUB, "bert.small", ENTRY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "home" / ".cache" / "divekit" / "d2l-substitutes" / "bert.small"
    torch.set_num_threads(threads)


def section_model(vocab_size: int) -> torch.nn.Module:
    """``BERTModel`` with the arguments of the section's ``load_pretrained_model``."""
    return d2l.BERTModel(vocab_size, 256, norm_shape=[256], ffn_num_input=256,
                         ffn_num_hiddens=512, num_heads=4, num_layers=2, dropout=0.2,
                         max_len=512, key_size=256, query_size=256, value_size=256,
                         hid_in_features=256, mlm_in_features=256, nsp_in_features=256)


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("d2l:")]


def test_section_reads_the_stand_in(home, capsys):
    data_dir = d2l.download_extract("bert.small")
    assert Path(data_dir) == home / "bert.small.torch"  # the archive's stem, as the book's
    assert sorted(p.name for p in Path(data_dir).iterdir()) == ["pretrained.params", "vocab.json"]
    # the section's own reading: an empty Vocab given idx_to_token and token_to_idx
    vocab = d2l.Vocab()
    vocab.idx_to_token = json.load(open(Path(data_dir) / "vocab.json"))
    vocab.token_to_idx = {token: idx for idx, token in enumerate(vocab.idx_to_token)}
    assert vocab.idx_to_token[:5] == ["<unk>", "<pad>", "<mask>", "<cls>", "<sep>"]
    assert len(set(vocab.idx_to_token)) == len(vocab) > 100
    assert vocab[["the", "no-such-word-here"]][1] == 0
    bert = section_model(len(vocab))
    saved = torch.load(Path(data_dir) / "pretrained.params")
    result = bert.load_state_dict(saved)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in bert.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # the pretrained weights are not a fresh initialisation
    fresh = section_model(len(vocab)).state_dict()
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if saved[k].is_floating_point())
    # the section's classifier input runs through the encoder
    tokens = torch.tensor([vocab[["<cls>", "a", "man", "<sep>", "he", "<sep>", "<pad>"]]])
    encoded = bert.eval().encoder(tokens, torch.tensor([[0, 0, 0, 0, 1, 1, 0]]), torch.tensor([6]))
    assert encoded.shape == (1, 7, 256) and torch.isfinite(encoded).all()

    lines = notes(capsys)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "bert.small.torch.zip (sha1 c72329e68a732bef0452e4b96a1c341c8910f81f) not found" in line
    assert "pretrained by divekit on paragraphs of Python's help text (pydoc) for 12 steps" in line
    assert "MLM loss" in line and "NSP loss" in line and "instead" in line
    report = json.loads((home / "pretraining.json").read_text())
    assert report["steps"] == 12 and len(report["mlm_loss"]) == 12

    # built once: a second call neither rebuilds nor notes again
    stamp = (Path(data_dir) / "pretrained.params").stat().st_mtime_ns
    assert d2l.download_extract("bert.small") == data_dir
    assert (Path(data_dir) / "pretrained.params").stat().st_mtime_ns == stamp
    assert notes(capsys) == []


def test_quick_stand_in_is_rebuilt_at_full_size(home, monkeypatch):
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    d2l.download_extract("bert.small")
    assert json.loads((home / "pretraining.json").read_text())["steps"] == 4
    assert "steps=4" in (home / ".complete").read_text()
    monkeypatch.delenv("DIVEKIT_BOOK_QUICK")
    d2l.download_extract("bert.small")
    assert json.loads((home / "pretraining.json").read_text())["steps"] == 12
    stamp = (home / ".complete").stat().st_mtime_ns
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")  # a full stand-in serves quick runs too
    d2l.download_extract("bert.small")
    assert (home / ".complete").stat().st_mtime_ns == stamp
    assert json.loads((home / "pretraining.json").read_text())["steps"] == 12


def test_strict_mode_refuses_the_stand_in(home, monkeypatch, capsys):
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError, match=r"bert\.small\.torch\.zip .*not found"):
        d2l.download_extract("bert.small")
    assert not home.exists()
    assert notes(capsys) == []


def test_needs_the_sections_data_hub_entry(monkeypatch):
    monkeypatch.delitem(d2l.DATA_HUB, "bert.small")
    with pytest.raises(UnknownNameError):
        d2l.download_extract("bert.small")


def test_pretraining_lowers_the_mlm_loss():
    before = torch.random.get_rng_state()
    net, vocab, report = _bert_small.pretrain("pydoc", 16)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global random state is kept
    first, last = _bert_small._ends(report["mlm_loss"])
    assert len(report["mlm_loss"]) == len(report["nsp_loss"]) == 16
    assert first > last + 0.3, report["mlm_loss"]
    assert abs(first - torch.log(torch.tensor(float(len(vocab)))).item()) < 1.5  # ~ uniform
    assert all(0.0 < v < 2.0 for v in report["nsp_loss"])
    assert next(net.parameters()).device.type == "cpu" and not net.training
