"""The translation task end to end on the embedded numbers-fr pairs: training (loss falls,
BLEU reported), exact resume (at an epoch and mid-epoch), evaluate, translate with greedy and
beam search, attention pictures, and one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import random

import pytest
import torch

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.run import evaluate, load_run, make_config, train
from divekit.errors import DivekitError
from divekit.models import model_info
from divekit.tasks.translate import TranslateConfig, TranslationTask, translate

TINY = dict(data="numbers-fr", max_examples=800, batch_size=64, bleu_examples=60, quiet=True,
            device="cpu")
SIZES = {"transformer": dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_blks=1, dropout=0.1),
         "seq2seq": dict(embed_size=16, num_hiddens=32, num_layers=1, dropout=0.1)}
SIZES["seq2seq_attention"] = SIZES["seq2seq"]


def config(model: str, **values) -> TranslateConfig:
    return make_config(TranslateConfig, {"model": model, **TINY, **SIZES[model], **values})


def _rows(run):
    with open(run / "metrics.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "run"
    train(TranslationTask(config("transformer", epochs=3, lr=0.005, out=str(out))))
    return out


def test_training_lowers_the_loss_and_reports_bleu(transformer_run):
    rows = _rows(transformer_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_bleu"]) > float(rows[0]["val_bleu"]) >= 0
    lines = (transformer_run / "translations.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "source\toutput\treference" and len(lines) == 61
    for name in ("src_vocab.json", "tgt_vocab.json", "curves.png", "config.json"):
        assert (transformer_run / name).is_file()


def test_evaluate_and_translate_greedy_and_beam(transformer_run, tmp_path, capsys):
    metrics = evaluate(transformer_run, device="cpu", bleu_beam=3)
    assert {"loss", "acc", "bleu", "bleu_beam3"} <= set(metrics)
    assert 0 <= metrics["bleu"] <= 100 and 0 <= metrics["acc"] <= 1
    assert metrics["bleu"] == pytest.approx(float(_rows(transformer_run)[-1]["val_bleu"]), abs=1e-3)
    run = load_run(transformer_run)
    sentences = ["I have two cats.", "we bought forty-one horses !"]
    greedy, beam = translate(run, sentences), translate(run, sentences, beam=4)
    assert len(greedy.outputs) == len(beam.outputs) == 2
    assert all(isinstance(s, str) and s for s in greedy.outputs + beam.outputs)
    assert greedy.unknown == [] and greedy.attention is None
    assert main(["translate", str(transformer_run), "i have two cats .", "zzz 3", "--beam", "2",
                 "--attention", str(tmp_path / "att.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "i have two cats . =>" in out.out and (tmp_path / "att.png").stat().st_size > 1000
    assert "'zzz'" in out.err and "<unk>" in out.err
    assert main(["evaluate", str(transformer_run), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("validation: loss ")


def test_translate_returns_the_attention_of_the_last_blocks_heads(transformer_run):
    result = translate(load_run(transformer_run), ["i have two cats ."], attention=True)
    attn = result.attention
    n_out = len(result.outputs[0].split()) + 1  # with <eos>
    assert attn.weights.shape == (2, n_out, len(attn.src_tokens)) and attn.titles == ["head 1", "head 2"]
    assert attn.out_tokens[-1] == "<eos>" and attn.src_tokens[-1] == "<eos>"
    torch.testing.assert_close(attn.weights.sum(-1), torch.ones(2, n_out))  # each row sums to 1


def test_predict_translates_each_sentence(transformer_run, capsys):
    assert main(["predict", str(transformer_run), "i have two cats .", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("i have two cats . => ")


def test_resume_continues_bit_identically(tmp_path):
    cfg = dict(max_examples=200, bleu_examples=0)  # 180 training pairs: 3 steps an epoch
    train(TranslationTask(config("transformer", epochs=2, out=str(tmp_path / "a"), **cfg)))
    train(TranslationTask(config("transformer", epochs=1, out=str(tmp_path / "b"), **cfg)))
    train(TranslationTask(config("transformer", epochs=2, out=str(tmp_path / "b"), resume=True, **cfg)))
    _same_weights(load_run(tmp_path / "a").model, load_run(tmp_path / "b").model)


class _Crashing(TranslationTask):
    """Fails at the ``fail_at``-th training step, as a killed job would."""

    def __init__(self, config, record=None, fail_at=None):
        super().__init__(config, record)
        self.fail_at, self.calls = fail_at, 0

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().training_step(model, batch)


def test_mid_epoch_resume_continues_bit_identically(tmp_path):
    # 180 training pairs in batches of 32: 6 steps an epoch; a checkpoint every 4 steps
    cfg = dict(max_examples=200, batch_size=32, bleu_examples=10, epochs=2, checkpoint_every=4)
    straight = train(TranslationTask(config("transformer", out=str(tmp_path / "a"), **cfg)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_Crashing(config("transformer", out=str(tmp_path / "b"), **cfg), fail_at=6 + 3))
    assert CheckpointDir(tmp_path / "b").latest().name == "epoch-0001-step-000002"
    resumed = train(TranslationTask(config("transformer", out=str(tmp_path / "b"), resume=True, **cfg)))
    _same_weights(straight.model, resumed.model)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    assert (tmp_path / "a" / "translations.txt").read_text(encoding="utf-8") == (tmp_path / "b" / "translations.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("model", ["seq2seq", "seq2seq_attention"])
def test_the_gru_models_train_and_draw_attention_where_they_have_it(model, tmp_path):
    out = tmp_path / model
    result = train(TranslationTask(config(model, epochs=2, lr=0.01, out=str(out), max_examples=300,
                                   bleu_examples=20)))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    run = load_run(out)
    if model == "seq2seq_attention":
        attn = translate(run, ["i have two cats ."], attention=True).attention
        assert attn.weights.ndim == 2 and attn.titles is None
        assert main(["translate", str(out), "i have two cats .", "--attention", str(tmp_path / "a.png"),
                     "--device", "cpu"]) == 0
        assert (tmp_path / "a.png").stat().st_size > 1000
    else:
        with pytest.raises(DivekitError, match="no attention to draw"):
            translate(run, ["i have two cats ."], attention=True)


def test_validation_lists_are_ordered_by_pair_whatever_the_sharding():
    """Ranks join their lists in rank order; validation_end sorts them back by pair index."""
    task = TranslationTask(config("transformer", bleu_examples=50))
    refs = [" ".join(t) for _, t in task.data.val_pairs[:50]]
    hyps = [" ".join(r.split()[:-1]) for r in refs]  # each reference without its last word
    sums = {"loss_sum": torch.tensor(9.0), "correct": torch.tensor(6), "tokens": torch.tensor(12),
            "bleu_index": list(range(50)), "sources": [f"s{i}" for i in range(50)],
            "references": refs, "hypotheses": hyps}
    expected = task.validation_end(sums)
    shuffled = list(range(50))
    random.Random(0).shuffle(shuffled)
    mixed = {**sums, **{k: [sums[k][i] for i in shuffled]
                        for k in ("bleu_index", "sources", "references", "hypotheses")}}
    assert task.validation_end(mixed) == expected
    assert expected["loss"] == 0.75 and expected["acc"] == 0.5 and 0 < expected["bleu"] < 100
    assert expected["translations"][0] == ("s0", hyps[0], refs[0])


def test_the_model_sizes_are_the_familys_config_and_the_lr_its_recipe():
    cfg = make_config(TranslateConfig, {"model": "transformer"})
    assert (cfg.lr, cfg.optimizer, cfg.epochs, cfg.batch_size, cfg.grad_clip) == (0.0015, "adam", 10, 128, 1.0)
    for gru in ("seq2seq", "seq2seq_attention"):
        assert make_config(TranslateConfig, {"model": gru}).lr == 0.005
    assert make_config(TranslateConfig, {"model": "transformer", "lr": 0.01}).lr == 0.01
    cfg = make_config(TranslateConfig, {"model": "transformer", "num_heads": 2, "num_hiddens": 8})
    model = TranslationTask(cfg).build_model()
    assert model.encoder.num_hiddens == 8 and model.decoder.blks[0].attention1.num_heads == 2
    for name in ("transformer", "seq2seq"):  # the config's defaults are the builder's
        info = model_info(name)
        builder = {k: p.default for k, p in inspect.signature(info.builder).parameters.items()
                   if p.default is not p.empty}
        assert info.model_options() == builder
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("values, needle", [
    ({"num_steps": 1}, "--num-steps"), ({"val_fraction": float("nan")}, "--val-fraction"),
    ({"val_fraction": 0.5}, "--val-fraction"), ({"bleu_examples": -1}, "--bleu-examples"),
    ({"bleu_beam": 0}, "--bleu-beam"), ({"min_freq": 0}, "--min-freq"),
    ({"max_examples": 1}, "--max-examples"), ({"grad_clip": float("nan")}, "--grad-clip"),
    ({"num_hiddens": 30, "num_heads": 4}, "--hidden 30 must be a multiple of --heads 4"),
    ({"dropout": float("nan")}, "--dropout"), ({"num_blks": 0}, "--layers"),
    ({"data": "digits"}, "holds no sentence pairs"),
])
def test_bad_values_are_refused_naming_the_option(values, needle):
    with pytest.raises(DivekitError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        make_config(TranslateConfig, {"model": "transformer", **values})


def test_a_model_of_another_task_is_refused():
    with pytest.raises(DivekitError, match="not a translation model"):
        TranslateConfig(model="lenet").validate()


@pytest.mark.parametrize("argv, needle", [
    (["train", "transformer", "--data", "digits"], "holds no sentence pairs"),
    (["train", "transformer", "--hidden", "30", "--heads", "4"], "multiple of --heads"),
    (["train", "transformer", "--num-steps", "1"], "--num-steps"),
    (["train", "seq2seq", "--embed", "0"], "--embed"),
    (["train", "transformer", "--data", "fra-eng", "--data-dir", "/nonexistent"], "fra"),
])
def test_bad_options_are_one_line_errors(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written for a run that never started


def test_translate_refuses_empty_sentences_and_other_runs(transformer_run, capsys):
    assert main(["translate", str(transformer_run), "  "]) == 2
    assert "non-empty sentence" in capsys.readouterr().err
    assert main(["translate", str(transformer_run), "hi", "--beam", "0"]) == 2
    assert "--beam" in capsys.readouterr().err
    run = load_run(transformer_run)
    other = dataclasses.replace(run, task=None)
    with pytest.raises(DivekitError, match="not a translation run"):
        translate(other, ["hi"])


# ----------------------------------------------------------------------------- translation as users run it


def test_translate_reads_a_file_keeping_empty_lines(transformer_run, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("i have twenty-one cats .\n\nthree dogs .\n", encoding="utf-8")
    assert main(["translate", str(transformer_run), "-i", str(src), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # 3 outputs, the 2nd empty
    expected = translate(load_run(transformer_run), ["i have twenty-one cats .", "three dogs ."])
    assert [lines[0], lines[2]] == expected.outputs


def test_translate_reads_standard_input(transformer_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("three dogs .\n"))
    assert main(["translate", str(transformer_run)]) == 0
    assert capsys.readouterr().out.splitlines() == translate(load_run(transformer_run),
                                                             ["three dogs ."]).outputs


def test_n_best_lists_hypotheses_best_first_with_normalised_scores(transformer_run, capsys):
    assert main(["translate", str(transformer_run), "three dogs .", "--beam", "4",
                 "--n-best", "3"]) == 0
    rows = [line.split(" ||| ") for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "0"]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    best = translate(load_run(transformer_run), ["three dogs ."], beam=4).outputs[0]
    assert rows[0][1] == best
    found = translate(load_run(transformer_run), ["three dogs ."], beam=4, n_best=3).nbest[0]
    assert [h.text for h in found] == [r[1] for r in rows]


@pytest.mark.parametrize("argv, needle", [
    (["x", "--beam", "0"], "--beam must be at least 1"),
    (["x", "--beam", "2", "--n-best", "3"], "--n-best 3 is larger than --beam 2"),
    (["x", "--batch-size", "0"], "--batch-size"),
    (["-i", "/nonexistent/in.txt"], "no such file"),
])
def test_bad_translate_options_are_one_line(transformer_run, capsys, argv, needle):
    assert main(["translate", str(transformer_run), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_only_unknown_words_get_a_one_line_note(transformer_run, capsys):
    assert main(["translate", str(transformer_run), "zyzzyva quux"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("zyzzyva quux => ")
    assert captured.err.count("\n") == 1 and "'zyzzyva', 'quux'" in captured.err


def test_a_sentence_longer_than_num_steps_is_cut_with_one_note(transformer_run, capsys):
    """No silent truncation: the model reads only its run's --num-steps (13) first tokens of
    a 4,000-token sentence; the translation is printed and one note says what was kept."""
    long = " ".join(["i have two cats ."] * 800)
    assert main(["translate", str(transformer_run), long, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("i have two cats . i have") and " => " in captured.out
    assert captured.out.strip().split(" => ")[1]  # a translation was printed
    assert captured.err.count("\n") == 1
    assert "first 13 of 4,000 tokens" in captured.err and "--num-steps 13" in captured.err


def test_several_cut_sentences_get_one_note_counting_them(transformer_run, caplog):
    import logging

    logger = logging.getLogger("divekit")
    logger.addHandler(caplog.handler)  # the CLI's tests stop it propagating to the root
    try:
        with caplog.at_level(logging.WARNING, logger="divekit"):
            found = translate(load_run(transformer_run), ["three dogs . " * 5, "i have two cats .",
                                                          "one cat . " * 10], batch_size=2)
    finally:
        logger.removeHandler(caplog.handler)
    assert all(found.outputs)
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notes) == 1 and "2 sentences" in notes[0] and "of 15 to 30" in notes[0]


def test_a_run_of_another_task_is_refused_in_one_line(tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"task": "classify", "config": {}}),
                                          encoding="utf-8")
    assert main(["translate", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err
    assert "'classify' run, not a translation run" in err and len(err.strip().splitlines()) == 1


def test_a_tokenizer_file_that_is_not_sentencepiece_is_one_line(tmp_path, capsys):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a sentencepiece model at all")
    assert main(["train", "transformer", "--tokenizer", str(bad), "--out", str(tmp_path / "r"),
                 "--quiet", "--epochs", "1", "--limit", "64"]) == 2
    err = capsys.readouterr().err
    assert "is not a SentencePiece model" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "transformer", "--tokenizer", "bpe:x", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_subword_translation_end_to_end(tmp_path, capsys):
    """--tokenizer bpe:N: a SentencePiece model trained on the training pairs, saved with the
    run; translations come back as words; evaluate reports BLEU and sacreBLEU."""
    pytest.importorskip("sentencepiece")
    out = tmp_path / "bpe"
    cfg = config("transformer", epochs=2, lr=0.005, out=str(out), tokenizer="bpe:120",
                 num_steps=24)
    result = train(TranslationTask(cfg))
    assert (out / "tokenizer.model").is_file()
    run = load_run(out)
    assert run.record["tokenizer_pieces"] == 120
    text = translate(run, ["i have twenty-one cats ."]).outputs[0]
    assert "▁" not in text and text.strip() == text
    assert result.history[-1]["val_sacrebleu"] >= 0
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert "BLEU" in line and "sacreBLEU (13a, detokenized)" in line
