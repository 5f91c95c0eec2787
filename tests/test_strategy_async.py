"""``--strategy async``: asynchronous SGD on a parameter server with the SSP bound ``--staleness``.

* K = 0 is the synchronous parameter server step for step: 2 processes equal ``ps`` (within
  1e-7) and one process with the global batch, on an MLP (an uneven and an empty last share), a
  convolutional model with channels_last on and off and a Transformer: tested with every other
  strategy in tests/test_distributed_equivalence.py;
* with K = 1 and a straggler (one rank sleeps after each step) the fast worker runs ahead of
  the slow one by one step, never more; unbounded, it runs further; the loss still falls;
* a run resumed from its epoch checkpoint (the server's optimizer state included) ends where
  the uninterrupted run ends.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from divekit.engine import TrainConfig, Trainer
from divekit.engine.callbacks import Callback
from divekit.engine.launch import spawn_local
from shared_spawn import section_dir
from tensor_task import CrossEntropyTask

PER_WORKER = 8


class TeacherTask(CrossEntropyTask):
    """Labels of a fixed random linear teacher on random inputs (learnable, no BatchNorm)."""

    def __init__(self, n: int, batch_size: int, conv: bool = False):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(n)
        self.conv = conv
        self.x = torch.randn(n, 2, 5, 5, generator=g) if conv else torch.randn(n, 6, generator=g)
        teacher = torch.randn(self.x[0].numel(), 3, generator=g)
        self.y = (self.x.reshape(n, -1) @ teacher).argmax(1)
        self.per_batch = batch_size

    def build_model(self) -> nn.Module:
        if self.conv:
            return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                 nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))



class Straggler(Callback):
    """Rank ``rank`` sleeps ``seconds`` after every step: a worker slower than the others."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds

    def on_train_batch_end(self, trainer, index, logs) -> None:
        if trainer.env.rank == self.rank:
            time.sleep(self.seconds)


class UnevenLoader:
    """Rank ``r`` of ``W`` gets ``5 - 2r`` batches of 8 an epoch: unequal step counts, which
    divekit's own loaders never give (each walks the same global batches) but a user's may."""

    def __init__(self, x, y):
        self.x, self.y, self.rank, self.world = x, y, 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world = rank, world_size

    def __len__(self) -> int:
        return 5 - 2 * self.rank

    def global_batch_size(self, index: int) -> int:
        return 8 * self.world

    def __iter__(self):
        for b in range(len(self)):
            rows = slice(8 * (2 * b + self.rank), 8 * (2 * b + self.rank + 1))
            yield self.x[rows], self.y[rows]


class UnevenTask(TeacherTask):
    def train_data(self):
        return UnevenLoader(self.x, self.y)


def _config(strategy: str, staleness: int | None = None, channels_last: bool | None = None,
            epochs: int = 1, scheduler: str = "cosine") -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.2, momentum=0.9, weight_decay=1e-3,
                       scheduler=scheduler, strategy=strategy, staleness=staleness, quiet=True,
                       device="cpu", seed=1, channels_last=channels_last)


