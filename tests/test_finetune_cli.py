"""`divekit finetune`: the path (image or text) comes from what SOURCE is, each path's --help
lists only its own options, and the four text heads' losses agree with plain torch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from divekit.cli import main
from divekit.cli.finetune import source_path
from divekit.errors import DivekitError
from divekit.tasks.bert_finetune import is_bert_source
from divekit.tasks.finetune import is_image_source
from divekit.tasks.finetune_heads import HEAD_CLASSES

IMAGE_ONLY = ("--arch", "--freeze", "--mixup", "--head-lr-mult")
TEXT_ONLY = ("--lora", "--doc-stride", "--max-answer-len", "--add-tokens")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["finetune", *argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return {word.rstrip(",") for word in text.split() if word.startswith("--")}


def test_the_image_help_lists_image_options_only_and_names_the_text_help(capsys):
    shown = _help(capsys)
    assert shown.startswith("usage: divekit finetune SOURCE [options]")
    flags = _flags(shown)
    assert set(IMAGE_ONLY) <= flags and not set(TEXT_ONLY) & flags
    assert "`divekit finetune --task classify --help`" in " ".join(shown.split())
    assert "(default: 0.01)" in shown  # the image path's --lr


@pytest.mark.parametrize("argv", [("--task", "classify"), ("minilm",), ("--task", "qa", "x")])
def test_the_text_help_lists_text_options_only_and_names_the_image_help(capsys, argv):
    shown = _help(capsys, *argv)
    assert shown.startswith("usage: divekit finetune SOURCE [--task {classify,pair,tag,qa}]")
    flags = _flags(shown)
    assert set(TEXT_ONLY) <= flags and not set(IMAGE_ONLY) & flags
    assert "`divekit finetune --help`" in " ".join(shown.split())
    assert "learning rate (default: 0.0001)" in shown and "(default: adamw)" in shown


def _run_dir(path, task: str):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"task": task, "config": {"model": "lenet"}}))
    return str(path)


def test_sources_are_told_apart_without_loading_them(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    export = tmp_path / "pretrained"
    (export / "bert").mkdir(parents=True)
    (export / "bert" / "config.json").write_text("{}")
    weights = tmp_path / "resnet18-f37072fd.pth"
    weights.write_bytes(b"not read")
    text = ["minilm", str(hf), str(export), _run_dir(tmp_path / "pre", "bert_pretrain")]
    image = [_run_dir(tmp_path / "clf", "classify"), str(weights), "resnet18:IMAGENET1K_V1"]
    for spec in text:
        assert is_bert_source(spec) and source_path(spec, task_typed=False) == "text", spec
    for spec in image:
        assert is_image_source(spec) and not is_bert_source(spec), spec
        assert source_path(spec, task_typed=False) == "image", spec
        with pytest.raises(DivekitError, match="is an image classifier: leave --task out"):
            source_path(spec, task_typed=True)
    missing = str(tmp_path / "not-yet")  # neither: --task decides, the path's errors follow
    assert not is_bert_source(missing) and not is_image_source(missing)
    assert source_path(missing, task_typed=True) == "text"
    assert source_path(missing, task_typed=False) == "image"


def _one_line(capsys, code: int) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_options_of_the_other_path_are_refused_in_one_line(tmp_path, capsys):
    clf = _run_dir(tmp_path / "clf", "classify")
    line = _one_line(capsys, main(["finetune", clf, "--task", "classify"]))
    assert "leave --task out" in line
    line = _one_line(capsys, main(["finetune", "minilm", "--freeze", "1"]))
    assert "--freeze apply to image fine-tuning, not to --task classify" in line
    line = _one_line(capsys, main(["finetune", "resnet18:IMAGENET1K_V1", "--lora", "2",
                                   "--doc-stride", "8"]))
    assert "--doc-stride, --lora apply to text fine-tuning" in line


def _logits_and_targets(seed: int, shape: tuple[int, ...], classes: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, classes, generator=g), torch.randint(classes, shape, generator=g)


def test_each_heads_loss_is_the_cross_entropy_nn_computes():
    """The heads' losses against torch.nn.CrossEntropyLoss and a hand-written masked mean."""
    ce = nn.CrossEntropyLoss()
    out, y = _logits_and_targets(0, (6,), 4)
    for name in ("classify", "pair"):
        loss, logs = HEAD_CLASSES[name](None).loss(out, y)  # type: ignore[arg-type]
        torch.testing.assert_close(loss, ce(out, y))
        assert float(logs["acc"]) == pytest.approx(float((out.argmax(1) == y).float().mean()))

    out, y = _logits_and_targets(1, (3, 7), 5)
    y[:, 0] = y[:, -2:] = -100  # [CLS], later sub-tokens and padding carry no label
    loss, logs = HEAD_CLASSES["tag"](None).loss(out, y)  # type: ignore[arg-type]
    keep = y != -100
    nll = -out.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(loss, (nll * keep).sum() / keep.sum())
    right = ((out.argmax(-1) == y) & keep).sum() / keep.sum()
    assert float(logs["acc"]) == pytest.approx(float(right))

    g = torch.Generator().manual_seed(2)
    out, y = torch.randn(4, 9, 2, generator=g), torch.randint(9, (4, 2), generator=g)
    loss, _ = HEAD_CLASSES["qa"](None).loss(out, y)  # type: ignore[arg-type]
    torch.testing.assert_close(loss, (ce(out[..., 0], y[:, 0]) + ce(out[..., 1], y[:, 1])) / 2)


