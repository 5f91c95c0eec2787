"""Classification end to end through the same functions the CLI calls."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir, load_weights
from divekit.models import create_model
from divekit.tasks import classify, evaluate, predict, train


def _metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_directory_holds_everything(trained_lenet_run):
    record = json.loads((trained_lenet_run / "config.json").read_text())
    assert record["task"] == "classify" and record["config"]["model"] == "lenet_bn"
    assert record["classes"] == [str(i) for i in range(10)]
    assert record["image_size"] == [28, 28]  # 8×8 digits upsampled to the zoo's minimum
    rows = _metrics(trained_lenet_run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "samples_per_s", "seconds"}
    assert (trained_lenet_run / "curves.png").is_file()


def test_evaluate_reports_accuracy_per_class(trained_lenet_run):
    metrics = evaluate(trained_lenet_run, device="cpu")
    assert 0.0 <= metrics["acc"] <= 1.0
    assert set(metrics["per_class_acc"]) == {str(i) for i in range(10)}
    # the confusion matrix counts the same predictions the accuracy does
    per_class = _per_class_csv(trained_lenet_run)
    correct = sum(round(float(r["accuracy"]) * int(r["samples"])) for r in per_class)
    assert correct / sum(int(r["samples"]) for r in per_class) == pytest.approx(metrics["acc"], abs=1e-6)


def _per_class_csv(run_dir):
    with open(run_dir / "per_class.csv") as f:
        return list(csv.DictReader(f))


def test_evaluate_cli_takes_a_tta_option(trained_lenet_run, capsys):
    assert main(["evaluate", str(trained_lenet_run), "--device", "cpu", "--tta", "flip"]) == 0
    assert "acc" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(trained_lenet_run), "--tta", "rotate"])
    assert e.value.code != 0 and "invalid choice: 'rotate'" in capsys.readouterr().err


def test_predict_converts_any_image_like_training(trained_lenet_run, tmp_path):
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 23, 4), dtype=np.uint8)).save(rgba)
    gray = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((300, 200), dtype=np.uint8)).save(gray)
    results = predict(trained_lenet_run, [rgba, gray], top_k=3, device="cpu")
    assert [len(r["predictions"]) for r in results] == [3, 3]
    probs = [p for _, p in results[0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


# slow (16 s): tests/test_kill_loop.py resumes through the CLI and checks bit-identity in make test
@pytest.mark.slow
def test_cli_resume_continues_to_the_new_total_bit_identically(tmp_path, capsys):
    common = ["--data", "digits", "--limit", "200", "--batch-size", "32", "--lr", "0.05", "--scheduler", "none",
              "--device", "cpu", "--quiet", "--seed", "7"]
    assert main(["train", "lenet_bn", *common, "--epochs", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "lenet_bn", *common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "lenet_bn", "--resume", "--epochs", "4", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert [r["epoch"] for r in _metrics(tmp_path / "b")] == ["1", "2", "3", "4"]
    wa, wb = (create_model("lenet_bn", num_classes=10, in_channels=1) for _ in range(2))
    load_weights(wa, CheckpointDir(tmp_path / "a").latest() / "model.safetensors")
    load_weights(wb, CheckpointDir(tmp_path / "b").latest() / "model.safetensors")
    for (k, a), b in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(a, b), k


def test_fresh_run_refuses_to_overwrite(tmp_path, capsys, trained_lenet_run):
    code = main(["train", "lenet", "--data", "digits", "--out", str(trained_lenet_run), "--quiet"])
    assert code != 0 and "--resume" in capsys.readouterr().err


def test_too_small_input_names_the_layer_and_suggests_resize():
    cfg = classify.ClassifyConfig(model="lenet", data="digits", resize=8, limit=50, quiet=True)
    with pytest.raises(Exception, match=r"fails at layer .*--resize 28"):
        classify.ClassificationTask(cfg).build_model()


@pytest.mark.slow
def test_resnet18_digits_demo_reaches_95_percent(tmp_path):
    result = train(classify.ClassifyConfig(
        model="resnet18", data="digits", epochs=6, batch_size=64, lr=0.05, scheduler="cosine",
        quiet=True, out=str(tmp_path / "demo")))
    assert result.final["val_acc"] >= 0.95


def test_loss_falls_over_a_short_run(trained_lenet_run):
    rows = _metrics(trained_lenet_run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_bf16_autocast_and_channels_last_train_on_the_cpu(tmp_path):
    result = train(classify.ClassifyConfig(
        model="resnet18", data="digits", epochs=1, limit=64, batch_size=32, amp=True,
        channels_last=True, quiet=True, device="cpu", out=str(tmp_path / "amp")))
    assert result.final["train_loss"] == pytest.approx(result.final["train_loss"])  # finite
    assert torch.isfinite(torch.tensor(result.final["val_loss"]))


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    train(classify.ClassifyConfig(
        model="lenet", data="digits", epochs=1, limit=64, tensorboard=True, quiet=True,
        device="cpu", out=str(tmp_path / "tb")))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
