"""A task that another package adds through the ``divekit.tasks`` entry point is a task like
the built-in ones: ``divekit train`` shows its options and trains it, ``divekit evaluate`` and
``divekit predict`` print through its own format methods, and ``predict`` offers its
PredictConfig's options.

The package lives in a temporary folder: a module (the task, its model and its data, each
registered where it is defined) and a ``*.dist-info`` whose ``entry_points.txt`` names the
task, put on ``PYTHONPATH`` of a fresh interpreter. Nothing of divekit is edited or reinstalled.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""A toy task: linear regression y = x . w + noise on random tensors."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from divekit.config import option
from divekit.data import register_dataset
from divekit.data.loader import TensorBatchLoader
from divekit.engine.config import TaskConfig
from divekit.engine.task import Task
from divekit.models import register_model

W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


@register_model("toy_linear", input_shape=None, task="toy_regression",
                recipes={"*": {"optimizer": "sgd", "lr": 0.1}})
def toy_linear(**options):
    """A linear layer from 4 numbers to 1."""
    return nn.Linear(4, 1)


@register_dataset("toy-random", task="toy_regression", offline=True)
def toy_random(n=256, noise=0.1, seed=0, **_):
    """Random x in R^4, y = x . w + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ W + noise * torch.randn(n, 1, generator=g)


@dataclass(frozen=True)
class ToyConfig(TaskConfig):
    data: str = option("toy-random", "the toy data set", metavar="NAME")
    batch_size: int = option(32, "minibatch size", metavar="N")
    noise: float = option(0.1, "toy: standard deviation of the targets' noise")


@dataclass(frozen=True)
class ToyPredictConfig:
    scale: float = option(1.0, "multiply the predictions by this")


class ToyRegression(Task, name="toy_regression"):
    Config = ToyConfig
    PredictConfig = ToyPredictConfig

    def _split(self, seed):
        from divekit.data import load_dataset

        return load_dataset(self.config.data, noise=self.config.noise, seed=seed)

    def train_data(self):
        return TensorBatchLoader(*self._split(self.config.seed + 1),
                                 batch_size=self.config.batch_size, shuffle=True)

    def val_data(self):
        return TensorBatchLoader(*self._split(10_000), batch_size=64)

    def build_model(self):
        return toy_linear()

    def training_step(self, model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        x, y = batch
        return {"sq_err": F.mse_loss(model(x), y, reduction="sum"), "count": len(y)}

    def predict(self, model, inputs, *, scale=1.0):
        x = torch.tensor([[float(v) for v in s.split(",")] for s in inputs])
        with torch.inference_mode():
            values = (scale * model(x)).flatten().tolist()
        return [{"input": s, "value": v} for s, v in zip(inputs, values)]

    def format_metrics(self, metrics):
        return f"toy validation MSE {metrics['sq_err']:.4f}"

    def format_prediction(self, item):
        return f"toy {item['input']} -> {item['value']:.3f}"
'''

SCRIPT = '''
import sys
from divekit.cli import main

for argv in {commands!r}:
    print("=== " + " ".join(argv), flush=True)
    try:
        code = main(argv)
    except SystemExit as e:  # --help
        code = e.code
    print(f"=== exit {{code}}", flush=True)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the package ``toyplug`` and its dist-info with the entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "toyplug.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[divekit.tasks]\ntoy_regression = toyplug:ToyRegression\n")
    return site


def _divekit(site: Path, cwd: Path, *commands: list[str]) -> dict[str, tuple[int, str]]:
    """Run ``divekit`` commands one after the other in one fresh interpreter with the plugin on
    its path: command → (exit code, what it printed)."""
    import os

    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(commands=[list(c) for c in commands])],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    found = re.findall(r"^=== ([^\n]*)\n(.*?)^=== exit (\S+)$", done.stdout, re.M | re.S)
    assert len(found) == len(commands), done.stdout
    return {command: (int(code) if code != "None" else 0, text) for command, text, code in found}


def test_a_task_added_through_an_entry_point_trains_evaluates_and_predicts(plugin_path, tmp_path):
    run = tmp_path / "run"
    out = _divekit(
        plugin_path, tmp_path,
        ["train", "--help"],
        ["train", "toy_linear", "--help"],
        ["train", "toy_linear", "--epochs", "5", "--noise", "0.05", "--out", str(run), "--quiet"],
        ["evaluate", str(run)],
        ["predict", "--help"],
        ["predict", str(run), "1,0,0,0", "0,0,0,1", "--scale", "2"],
        ["predict", str(run), "1,0,0,0", "--top-k", "2"],
        ["models", "--task", "toy_regression"],
    )
    code, text = out["train --help"]
    assert code == 0 and "toy_regression" in text.split("tasks:")[1]
    code, text = out["train toy_linear --help"]
    assert code == 0 and "--noise NOISE" in text and "toy: standard deviation" in text
    assert "(default: 0.1, toy_linear's recipe)" in text  # --lr from the plugin model's recipe

    code, text = out[f"train toy_linear --epochs 5 --noise 0.05 --out {run} --quiet"]
    assert code == 0, text
    assert f"run directory: {run}" in text and (run / "config.json").is_file()
    import json

    record = json.loads((run / "config.json").read_text())
    assert record["task"] == "toy_regression" and record["config"]["noise"] == 0.05

    code, text = out[f"evaluate {run}"]
    assert code == 0 and text.startswith("toy validation MSE ")
    mse = float(text.split()[-1])
    assert mse < 0.5  # five epochs of SGD fit y = x . w + noise (the variance of y: 14.25)

    code, text = out["predict --help"]
    assert code == 0 and "--scale SCALE" in text and "toy_regression: multiply" in text

    code, text = out[f"predict {run} 1,0,0,0 0,0,0,1 --scale 2"]
    assert code == 0
    lines = text.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["toy 1,0,0,0", "toy 0,0,0,1"]
    first, second = (float(line.split(" -> ")[1]) for line in lines)
    assert abs(first - 2 * 1.0) < 1.0 and abs(second - 2 * 3.0) < 1.5  # 2 x (w_i + bias)

    code, text = out[f"predict {run} 1,0,0,0 --top-k 2"]  # another task's option: refused
    assert code == 2

    code, text = out["models --task toy_regression"]
    assert code == 0 and "toy_linear" in text and "A linear layer from 4 numbers to 1." in text
