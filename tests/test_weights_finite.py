"""Weights holding NaN or inf are refused where they are loaded, in one line naming the tensor
(issue 17): evaluate, predict (and generate/translate, which open runs the same way through
``load_run``), a resume, and a fine-tuning SOURCE (a run or a weights file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.run import load_run
from divekit.errors import DivekitError
from divekit.weights import check_finite, load_state_file


@pytest.fixture
def run(trained_lenet_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_lenet_run, out)
    return out


def poison(run: Path, value: float, n: int = 1) -> str:
    """Put ``value`` into ``n`` entries of one weight of the newest checkpoint; its name."""
    path = CheckpointDir(run).latest() / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() >= n
                and k.endswith("weight"))
    tensors[name].view(-1)[:n] = value
    save_file(tensors, str(path))
    return name


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return path


def test_evaluate_refuses_nan_weights_naming_the_tensor(run, capsys):
    name = poison(run, float("nan"), n=3)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert f"tensor {name!r} holds NaN (3 of " in line and "model.safetensors" in line


def test_predict_refuses_inf_weights_instead_of_printing_nan(run, image, capsys):
    name = poison(run, float("-inf"))
    assert main(["predict", str(run), str(image), "--device", "cpu"]) == 2
    assert f"tensor {name!r} holds inf (1 of " in one_line_error(capsys)
    assert "nan" not in capsys.readouterr().out


def test_load_run_refuses_them_for_every_reader(run):
    """generate and translate open their runs through load_run, as evaluate and predict do."""
    name = poison(run, float("nan"))
    with pytest.raises(DivekitError, match=f"tensor '{name}' holds NaN"):
        load_run(run)
    assert load_run(run, weights=False).model is not None  # the record itself is fine


def test_resuming_a_run_whose_last_checkpoint_holds_nan_is_refused(run, capsys):
    name = poison(run, float("nan"))
    assert main(["train", "lenet_bn", "--resume", "--epochs", "3", "--out", str(run), "--quiet",
                 "--device", "cpu"]) == 2
    assert f"tensor {name!r} holds NaN" in one_line_error(capsys)
    assert CheckpointDir(run).latest().name == "epoch-0002"  # nothing was trained or written


def test_a_finetune_source_run_with_nan_weights_is_refused(run):
    from divekit.tasks.finetune import resolve_source

    name = poison(run, float("nan"))
    with pytest.raises(DivekitError, match=f"tensor '{name}' holds NaN"):
        resolve_source(str(run))


def test_a_finetune_weights_file_with_inf_is_refused(tmp_path):
    state = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.ones(10, 4)}
    state["fc.weight"][2, 1] = float("inf")
    path = tmp_path / "resnet18-weights.pth"
    torch.save(state, path)
    with pytest.raises(DivekitError, match=rf"weights file {path}: tensor 'fc.weight' holds inf"):
        load_state_file(path)


def test_check_finite_counts_both_kinds_and_ignores_integer_tensors():
    check_finite({"steps": torch.tensor([2**62]), "w": torch.ones(3)}, "ok")
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")], dtype=torch.bfloat16)
    with pytest.raises(DivekitError, match=r"'b' holds NaN and inf \(3 of 4 values\)"):
        check_finite({"a": torch.ones(2), "b": bad}, "x")