def _worker(rank: int, out: str) -> None:
    out_dir = Path(out)
    # a straggler: rank 1 sleeps after each step; bounded (K = 1) and unbounded
    for k in (1, None):
        trainer = Trainer(TeacherTask(160, PER_WORKER), _config("async", k, epochs=3),
                          callbacks=[Straggler(1, 0.02)])
        history = trainer.fit()
        if rank == 0:
            torch.save({"leads": dict(trainer.strategy.leads), "history": history},
                       out_dir / f"straggler-{k}.pt")
    # resume: 1 epoch, then a new Trainer continues to 2 from the checkpoint
    for k in (0, 1):
        whole = Trainer(TeacherTask(75, PER_WORKER),
                        _config("async", k, epochs=2, scheduler="none"))
        whole.fit()
        run_dir = out_dir / f"run-{k}"
        Trainer(TeacherTask(75, PER_WORKER), _config("async", k, epochs=1, scheduler="none"),
                run_dir=run_dir).fit()
        resumed = Trainer(TeacherTask(75, PER_WORKER),
                          _config("async", k, epochs=2, scheduler="none"), run_dir=run_dir)
        history = resumed.fit(resume=True)
        torch.save({"whole": whole.model.state_dict(), "resumed": resumed.model.state_dict(),
                    "history": history}, out_dir / f"resume-{k}-rank{rank}.pt")
    # ranks with unequal step counts: no deadlock, whatever K
    for k in (0, 1, None):
        trainer = Trainer(UnevenTask(80, PER_WORKER), _config("async", k, epochs=2))
        history = trainer.fit()
        torch.save({"weights": trainer.model.state_dict(), "history": history},
                   out_dir / f"uneven-{k}-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Path:
    """``_worker``'s files, from the session's one 2-process spawn (tests/shared_spawn.py)."""
    return section_dir("async", request, tmp_path_factory)


def test_a_fast_worker_runs_ahead_by_at_most_k(runs):
    bounded = torch.load(runs / "straggler-1.pt", weights_only=False)
    leads = {lead: count for (rank, lead), count in bounded["leads"].items() if rank == 0}
    assert max(leads) == 1  # ahead, but never by more than K
    assert leads[1] > sum(leads.values()) / 2  # most of the time: the straggler sets the pace
    losses = [row["train_loss"] for row in bounded["history"]]
    assert losses[-1] < losses[0]
    assert bounded["history"][-1]["val_loss"] < bounded["history"][0]["val_loss"]
    unbounded = torch.load(runs / "straggler-None.pt", weights_only=False)
    assert max(lead for (rank, lead) in unbounded["leads"] if rank == 0) > 1


@pytest.mark.parametrize("k", [0, 1])
def test_resume_from_a_checkpoint(runs, k):
    for rank in (0, 1):
        run = torch.load(runs / f"resume-{k}-rank{rank}.pt", weights_only=True)
        assert [row["epoch"] for row in run["history"]] == [1, 2]
        for name, v in run["whole"].items():
            assert torch.isfinite(run["resumed"][name]).all()
            if k == 0:  # deterministic: the server's momentum came back with the weights
                torch.testing.assert_close(run["resumed"][name], v, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("k", [0, 1, None])
def test_unequal_step_counts_end_without_deadlock(runs, k):
    ranks = [torch.load(runs / f"uneven-{k}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(run["history"]) for run in ranks] == [2, 2]
    for name, v in ranks[0]["weights"].items():  # both hold the server's final weights
        assert torch.isfinite(v).all()
        torch.testing.assert_close(ranks[1]["weights"][name], v, rtol=0, atol=0, msg=name)


def _cuda_worker(rank: int, out: str) -> None:
    for k in (0, 1):
        cfg = TrainConfig(epochs=2, lr=0.2, momentum=0.9, strategy="async", staleness=k,
                          quiet=True, device="cuda", seed=1)
        trainer = Trainer(TeacherTask(75, PER_WORKER), cfg, callbacks=[Straggler(1, 0.01)])
        history = trainer.fit()
        torch.save({"weights": {n: v.cpu() for n, v in trainer.model.state_dict().items()},
                    "history": history, "device": str(next(trainer.model.parameters()).device)},
                   Path(out) / f"cuda-{k}-rank{rank}.pt")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_server_updates_on_the_gpu(tmp_path):
    """Both workers on the GPU(s) (a gloo default group, so one GPU is enough): the master
    weights and their updates live on the GPU, the server's messages go through CPU tensors;
    K = 0 equals one process on the GPU and K = 1 trains."""
    spawn_local(_cuda_worker, 2, str(tmp_path))
    single = Trainer(TeacherTask(75, 2 * PER_WORKER),
                     TrainConfig(epochs=2, lr=0.2, momentum=0.9, quiet=True, device="cuda",
                                 seed=1))
    single.fit()
    for rank in (0, 1):
        exact = torch.load(tmp_path / f"cuda-0-rank{rank}.pt", weights_only=True)
        assert exact["device"].startswith("cuda")
        for name, v in single.model.state_dict().items():
            torch.testing.assert_close(exact["weights"][name], v.cpu(), rtol=0, atol=1e-5,
                                       msg=name)
        stale = torch.load(tmp_path / f"cuda-1-rank{rank}.pt", weights_only=True)
        assert stale["history"][-1]["train_loss"] < stale["history"][0]["train_loss"]
