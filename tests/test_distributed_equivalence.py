"""Every strategy changes nothing but the speed: for a model without BatchNorm, one epoch with
2 processes (gloo, spawned by tests/shared_spawn.py) gives the weights and metrics of 1 process
with the global batch, for each of ddp, allreduce, ps, async (--staleness 0), pipeline, tensor
and fsdp, on an MLP, on a convolutional model with channels_last on and off, and on a
Transformer encoder classifier.
async with staleness 0 is moreover ps step for step: their weights agree within 1e-7.

The data-parallel strategies (ddp, allreduce, ps, async, fsdp) give each rank B of a global batch
of 2B; they also meet an unevenly split and an empty last share (the MLP's two sizes). The
model-parallel ones (pipeline, tensor) give every rank the whole batch of 2B and split the model.
(channels_last parameters once made the hand-written strategies diverge: their gradients came
back contiguous, which the fused optimizer read in the parameter's own order.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Task, TrainConfig, Trainer
from divekit.engine.strategies import STRATEGIES
from divekit.models.transformer import TransformerEncoder
from shared_spawn import section_dir

MODEL_PARALLEL = ("pipeline", "tensor")  # every rank sees the whole batch
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
        x, y = self.pipeline_split(batch)
        return self.pipeline_loss(model(x), y)

    def pipeline_split(self, batch):
        return batch

    def pipeline_loss(self, logits, y):
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

    def build_model(self) -> nn.Module:  # (two linear layers: what --strategy tensor splits)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(36, 16), nn.Tanh(),
                             nn.Linear(16, 3))


class MeanOverTime(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class TransformerTask(MLPTask):
    """The same job on sequences of 7 tokens (of 11) through divekit's Transformer encoder
    (2 blocks, 16 wide, 2 heads, no dropout), averaged over time."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(n, batch_size)
        g = torch.Generator().manual_seed(n + 2)
        self.x = torch.randint(0, 11, (n, 7), generator=g)

    def build_model(self) -> nn.Module:
        return nn.Sequential(TransformerEncoder(11, 16, 32, 2, num_blks=2, dropout=0.0),
                             MeanOverTime(), nn.Linear(16, 3))


# model name -> (task class, channels_last, dataset sizes)
MODELS = {"mlp": (MLPTask, None, SIZES), "conv": (ConvTask, False, SIZES[:1]),
          "conv-cl": (ConvTask, True, SIZES[:1]), "transformer": (TransformerTask, None, SIZES[:1])}


def _sizes(model: str, strategy: str) -> tuple[int, ...]:
    """Uneven and empty shares only mean something where the data is shared out."""
    return MODELS[model][2][:1] if strategy in MODEL_PARALLEL else MODELS[model][2]


CASES = [(strategy, model, n) for strategy in STRATEGIES for model in MODELS
         for n in _sizes(model, strategy)]


def _config(strategy: str = "ddp", channels_last: bool | None = None) -> TrainConfig:
    return TrainConfig(epochs=1, lr=0.2, momentum=0.9, weight_decay=1e-3, scheduler="cosine",
                       strategy=strategy, quiet=True, device="cpu", seed=1,
                       channels_last=channels_last, staleness=0 if strategy == "async" else None)


def _worker(rank: int, out: str) -> None:
    for strategy, model, n in CASES:
        task, channels_last, _ = MODELS[model]
        per_rank = 2 * PER_WORKER if strategy in MODEL_PARALLEL else PER_WORKER
        trainer = Trainer(task(n, per_rank), _config(strategy, channels_last))
        history = trainer.fit()
        # the whole model (gathered by the strategies that split it; rank 0's is complete)
        weights = {k: v.detach().cpu().clone() for k, v in trainer.strategy.full_state_dict().items()}
        torch.save({"weights": weights, "history": history},
                   Path(out) / f"{model}-{strategy}-{n}-rank{rank}.pt")


_SINGLE: dict[tuple[str, int], tuple[dict, list]] = {}


def _single(model: str, n: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One process with the global batch (trained once per model and size)."""
    if (model, n) not in _SINGLE:
        task, channels_last, _ = MODELS[model]
        single = Trainer(task(n, 2 * PER_WORKER), _config(channels_last=channels_last))
        history = single.fit()
        _SINGLE[model, n] = ({k: v.clone() for k, v in single.model.state_dict().items()},
                             history)
    return _SINGLE[model, n]


@pytest.fixture(scope="module")
def two_process_runs(request, tmp_path_factory) -> Path:
    """``_worker``'s files, from the session's one 2-process spawn (tests/shared_spawn.py)."""
    return section_dir("equivalence", request, tmp_path_factory)


@pytest.mark.parametrize(("strategy", "model", "n"), CASES)
def test_two_workers_equal_one_process_with_the_global_batch(two_process_runs, strategy, model, n):
    reference, single_history = _single(model, n)
    # a strategy that splits the model gathers it whole on rank 0; the others hold it everywhere
    ranks = (0,) if strategy in ("pipeline", "tensor", "fsdp") else (0, 1)
    for rank in (0, 1):
        run = torch.load(two_process_runs / f"{model}-{strategy}-{n}-rank{rank}.pt",
                         weights_only=True)
        if rank in ranks:
            assert run["weights"].keys() == reference.keys()
            for k, v in reference.items():
                torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        if strategy == "async":  # K = 0: the synchronous parameter server, step for step
            ps = torch.load(two_process_runs / f"{model}-ps-{n}-rank{rank}.pt",
                            weights_only=True)["weights"]
            assert run["weights"].keys() == ps.keys()
            for k, v in ps.items():
                torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-7, msg=k)
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
    fresh = MODELS[model][0](n, 1).build_model().state_dict()
    assert any(not torch.allclose(fresh[k], reference[k], atol=1e-3) for k in reference)
