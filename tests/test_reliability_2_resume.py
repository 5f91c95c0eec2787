"""issue 25, item 3's leftovers.

* An epoch whose validation loss is NaN is never checkpointed (item 3); the mid-epoch
  checkpoints taken during that epoch (``--checkpoint-every``) were kept, and pruning them in
  had removed the last end-of-epoch one, so ``--resume`` called an unvalidated mid-epoch state
  of the diverged epoch "the last good checkpoint". Now they are removed, ``latest`` goes back
  to the newest end-of-epoch checkpoint, and pruning always keeps that one.
  (A mid-epoch checkpoint is never taken after a non-finite *training* loss: the step raises
  before the checkpoint callback runs.)
* ``--resume --force-resume --lr X`` loaded the optimizer and scheduler state of the run, whose
  learning rate silently won; now the new base lr is applied at the schedule's place.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.config import TaskConfig, TrainConfig
from divekit.engine.optim import lr_multiplier
from divekit.engine.trainer import Trainer
from divekit.errors import TrainingDiverged
from tensor_task import CrossEntropyTask


class Toy(CrossEntropyTask):
    """96 points, batch 20: five steps an epoch. From epoch ``blow_up_at`` on, validation sees
    the last layer scaled to 3e38 (finite weights, overflowing logits), as after a huge --lr."""

    def __init__(self, blow_up_at: int | None = None):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.blow_up_at, self.epoch = blow_up_at, 0
        self.per_batch, self.val_batch, self.shuffle_seed = 20, 48, 3

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def on_epoch_start(self, model, epoch):
        self.epoch = epoch

    def on_validation_start(self, model):
        if self.blow_up_at is not None and self.epoch >= self.blow_up_at:
            with torch.no_grad():
                w = model[-1].weight
                w.div_(w.abs().max()).mul_(3e38)


def _names(run) -> list[str]:
    root = run / "checkpoint"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_mid_epoch_checkpoints_of_a_diverged_epoch_are_not_the_last_good_one(tmp_path):
    cfg = TrainConfig(epochs=3, checkpoint_every=2, quiet=True, device="cpu")
    with pytest.raises(TrainingDiverged) as e:
        Trainer(Toy(blow_up_at=2), cfg, tmp_path).fit()
    msg = str(e.value)
    assert "\n" not in msg and "val_loss NaN at the end of epoch 2" in msg
    assert "the last good checkpoint (epoch-0001) is kept" in msg
    assert "1 mid-epoch checkpoint(s) of epoch 2 removed" in msg  # keep=2 pruned the other
    assert CheckpointDir(tmp_path).latest().name == "epoch-0001"
    assert not [n for n in _names(tmp_path) if n.startswith("epoch-0001-step-")]
    resumed = Trainer(Toy(), cfg, tmp_path)
    assert resumed.restore() and (resumed.epoch, resumed.step_in_epoch) == (1, 0)


def test_a_diverged_first_epoch_leaves_no_checkpoint_at_all(tmp_path):
    cfg = TrainConfig(epochs=2, checkpoint_every=2, quiet=True, device="cpu")
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        Trainer(Toy(blow_up_at=1), cfg, tmp_path).fit()
    assert CheckpointDir(tmp_path).latest() is None
    assert _names(tmp_path) == []


def test_pruning_always_keeps_the_newest_end_of_epoch_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    ckpt = CheckpointDir(tmp_path, keep=2)
    for name in ["epoch-0001", "epoch-0001-step-000002", "epoch-0001-step-000004",
                 "epoch-0001-step-000006"]:
        ckpt.save(model, {"epoch": 1}, name=name)
    assert _names(tmp_path) == ["epoch-0001", "epoch-0001-step-000006"]
    ckpt.save(model, {"epoch": 2}, name="epoch-0002")
    ckpt.save(model, {"epoch": 3}, name="epoch-0003")
    assert _names(tmp_path) == ["epoch-0002", "epoch-0003"]  # as before: the keep newest


def test_force_resume_lr_is_applied_at_the_schedules_place(tmp_path, caplog):
    """Epoch 1 at lr 0.1 under a cosine over 2 epochs (10 steps); a forced resume with --lr
    0.01 must train epoch 2 at 0.01 × the cosine at steps 5..9, as a torch LambdaLR built
    here with base 0.01 gives (the loaded state alone would keep 0.1)."""
    base = dict(epochs=2, scheduler="cosine", optimizer="sgd", quiet=True, device="cpu")
    Trainer(Toy(), TrainConfig(lr=0.1, **base), tmp_path).fit()
    (tmp_path / "checkpoint" / "latest").write_text("epoch-0001\n")  # resume after epoch 1
    seen: list[float] = []

    class Spy(Toy):
        def training_step(self, model, batch):
            seen.append(trainer.optimizer.param_groups[0]["lr"])
            return super().training_step(model, batch)

    cfg = TaskConfig(lr=0.01, resume=True, force_resume=True, **base)
    trainer = Trainer(Spy(), cfg, tmp_path)
    with caplog.at_level("WARNING", logger="divekit"):
        trainer.fit(resume=True)
    assert "learning rate 0.1 -> 0.01 from epoch-0001" in caplog.text
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier("cosine", s, 10))
    want = []
    for _ in range(10):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert seen == pytest.approx(want[5:], rel=1e-9)
    assert trainer.scheduler.base_lrs == [0.01]
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.01
    assert math.isclose(trainer.history[-1]["lr"], 0.01 * lr_multiplier("cosine", 10, 10),
                        abs_tol=1e-12)  # metrics.csv's lr column: the new base, after step 10


def test_a_resume_without_force_keeps_the_loaded_lr_untouched(tmp_path):
    base = dict(epochs=2, scheduler="cosine", optimizer="sgd", lr=0.1, quiet=True, device="cpu")
    Trainer(Toy(), TrainConfig(**base), tmp_path).fit()
    straight = Trainer(Toy(), TrainConfig(**{**base, "epochs": 2}), tmp_path / "other")
    straight.fit()
    resumed = Trainer(Toy(), TaskConfig(**{**base, "resume": True}), tmp_path)
    assert resumed.restore()
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_a_resume_that_extends_an_epoch_dependent_schedule_says_so(tmp_path, caplog):
    """issue 25, item 9: `train ... --epochs 2`, then `--resume --epochs 4` differs from 4
    epochs straight under a cosine planned for 2, and the resume printed nothing."""
    base = dict(scheduler="cosine", optimizer="sgd", lr=0.1, quiet=True, device="cpu")
    Trainer(Toy(), TrainConfig(epochs=2, **base), tmp_path).fit()
    with caplog.at_level("WARNING", logger="divekit"):
        Trainer(Toy(), TaskConfig(epochs=4, resume=True, **base), tmp_path).fit(resume=True)
    lines = [r.getMessage() for r in caplog.records if "schedule" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "the cosine learning-rate schedule was planned over 10 steps" in lines[0]
    assert "now planned over 20 from step 10" in lines[0] and "not bit-identical" in lines[0]


def test_a_resume_on_the_same_plan_or_without_a_schedule_says_nothing(tmp_path, caplog):
    for scheduler, first, then in [("cosine", 2, 2), ("none", 1, 3)]:
        run = tmp_path / scheduler
        base = dict(scheduler=scheduler, optimizer="sgd", lr=0.1, quiet=True, device="cpu")
        Trainer(Toy(), TrainConfig(epochs=first, **base), run).fit()
        if first == then:  # resume after epoch 1 of the same 2-epoch plan
            (run / "checkpoint" / "latest").write_text("epoch-0001\n")
        with caplog.at_level("WARNING", logger="divekit"):
            Trainer(Toy(), TaskConfig(epochs=then, resume=True, **base), run).fit(resume=True)
    assert not [r for r in caplog.records if "schedule" in r.getMessage()]
