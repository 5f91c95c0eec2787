"""issue 25, item 5b: ``train fcn_resnet18 --backbone lenet`` failed with a size-mismatch
RuntimeError. A body whose maps do not follow the input size (LeNet's features end in adaptive
pooling) cannot lay its scores back onto the pixels: it is refused in one line, before any run
file is written, naming the classifiers that fit; a fitting one trains."""

from __future__ import annotations

import pytest
import torch

from divekit.cli import main
from divekit.errors import DivekitError
from divekit.models import create_model
from divekit.models.fcn import check_backbone, fitting_backbones


def test_lenet_backbone_is_refused_in_one_line_naming_the_fitting_ones(tmp_path, capsys):
    out = tmp_path / "fcn"
    code = main(["train", "fcn_resnet18", "--backbone", "lenet", "--epochs", "1", "--limit", "4",
                 "--device", "cpu", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "--backbone 'lenet' cannot be an FCN body" in err[0]
    named = err[0].split("choose one of ")[1].split(", ")
    assert "resnet18" in named and "lenet" not in named
    assert not out.exists()  # refused before the run directory was made


def test_the_fitting_backbones_are_those_whose_real_maps_are_the_input_over_a_stride():
    """The meta-device probe against real forwards at three sizes (the definition of a body
    that fits), for every classifier the probe accepts and for lenet, which it refuses."""
    fitting = fitting_backbones()
    assert "resnet18" in fitting and "lenet" not in fitting
    for name in ["lenet", "resnet18"]:
        torch.manual_seed(0)
        body = create_model(name, num_classes=2, in_channels=3).features.eval()
        with torch.no_grad():
            sides = [body(torch.zeros(1, 3, n, n)).shape[-1] for n in (64, 128, 192)]
        follows = all(n % (64 // sides[0] or 1) == 0 and s * (64 // max(sides[0], 1)) == n
                      for s, n in zip(sides, (64, 128, 192)))
        assert follows == (name in fitting), (name, sides)
    with pytest.raises(DivekitError, match="choose one of"):
        check_backbone("lenet")
    check_backbone("resnet18")  # no error


def test_a_fitting_backbone_still_trains(tmp_path, capsys):
    out = tmp_path / "ok"
    assert main(["train", "fcn_resnet18", "--backbone", "resnet18", "--epochs", "1", "--limit",
                 "4", "--batch-size", "4", "--image-size", "64", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    assert (out / "checkpoint").is_dir()
