"""The Trainer: exact resume, NaN stop, atomic checkpoints, logs, schedules."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Task, TrainConfig, Trainer
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.optim import lr_multiplier
from divekit.errors import DivekitError, TrainingDiverged


class ToyTask(Task):
    """A small classifier with dropout and BatchNorm, so RNG and buffers both matter."""

    def __init__(self, n: int = 96, poison_at: int | None = None):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.poison_at, self.calls = poison_at, 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(16, 2))

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=20, shuffle=True, seed=3)

    def val_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=50)

    def training_step(self, model, batch):
        x, y = batch
        self.calls += 1
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.poison_at is not None and self.calls >= self.poison_at:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def validation_step(self, model, batch):
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y, reduction="sum"), "count": len(y)}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheduler", ["none", "cosine"])
def test_two_epochs_plus_resume_equals_four_straight(tmp_path, scheduler):
    cfg = TrainConfig(epochs=4, lr=0.1, quiet=True, device="cpu", scheduler=scheduler,
                      weight_decay=1e-3)
    straight = Trainer(ToyTask(), cfg, tmp_path / "a")
    straight.fit()

    if scheduler == "none":  # `--epochs 2`, then `--resume --epochs 4`
        Trainer(ToyTask(), TrainConfig(**{**cfg.to_dict(), "epochs": 2}), tmp_path / "b").fit()
    else:  # a schedule spans the planned total: a 4-epoch run stopped after epoch 2
        stopped = Trainer(ToyTask(), TrainConfig(**cfg.to_dict()), tmp_path / "b")
        stopped.config = dataclasses.replace(stopped.config, epochs=2)
        stopped.fit()
    resumed = Trainer(ToyTask(), cfg, tmp_path / "b")
    resumed.fit(resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    a, b = _weights(straight.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


def test_run_dir_has_logs_curves_and_checkpoint(tmp_path):
    Trainer(ToyTask(), TrainConfig(epochs=2, quiet=True, device="cpu"), tmp_path).fit()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("train_loss", "train_acc", "val_loss", "lr", "samples_per_s", "seconds"):
        assert col in rows[0]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    latest = CheckpointDir(tmp_path).latest()
    assert latest is not None and latest.name == "epoch-0002"
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and "optimizer" in state and "rng" in state
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    steps_per_epoch = 5  # 96 samples / batch 20
    task = ToyTask(poison_at=steps_per_epoch + 3)  # third step of epoch 2
    trainer = Trainer(task, TrainConfig(epochs=3, quiet=True, device="cpu"), tmp_path)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3 \(global step 8\)"):
        trainer.fit()
    latest = CheckpointDir(tmp_path).latest()
    assert latest is not None and latest.name == "epoch-0001"
    # the kept weights are finite and load back
    fresh = Trainer(ToyTask(), TrainConfig(epochs=3, quiet=True, device="cpu"), tmp_path)
    assert fresh.restore() and fresh.epoch == 1
    assert all(torch.isfinite(v).all() for v in fresh.model.state_dict().values() if v.is_floating_point())


class HugeWeightsAtValidation(ToyTask):
    """From epoch ``at`` on, validation sees finite weights whose outputs are not (the last
    layer scaled to 3e38, near float32's largest: the logits overflow), as after a huge --lr
    (issue 25: `finetune --task classify --lr 1e30` ended with val_loss nan, exit 0)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.epoch = at, 0

    def on_epoch_start(self, model, epoch):
        self.epoch = epoch

    def on_validation_start(self, model):
        if self.epoch >= self.at:
            with torch.no_grad():
                w = model[-1].weight
                w.div_(w.abs().max()).mul_(3e38)


def test_non_finite_validation_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(HugeWeightsAtValidation(at=2), TrainConfig(epochs=3, quiet=True, device="cpu"),
                      tmp_path)
    with pytest.raises(TrainingDiverged, match=r"val_loss NaN at the end of epoch 2; .*"
                       r"the last good checkpoint \(epoch-0001\) is kept") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values()
               if v.is_floating_point())  # the weights were finite: the outputs were not
    latest = CheckpointDir(tmp_path).latest()
    assert latest is not None and latest.name == "epoch-0001"
    assert not (tmp_path / "checkpoint" / "epoch-0002").exists()
    with open(tmp_path / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert [r["epoch"] for r in trainer.history] == [1]
    fresh = Trainer(ToyTask(), TrainConfig(epochs=3, quiet=True, device="cpu"), tmp_path)
    assert fresh.restore() and fresh.epoch == 1


def test_non_finite_validation_loss_in_the_first_epoch_writes_no_checkpoint(tmp_path):
    trainer = Trainer(HugeWeightsAtValidation(at=1), TrainConfig(epochs=2, quiet=True, device="cpu"),
                      tmp_path)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        trainer.fit()
    assert CheckpointDir(tmp_path).latest() is None


def test_only_losses_are_judged_at_the_end_of_an_epoch():
    from divekit.engine.trainer import _non_finite_losses

    row = {"epoch": 1, "train_loss": 0.5, "val_loss": float("inf"), "val_loss_box": float("nan"),
           "val_mean_iou": float("nan"), "train_acc": 1.0}
    assert list(_non_finite_losses(row)) == ["val_loss", "val_loss_box"]
    assert _non_finite_losses({"train_loss": float("nan")}) != {}


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(ToyTask(), TrainConfig(epochs=1, quiet=True, device="cpu"), tmp_path)
    trainer.fit()
    import divekit.engine.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    trainer.config = dataclasses.replace(trainer.config, epochs=2)
    with pytest.raises(OSError):
        trainer.fit()
    latest = CheckpointDir(tmp_path).latest()
    assert latest is not None and latest.name == "epoch-0001"
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith(".")]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(DivekitError, match="nothing to resume"):
        Trainer(ToyTask(), TrainConfig(epochs=1, quiet=True, device="cpu"), tmp_path).fit(resume=True)