def test_each_head_prints_its_predictions():
    heads = {name: cls(None) for name, cls in HEAD_CLASSES.items()}  # type: ignore[arg-type]
    item = {"input": "a fine lamp", "label": "positive", "probability": 0.9,
            "top": [("positive", 0.9), ("negative", 0.1)], "gold": "positive"}
    assert heads["classify"].format_prediction(item) == \
        "a fine lamp: positive 0.900 (negative 0.100) [gold: positive]"
    tagged = {"input": "anna lives in paris", "entities": [("PER", "anna"), ("LOC", "paris")]}
    assert heads["tag"].format_prediction(tagged) == "anna lives in paris: PER: anna, LOC: paris"
    assert heads["tag"].format_prediction({**tagged, "entities": []}).endswith("no entities")
    answer = {"input": "where does anna live", "answer": "paris", "score": 7.25, "start": 14}
    assert heads["qa"].format_prediction(answer) == "where does anna live: 'paris' (score 7.250)"
    metrics = {"exact_match": 0.5, "f1": 0.75, "note": "x"}
    assert heads["qa"].format_metrics(metrics) == "exact_match 0.5000, f1 0.7500"


def test_a_bert_without_task_is_classify_and_resume_takes_the_runs_own_options(
        bert_run, tmp_path, monkeypatch, capsys):
    """`finetune minilm` (no --task) trains a classify head and says so; `--resume` without
    --out continues the newest run of that name with its own options under what is typed
    (engine.record.resume_values): its --lr 3e-4 is taken over, not refused as a change."""
    from divekit.engine.checkpoint import CheckpointDir

    monkeypatch.chdir(tmp_path)
    data = ["--data", f"csv:{bert_run.parent / 'reviews.csv'}"]
    assert main(["finetune", "minilm", *data, "--epochs", "1", "--lr", "3e-4", "--limit", "6",
                 "--batch-size", "6", "--max-len", "16", "--device", "cpu", "--quiet"]) == 0
    assert "no --task: fine-tuning minilm as classify" in capsys.readouterr().out
    run = tmp_path / "runs" / "bert-classify-reviews"
    assert json.loads((run / "config.json").read_text())["config"]["task"] == "classify"
    assert main(["finetune", "minilm", "--task", "classify", *data, "--epochs", "2",
                 "--resume", "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["lr"] == 3e-4 and config["limit"] == 6 and config["max_len"] == 16
    assert CheckpointDir(run).latest().name == "epoch-0002"


def test_predict_on_a_text_run_refuses_the_options_of_other_tasks(bert_run, capsys):
    """Its options are TextPredictConfig's (--top-k, --max-answer-len); --threshold (detection)
    was taken and ignored."""
    line = _one_line(capsys, main(["predict", str(bert_run), "a great kettle", "--threshold",
                                   "0.3", "--device", "cpu"]))
    assert "--threshold does not apply to a bert_finetune run" in line
    assert "--top-k" in line and "--max-answer-len" in line
    assert main(["predict", str(bert_run), "a great kettle", "--top-k", "1", "--device",
                 "cpu"]) == 0
    shown = capsys.readouterr().out.splitlines()[-1]
    assert shown.startswith("a great kettle: ") and "(" not in shown  # one label, no others
