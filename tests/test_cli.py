"""The command line as a new user meets it: help, listings, errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from divekit.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_the_zoo(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    for name in ("lenet", "lenet_bn", "alexnet", "vgg11", "nin", "googlenet", "resnet18",
                 "resnet34", "resnet50"):
        assert f"\n{name} " in out
    assert "1x28x28" in out and "1x96x96" in out


def test_summary_nin_ends_at_ten_classes(capsys):
    code, out, _ = run_cli(capsys, "summary", "nin", "--input-shape", "1,224,224")
    assert code == 0
    assert "(1, 10)" in out.splitlines()[-4] or "(1, 10)" in out
    assert "total parameters" in out and "multiply-adds" in out


def test_summary_googlenet_stages_reduce_96_to_3(capsys):
    code, out, _ = run_cli(capsys, "summary", "googlenet", "--input-shape", "1,96,96")
    assert code == 0
    assert "(1, 832, 3, 3)" in out and "(1, 1024)" in out


def test_summary_vgg_parameters_sit_in_the_dense_layers(capsys):
    code, out, _ = run_cli(capsys, "summary", "vgg11", "--input-shape", "1,224,224")
    assert code == 0
    assert "most parameters: head" in out
    assert "most compute: features" in out


def test_summary_of_a_branching_detector_lists_backbone_and_heads(capsys):
    code, out, _ = run_cli(capsys, "summary", "tiny_ssd", "--input-shape", "3,64,64")
    assert code == 0
    # five scales: 8, 4, 2, 1, 1 pixels; every scale has class and box predictors
    for line in ("blocks.0", "(1, 64, 8, 8)", "cls_predictors.4", "bbox_predictors.4"):
        assert line in out
    from divekit.models import create_model
    from divekit.models.summary import count_params

    total = count_params(create_model("tiny_ssd", num_classes=10))  # the CLI's default
    assert f"total parameters: {total:,}" in out  # every parameter sits in some listed layer
    code, _, err = run_cli(capsys, "summary", "tiny_ssd", "--input-shape", "3,8,8")
    assert code == 2 and "needs images of at least 64" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "summary", "lenet", "--input-shape", "1,4,4")
    assert code == 2 and "fails at layer features.3 (Conv2d)" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["summary", "resnet1000"], "unknown model 'resnet1000'; choose one of:"),
        (["train", "lenet", "--data", "imagenet-xl"], "unknown dataset 'imagenet-xl'; choose one of:"),
        (["summary", "lenet", "--input-shape", "1,8,8"], "fails at layer"),
        (["summary", "lenet", "--input-shape", "1,x,8"], "--input-shape must be C,H,W"),
        (["predict", "/nonexistent/run", "a.png"], "/nonexistent/run"),
        (["train", "lenet", "--data", "digits", "--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_errors_are_one_line_and_nonzero(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_model_lists_valid_names(capsys):
    _, _, err = run_cli(capsys, "summary", "nope")
    assert "resnet18" in err and "lenet" in err


def test_missing_image_file_is_named(capsys, trained_lenet_run):
    code, _, err = run_cli(capsys, "predict", str(trained_lenet_run), "/no/such/seven.png")
    assert code != 0 and "/no/such/seven.png" in err and "Traceback" not in err


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "divekit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "divekit train" in proc.stdout


def test_debug_shows_traceback():
    proc = subprocess.run([sys.executable, "-m", "divekit", "summary", "nope", "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_usage_errors_are_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "divekit", "train", "lenet", "--epochs", "many"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--epochs" in proc.stderr and "--help" in proc.stderr


def test_a_reader_that_leaves_early_gets_no_error_message(monkeypatch, capsys):
    """`divekit models | head -1`: writing to a pipe whose reader has gone ends quietly."""
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["models"]) == 141
    assert capsys.readouterr().err == ""
