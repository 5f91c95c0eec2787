"""Data parallelism changes nothing but the speed: for a model without BatchNorm, one epoch with
2 processes (gloo, spawned here) and per-worker batch B gives the weights of 1 process with
batch 2B — for ddp, allreduce and ps, including an unevenly split and an empty last share, on an
MLP and on a convolutional model with channels_last on and off (channels_last parameters once
made the hand-written strategies diverge: their gradients came back contiguous, which the fused
optimizer read in the parameter's own order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Task, TrainConfig, Trainer
from divekit.engine.launch import spawn_local

STRATEGIES = ("ddp", "allreduce", "ps")
PER_WORKER = 8
# 75 = 4·16 + 11 → last global batch split 6/5; 49 = 3·16 + 1 → rank 1's last share is empty
SIZES = (75, 49)


class MLPTask(Task):
    """Softmax regression through one hidden layer on fixed random data (no BatchNorm); its
    validation set (the training data, 7 per batch) is split across the ranks and summed."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.per_batch = batch_size

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=self.per_batch, shuffle=True, seed=7)

    def val_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=7)

    def training_step(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def validation_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "count": len(y),
                "correct": [int(c) for c in (logits.argmax(1) == y)]}

    def validation_end(self, sums):
        return {"loss": float(sums["loss"]) / sums["count"],
                "acc": sum(sums["correct"]) / len(sums["correct"]), "seen": len(sums["correct"])}


class ConvTask(MLPTask):
    """The same job on 2×5×5 images through two convolutions (no BatchNorm)."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(n, batch_size)
        g = torch.Generator().manual_seed(n + 1)
        self.x = torch.randn(n, 2, 5, 5, generator=g)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))


# model name -> (task class, channels_last, dataset sizes)
MODELS = {"mlp": (MLPTask, None, SIZES), "conv": (ConvTask, False, SIZES[:1]),
          "conv-cl": (ConvTask, True, SIZES[:1])}
CASES = [(model, n) for model, (_, _, sizes) in MODELS.items() for n in sizes]


def _config(strategy: str = "ddp", channels_last: bool | None = None) -> TrainConfig:
    return TrainConfig(epochs=1, lr=0.2, momentum=0.9, weight_decay=1e-3, scheduler="cosine",
                       strategy=strategy, quiet=True, device="cpu", seed=1,
                       channels_last=channels_last)


def _worker(rank: int, out: str) -> None:
    for model, (task, channels_last, sizes) in MODELS.items():
        for n in sizes:
            for strategy in STRATEGIES:
                trainer = Trainer(task(n, PER_WORKER), _config(strategy, channels_last))
                history = trainer.fit()
                torch.save({"weights": trainer.model.state_dict(), "history": history},
                           Path(out) / f"{model}-{strategy}-{n}-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    spawn_local(_worker, 2, str(out))
    return out


@pytest.mark.parametrize(("model", "n"), CASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_workers_equal_one_process_with_the_global_batch(two_process_runs, strategy, n, model):
    task, channels_last, _ = MODELS[model]
    single = Trainer(task(n, 2 * PER_WORKER), _config(channels_last=channels_last))
    single_history = single.fit()
    reference = single.model.state_dict()
    for rank in (0, 1):
        run = torch.load(two_process_runs / f"{model}-{strategy}-{n}-rank{rank}.pt",
                         weights_only=True)
        for k, v in reference.items():
            torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        # metrics are reduced over the ranks: the global mean, as one process logs it
        row = run["history"][0]
        assert row["train_loss"] == pytest.approx(single_history[0]["train_loss"], abs=1e-5)
        assert row["train_acc"] == pytest.approx(single_history[0]["train_acc"], abs=1e-6)
        # validation: each rank's share of every batch, sums and lists joined over the ranks
        assert row["val_seen"] == n
        assert row["val_loss"] == pytest.approx(single_history[0]["val_loss"], abs=1e-5)
        assert row["val_acc"] == pytest.approx(single_history[0]["val_acc"], abs=1e-9)
    # the weights did move: the comparison is not between two untouched initialisations
    torch.manual_seed(1)
    fresh = task(n, 1).build_model()
    assert not torch.allclose(fresh[0].weight, reference["0.weight"], atol=1e-3)