def test_loader_covers_every_sample_once_per_epoch_and_reshuffles():
    x = torch.arange(23)
    loader = TensorBatchLoader(x, batch_size=5, shuffle=True, seed=1)
    assert len(loader) == 5
    loader.set_epoch(1)
    e1 = torch.cat([b[0] for b in loader])
    loader.set_epoch(2)
    e2 = torch.cat([b[0] for b in loader])
    assert sorted(e1.tolist()) == list(range(23)) == sorted(e2.tolist())
    assert not torch.equal(e1, e2)
    loader.set_epoch(1)
    assert torch.equal(e1, torch.cat([b[0] for b in loader]))


def test_loader_with_sample_transform_keeps_the_same_order():
    x = torch.arange(17).float()
    plain = TensorBatchLoader(x, batch_size=4, shuffle=True, seed=5)
    per_sample = TensorBatchLoader(x, batch_size=4, shuffle=True, seed=5,
                                   sample_transform=lambda v: (v * 2,))
    plain.set_epoch(3)
    per_sample.set_epoch(3)
    assert torch.equal(torch.cat([b[0] for b in plain]) * 2, torch.cat([b[0] for b in per_sample]))


def test_schedules():
    assert lr_multiplier("none", 50, 100) == 1.0
    assert lr_multiplier("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_multiplier("step", 80, 100) == pytest.approx(0.01)
    assert lr_multiplier("none", 0, 100, warmup_steps=10) == pytest.approx(0.1)
    with pytest.raises(DivekitError, match="unknown scheduler"):
        lr_multiplier("bogus", 0, 10)


def test_configure_allocator_takes_effect_on_glibc_and_can_be_refused(monkeypatch):
    import sys

    from divekit.engine.device import configure_allocator

    monkeypatch.setenv("DIVEKIT_MALLOC", "default")
    assert configure_allocator() is False
    monkeypatch.delenv("DIVEKIT_MALLOC")
    if sys.platform.startswith("linux"):
        import platform

        assert configure_allocator() is (platform.libc_ver()[0] == "glibc")
    x = torch.randn(1 << 20)  # allocations still work afterwards
    assert torch.equal(x.clone(), x)


class CountingTask(ToyTask):
    """Counts its steps across epochs: state the Trainer must checkpoint and give back."""

    def __init__(self, bad: bool = False):
        super().__init__()
        self.count, self.bad, self.events = torch.zeros((), dtype=torch.long), bad, []

    def training_step(self, model, batch):
        self.count += 1
        return super().training_step(model, batch)

    def on_epoch_start(self, model, epoch):
        self.events.append(("epoch_start", epoch))

    def checkpoint_state(self):
        return object() if self.bad else {"count": self.count, "pair": (1, 2.5), "none": None}

    def restore_checkpoint_state(self, model, state):
        self.events.append(("restore", int(state["count"])))
        assert state["pair"] == (1, 2.5) and state["none"] is None
        self.count = state["count"].clone()


def test_task_state_rides_in_checkpoints_and_comes_back_before_the_next_epoch(tmp_path):
    cfg = TrainConfig(epochs=1, lr=0.1, quiet=True, device="cpu")
    Trainer(CountingTask(), cfg, tmp_path).fit()
    state = torch.load(CheckpointDir(tmp_path).latest() / "state.pt", weights_only=True)
    assert int(state["task_state"][0]["count"]) == 5  # one entry per rank; 96 samples / 20
    task = CountingTask()
    Trainer(task, TrainConfig(**{**cfg.to_dict(), "epochs": 2}), tmp_path).fit(resume=True)
    assert task.events == [("restore", 5), ("epoch_start", 2)] and int(task.count) == 10
    with pytest.raises(DivekitError, match=r"checkpoint_state\(\) holds a 'object' value"):
        Trainer(CountingTask(bad=True), cfg, tmp_path / "bad").fit()
