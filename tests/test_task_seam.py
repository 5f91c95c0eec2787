"""The seam: a Task subclass is all a new job needs, and the Trainer calls its hooks in order."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Callback, Task, TaskConfig, Trainer
from divekit.engine.run import evaluate, load_run, train
from divekit.errors import DivekitError


def test_a_misspelled_hook_fails_when_the_class_is_created():
    with pytest.raises(TypeError, match="on_epoc_end.*not a Task hook"):
        class Sloppy(Task):
            def on_epoc_end(self, model, epoch, run, metrics):
                pass


def test_a_hook_with_the_wrong_arguments_fails_when_the_class_is_created():
    with pytest.raises(TypeError, match=r"on_epoch_end takes 4 arguments"):
        class OldStyle(Task):
            def on_epoch_end(self, model, epoch, run_dir):  # the old three-argument hook
                pass


class Line(Task, name="test_line"):  # the ten-line task: fit y = 3x - 1
    Config = TaskConfig
    x = torch.linspace(-1, 1, 64).unsqueeze(1)

    def train_data(self):
        return TensorBatchLoader(self.x, 3 * self.x - 1, batch_size=16, shuffle=True)

    def val_data(self):
        return TensorBatchLoader(self.x, 3 * self.x - 1, batch_size=64)

    def build_model(self):
        return nn.Linear(1, 1)

    def training_step(self, model, batch):
        loss = F.mse_loss(model(batch[0]), batch[1])
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        return {"sq_err": F.mse_loss(model(batch[0]), batch[1], reduction="sum"),
                "count": len(batch[0])}


class Recorder(Callback):
    def __init__(self):
        self.calls: list[tuple] = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start",))

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_train_batch_end(self, trainer, index, logs):
        self.calls.append(("batch_end", index))

    def on_validation_end(self, trainer, metrics):
        self.calls.append(("validation_end", sorted(metrics)))

    def on_epoch_end(self, trainer, row):
        self.calls.append(("epoch_end", row["epoch"]))

    def on_fit_end(self, trainer):
        self.calls.append(("fit_end",))


def test_a_ten_line_task_trains_through_the_trainer_with_hooks_in_order(tmp_path):
    cfg = TaskConfig(model="line", data="x", epochs=2, lr=0.5, momentum=0.0, quiet=True,
                     device="cpu")
    recorder = Recorder()
    trainer = Trainer(Line(cfg), cfg, tmp_path / "run", callbacks=[recorder])
    history = trainer.fit()
    epoch = [("epoch_start", None), *[("batch_end", i) for i in range(4)],
             ("validation_end", ["sq_err"]), ("epoch_end", None)]
    expected = [("fit_start",)]
    for e in (1, 2):
        expected += [(name, e) if arg is None else (name, arg) for name, arg in epoch]
    expected.append(("fit_end",))
    assert recorder.calls == expected
    assert history[-1]["val_sq_err"] < history[0]["val_sq_err"]
    assert (tmp_path / "run" / "metrics.csv").is_file()


def test_a_run_is_opened_and_evaluated_by_the_engine_for_any_task(tmp_path):
    cfg = TaskConfig(model="line", data="x", epochs=3, lr=0.5, momentum=0.0, quiet=True,
                     device="cpu", out=str(tmp_path / "run"))
    result = train(Line(cfg))
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["task"] == "test_line" and record["config"]["epochs"] == 3
    run = load_run(tmp_path / "run")
    assert isinstance(run.task, Line) and not run.model.training
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, run.model.state_dict()[k])
    metrics = evaluate(tmp_path / "run", device="cpu")
    assert metrics["sq_err"] == pytest.approx(result.final["val_sq_err"], rel=1e-6)


def test_configs_are_frozen_and_checked_where_they_enter():
    cfg = TaskConfig(model="line", data="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    for bad, message in [({"grad_clip": -1.0}, "--grad-clip"), ({"warmup_epochs": -1.0}, "--warmup-epochs"),
                         ({"checkpoint_every": 0}, "--checkpoint-every"), ({"threads": 0}, "--threads"),
                         ({"lr": float("nan")}, "--lr"), ({"epochs": 0}, "--epochs")]:
        with pytest.raises(DivekitError, match=message):
            dataclasses.replace(cfg, **bad).validate()


def test_lower_layers_do_not_import_the_engine_tasks_or_cli():
    import subprocess
    import sys

    code = ("import sys, divekit.models, divekit.ops, divekit.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('divekit.engine', "
            "'divekit.tasks', 'divekit.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
