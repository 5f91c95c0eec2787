"""The translation task end to end on the embedded numbers-fr pairs: training (loss falls,
BLEU reported), exact resume, evaluate, translate with greedy and beam search, attention
pictures, and one-line errors."""

from __future__ import annotations

import csv

import pytest
import torch

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir, load_weights
from divekit.tasks import translate as mt

TINY = dict(data="numbers-fr", max_examples=1500, batch_size=64, hidden=32, embed=16, ffn=64, heads=2,
            layers=1, dropout=0.1, bleu_examples=60, quiet=True, device="cpu")


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "run"
    mt.train(mt.Config(model="transformer", epochs=3, lr=0.005, out=str(out), **TINY))
    return out


def test_training_lowers_the_loss_and_reports_bleu(transformer_run):
    rows = _rows(transformer_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_bleu"]) > float(rows[0]["val_bleu"]) >= 0
    lines = (transformer_run / "translations.txt").read_text().splitlines()
    assert lines[0] == "source\toutput\treference" and len(lines) == 61
    for name in ("src_vocab.json", "tgt_vocab.json", "curves.png", "config.json"):
        assert (transformer_run / name).is_file()


def test_evaluate_and_translate_greedy_and_beam(transformer_run, tmp_path, capsys):
    metrics = mt.evaluate(transformer_run, device="cpu", beam=3)
    assert {"loss", "acc", "bleu", "bleu_beam3"} <= set(metrics)
    assert 0 <= metrics["bleu"] <= 100 and 0 <= metrics["acc"] <= 1
    greedy = mt.translate(transformer_run, ["I have two cats.", "we bought forty-one horses !"], device="cpu")
    beam = mt.translate(transformer_run, ["I have two cats.", "we bought forty-one horses !"], beam=4, device="cpu")
    assert len(greedy) == len(beam) == 2 and all(isinstance(s, str) and s for s in greedy + beam)
    assert main(["translate", str(transformer_run), "i have two cats .", "zzz 3", "--beam", "2",
                 "--attention", str(tmp_path / "att.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "i have two cats . =>" in out.out and (tmp_path / "att.png").stat().st_size > 1000
    assert "'zzz'" in out.err and "<unk>" in out.err
    assert main(["evaluate", str(transformer_run), "--device", "cpu"]) == 0
    assert "BLEU" in capsys.readouterr().out


def test_resume_continues_bit_identically(tmp_path, capsys):
    cfg = dict(TINY, max_examples=400, bleu_examples=0)
    mt.train(mt.Config(model="transformer", epochs=2, out=str(tmp_path / "a"), **cfg))
    mt.train(mt.Config(model="transformer", epochs=1, out=str(tmp_path / "b"), **cfg))
    mt.train(mt.Config(model="transformer", epochs=2, out=str(tmp_path / "b"), resume=True, **cfg))
    weights = []
    for run in ("a", "b"):
        model, *_ = mt.load_trained(tmp_path / run)
        load_weights(model, CheckpointDir(tmp_path / run).latest() / "model.safetensors")
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("model", ["seq2seq", "seq2seq_attention"])
def test_the_gru_models_train_and_draw_attention_where_they_have_it(model, tmp_path):
    out = tmp_path / model
    result = mt.train(mt.Config(model=model, epochs=2, lr=0.01, out=str(out), **dict(TINY, max_examples=600)))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    if model == "seq2seq_attention":
        mt.translate(out, ["i have two cats ."], device="cpu", attention=tmp_path / "a.png")
        assert (tmp_path / "a.png").stat().st_size > 1000
    else:
        with pytest.raises(Exception, match="no attention to draw"):
            mt.translate(out, ["i have two cats ."], device="cpu", attention=tmp_path / "a.png")


@pytest.mark.parametrize("argv, needle", [
    (["train", "transformer", "--data", "digits"], "holds no sentence pairs"),
    (["train", "transformer", "--hidden", "30", "--heads", "4"], "multiple of --heads"),
    (["train", "transformer", "--num-steps", "1"], "--num-steps"),
    (["train", "transformer", "--data", "fra-eng", "--data-dir", "/nonexistent"], "fra"),
])
def test_bad_options_are_one_line_errors(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_translate_refuses_empty_sentences_and_other_runs(transformer_run, tmp_path, capsys):
    assert main(["translate", str(transformer_run), "  "]) == 2
    assert "non-empty sentence" in capsys.readouterr().err
    assert main(["translate", str(transformer_run), "hi", "--beam", "0"]) == 2
    assert "--beam" in capsys.readouterr().err
    assert main(["predict", str(transformer_run), "x.png"]) == 2
    assert "divekit translate" in capsys.readouterr().err
