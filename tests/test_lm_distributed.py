"""Language models train data-parallel too: 2 processes with B rows each equal 1 process with
2B rows — with sequential sampling, where each process carries its own rows' hidden state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divekit.data.text import SeqDataLoader
from divekit.engine import Trainer
from divekit.engine.launch import spawn_local
from divekit.errors import DivekitError
from divekit.tasks import language_model as lm

SMALL = {"max_tokens": 2500, "num_steps": 10, "hidden": 12, "epochs": 2, "lr": 0.01,
         "quiet": True, "device": "cpu", "seed": 3, "val_fraction": 0.0}


def _config(batch_size: int, sampling: str) -> lm.Config:
    return lm.Config(model="gru", batch_size=batch_size, sampling=sampling, **SMALL)


def test_shards_split_every_global_batch_into_disjoint_rows():
    corpus = torch.arange(1000)
    whole = list(SeqDataLoader(corpus, 6, 7, "sequential", seed=1))
    parts = [list(SeqDataLoader(corpus, 3, 7, "sequential", seed=1).shard(r, 2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(DivekitError, match="corpus"):
        SeqDataLoader(torch.arange(100), 8, 7).shard(0, 2)


def _worker(rank: int, out: str) -> None:
    for sampling in ("sequential", "random"):
        cfg = _config(4, sampling)
        trainer = Trainer(lm.LanguageModelTask(cfg), cfg)
        history = trainer.fit()
        torch.save({"weights": trainer.model.state_dict(), "history": history},
                   Path(out) / f"{sampling}-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm-ddp")
    spawn_local(_worker, 2, str(out))
    return out


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_two_processes_equal_one_with_the_global_batch(two_process_runs, sampling):
    cfg = _config(8, sampling)
    single = Trainer(lm.LanguageModelTask(cfg), cfg)
    history = single.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for rank in (0, 1):
        run = torch.load(two_process_runs / f"{sampling}-rank{rank}.pt", weights_only=True)
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        assert run["history"][-1]["train_loss"] == pytest.approx(history[-1]["train_loss"], abs=1e-5)
