"""issue 25, item 10: ``metrics.csv`` listed ``train_loss, train_acc`` with one process and
``train_acc, train_loss`` with two (the all-reduce packed the sums in sorted order and gave
them back so). The header is now the task's order for every world size."""

from __future__ import annotations

import csv

import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine.config import TrainConfig
from divekit.engine.launch import spawn_local
from divekit.engine.task import Task
from divekit.engine.trainer import Trainer


class Ordered(Task):
    """Logs ``loss`` then ``acc`` (unsorted) from its training step."""

    def __init__(self):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(4, 2)

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=8, shuffle=False)

    def val_data(self):
        return None

    def training_step(self, model, batch):
        x, y = batch
        out = model(x)
        loss = F.cross_entropy(out, y)
        return loss, {"loss": loss.detach(), "acc": (out.argmax(1) == y).float().mean()}


def _header(run) -> list[str]:
    with open(run / "metrics.csv") as f:
        return next(csv.reader(f))


def _worker(rank: int, out: str) -> None:
    Trainer(Ordered(), TrainConfig(epochs=1, quiet=True, device="cpu"), out).fit()


def test_metrics_csv_has_one_column_order_for_one_and_two_processes(tmp_path):
    Trainer(Ordered(), TrainConfig(epochs=1, quiet=True, device="cpu"), tmp_path / "one").fit()
    spawn_local(_worker, 2, str(tmp_path / "two"))
    one, two = _header(tmp_path / "one"), _header(tmp_path / "two")
    assert one.index("train_loss") < one.index("train_acc")
    assert [c for c in one if c.startswith("train_")] == [c for c in two if c.startswith("train_")]
    assert one == [c for c in two if c in one]  # the two-process file only adds columns
