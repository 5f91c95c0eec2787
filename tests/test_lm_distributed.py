"""Language models train data-parallel too: 2 processes with B rows each equal 1 process with
2B rows — with sequential sampling, where each process carries its own rows' hidden state, and
a mid-epoch checkpoint gives each process its own rows' state back; rank 0 validates alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divekit.data.text import SeqDataLoader
from divekit.engine import Trainer
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.run import make_config
from divekit.engine.trainer import run_validation
from divekit.errors import DivekitError
from divekit.tasks.language_model import LanguageModelTask, LMConfig
from shared_spawn import section_dir

SMALL = {"max_tokens": 2500, "num_steps": 10, "num_hiddens": 12, "epochs": 2, "lr": 0.01,
         "quiet": True, "device": "cpu", "seed": 3, "val_fraction": 0.1}


def _config(batch_size: int, sampling: str, **extra) -> LMConfig:
    return make_config(LMConfig, {"model": "gru", "batch_size": batch_size, "sampling": sampling,
                                  **SMALL, **extra})


def test_shards_split_every_global_batch_into_disjoint_rows():
    corpus = torch.arange(1000)
    whole = list(SeqDataLoader(corpus, 6, 7, "sequential", seed=1))
    parts = [list(SeqDataLoader(corpus, 3, 7, "sequential", seed=1).shard(r, 2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(DivekitError, match="corpus"):
        SeqDataLoader(torch.arange(100), 8, 7).shard(0, 2)


class _CrashingLM(LanguageModelTask):
    def __init__(self, cfg, fail_at=None):
        super().__init__(cfg)
        self.fail_at, self.calls = fail_at, 0

    def training_step(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:  # every rank at the same step, outside any collective
            raise RuntimeError("simulated crash")
        return super().training_step(model, batch)


def _resume_mid_epoch(rank: int, out: Path) -> None:
    """Straight, and crashed in epoch 2 then resumed from its mid-epoch checkpoint."""
    cfg = _config(4, "sequential", checkpoint_every=4, max_tokens=1200,
                  val_fraction=0.0)  # 14 steps per epoch
    straight = Trainer(_CrashingLM(cfg), cfg, out / "straight")
    straight.fit()
    crashed = Trainer(_CrashingLM(cfg, fail_at=straight.steps_per_epoch + 7), cfg, out / "crashed")
    try:
        crashed.fit()
    except RuntimeError:
        pass
    resumed = Trainer(_CrashingLM(cfg), cfg, out / "crashed")
    resumed.fit(resume=True)
    torch.save({"straight": straight.model.state_dict(), "resumed": resumed.model.state_dict()},
               out / f"resume-rank{rank}.pt")


def _worker(rank: int, out: str) -> None:
    for sampling in ("sequential", "random"):
        cfg = _config(4, sampling)
        trainer = Trainer(LanguageModelTask(cfg), cfg)
        history = trainer.fit()
        torch.save({"weights": trainer.model.state_dict(), "history": history},
                   Path(out) / f"{sampling}-rank{rank}.pt")
    _resume_mid_epoch(rank, Path(out))


@pytest.fixture(scope="module")
def two_process_runs(request, tmp_path_factory) -> Path:
    """``_worker``'s files, from the session's one 2-process spawn (tests/shared_spawn.py)."""
    return section_dir("lm", request, tmp_path_factory)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_two_processes_equal_one_with_the_global_batch(two_process_runs, sampling):
    cfg = _config(8, sampling)
    single = Trainer(LanguageModelTask(cfg), cfg)
    history = single.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    task = LanguageModelTask(_config(4, sampling))
    per_worker = run_validation(task, single.model, task.val_data(), torch.device("cpu"))
    for rank in (0, 1):
        run = torch.load(two_process_runs / f"{sampling}-rank{rank}.pt", weights_only=True)
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        assert run["history"][-1]["train_loss"] == pytest.approx(history[-1]["train_loss"], abs=1e-5)
        # rank 0 validates the whole held-out tail, as one process with its --batch-size would,
        # and shares the result with the others
        assert run["history"][-1]["val_loss"] == pytest.approx(per_worker["loss"], abs=1e-5)


def test_two_process_mid_epoch_resume_is_bit_identical(two_process_runs):
    # a mid-epoch checkpoint of epoch 2 holds both ranks' rows' states, in rank order
    mid = sorted((two_process_runs / "crashed" / "checkpoint").glob("epoch-0001-step-*"))
    assert mid, "no mid-epoch checkpoint was kept"
    saved = torch.load(mid[-1] / "state.pt", weights_only=True)["task_state"]
    assert [s["hidden"].shape for s in saved] == [torch.Size([1, 4, 12])] * 2
    assert not torch.equal(saved[0]["hidden"], saved[1]["hidden"])
    assert CheckpointDir(two_process_runs / "crashed").latest().name == "epoch-0002"
    for rank in (0, 1):
        run = torch.load(two_process_runs / f"resume-rank{rank}.pt", weights_only=True)
        for k, v in run["straight"].items():
            assert torch.equal(run["resumed"][k], v), (rank, k)
