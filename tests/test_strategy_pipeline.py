"""Pipeline model parallelism changes nothing but where the layers run: two stages on two gloo
processes (spawned by tests/shared_spawn.py), the batch cut into microbatches (unevenly, with a
last batch that needs padding), give the per-step losses and the weights of plain one-process
training, for a convolutional model (channels_last on and off) and a small Transformer, under
GPipe and 1F1B; gradient clipping spans both stages. A run checkpointed by the pipeline resumes
on one process where the uninterrupted pipeline run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Task, TrainConfig, Trainer
from divekit.engine.callbacks import Callback
from divekit.engine.pipeline import balance, model_pieces, split_model
from divekit.errors import DivekitError
from divekit.models.bert import BertConfig, BertEncoder
from divekit.models.transformer import TransformerEncoder
from shared_spawn import section_dir

N, BATCH, MICRO = 45, 16, 3  # batches 16, 16, 13: microbatches 6+6+4 (2 padding rows), 5+5+3


class ConvTask(Task):
    """Cross-entropy on fixed random 2×8×8 images through two convolutions (no BatchNorm)."""

    def __init__(self, n: int = N):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(n)
        self.x = self.inputs(n, g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def inputs(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 2, 8, 8, generator=g)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(24, 16),
                             nn.ReLU(), nn.Linear(16, 3))

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=BATCH, shuffle=True, seed=3)

    def val_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=20)

    def training_step(self, model, batch):
        inputs, y = self.pipeline_split(batch)
        return self.pipeline_loss(model(*inputs), y)

    def pipeline_split(self, batch):
        x, y = batch
        return (x,), y

    def pipeline_loss(self, logits, y):
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def validation_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "count": len(y),
                "correct": (logits.argmax(1) == y).sum()}


class MeanOverTime(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class TransformerTask(ConvTask):
    """Classify random token sequences with two Transformer encoder blocks (no dropout)."""

    def inputs(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 11, (n, 7), generator=g)

    def build_model(self) -> nn.Module:
        encoder = TransformerEncoder(11, 16, 32, 2, num_blks=3, dropout=0.0)
        return nn.Sequential(encoder, MeanOverTime(), nn.Linear(16, 3))


class FirstToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class BertTask(TransformerTask):
    """The same job through a two-layer BERT encoder (token, segment and position embeddings,
    embedding LayerNorm; no dropout), read at the first position."""

    def build_model(self) -> nn.Module:
        config = BertConfig(vocab_size=11, num_layers=2, num_hiddens=16, num_heads=2,
                            ffn_num_hiddens=32, max_len=8, dropout=0.0)
        encoder = BertEncoder(config)
        nn.init.normal_(encoder.pos_embedding, std=0.02)  # BertModel's init; bare it is empty
        return nn.Sequential(encoder, FirstToken(), nn.Linear(16, 3))


class DropoutButFirst(nn.Module):
    """Dropout on every feature but the first, which passes unchanged."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], self.dropout(x[:, 1:])], dim=1)


class LinearButFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], self.linear(x[:, 1:])], dim=1)


class RandomSplitTask(ConvTask):
    """A random draw in ``pipeline_split`` (as augmentation or mixup makes) goes into the inputs
    (feature 0) and the targets; only stage 0 has dropout, so the stages' generators part ways
    unless the strategy realigns them. The last stage logs whether they agree."""

    def inputs(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, 6, generator=g)

    def build_model(self) -> nn.Module:
        keep_first = nn.Linear(6, 6, bias=False)
        keep_first.weight.requires_grad_(False)
        nn.init.eye_(keep_first.weight)
        return nn.Sequential(DropoutButFirst(), keep_first, LinearButFirst())

    def pipeline_split(self, batch):
        x, y = batch
        noise = torch.rand(len(x))
        return (torch.cat([noise[:, None], x[:, 1:]], dim=1),), (y, noise)

    def pipeline_loss(self, output, targets):
        y, noise = targets
        loss = F.cross_entropy(output[:, 1:], y)
        return loss, {"loss": loss.detach(), "agree": (output[:, 0] == noise).float().mean()}


class StepLosses(Callback):
    def __init__(self):
        self.losses: list[float] = []
        self.flags: list[float] = []

    def on_train_batch_end(self, trainer, index, logs):
        self.losses.append(float(logs["loss"]))
        if "agree" in logs:
            self.flags.append(float(logs["agree"]))


# name -> (task class, channels_last, schedules)
SCHEDULES = ("gpipe", "1f1b")
MODELS = {"conv": (ConvTask, False, SCHEDULES), "conv-cl": (ConvTask, True, SCHEDULES),
          "transformer": (TransformerTask, None, SCHEDULES), "bert": (BertTask, None, ("1f1b",))}
CASES = [(model, schedule) for model, (_, _, schedules) in MODELS.items()
         for schedule in schedules]


def _config(strategy: str = "ddp", schedule: str = "gpipe",
            channels_last: bool | None = None, epochs: int = 2) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=1e-3, grad_clip=0.25,
                       strategy=strategy, quiet=True, device="cpu", seed=1,
                       channels_last=channels_last,
                       **({"microbatches": MICRO, "pipeline_schedule": schedule}
                          if strategy == "pipeline" else {}))  # refused with another strategy


def _train(task: Task, config: TrainConfig, run_dir: Path | None = None,
           resume: bool = False) -> tuple[Trainer, list[float]]:
    losses = StepLosses()
    trainer = Trainer(task, config, run_dir, callbacks=[losses])
    trainer.fit(resume=resume)
    return trainer, losses.losses


def _worker(rank: int, out: str) -> None:
    for model, (task, channels_last, schedules) in MODELS.items():
        for schedule in schedules:
            trainer, losses = _train(task(), _config("pipeline", schedule, channels_last))
            torch.save({"weights": trainer.model.state_dict(), "losses": losses,
                        "history": trainer.history},
                       Path(out) / f"{model}-{schedule}-rank{rank}.pt")
    agree = StepLosses()
    agree_trainer = Trainer(RandomSplitTask(), _config("pipeline", "gpipe"), callbacks=[agree])
    agree_trainer.fit()
    if rank == 1:  # the last stage logs the agreement of every step
        flags = [float(f) for f in agree.flags]
        torch.save(flags, Path(out) / "agree.pt")
    # checkpoints: the pipeline writes the whole model and optimizer; one epoch, then a second
    run = Path(out) / "run"
    _train(ConvTask(), _config("pipeline", "1f1b", epochs=1), run)


@pytest.fixture(scope="module")
def pipeline_runs(request, tmp_path_factory) -> Path:
    """``_worker``'s files, from the session's one 2-process spawn (tests/shared_spawn.py)."""
    return section_dir("pipeline", request, tmp_path_factory)


@pytest.mark.parametrize(("model", "schedule"), CASES)
def test_two_stages_equal_one_process(pipeline_runs, model, schedule):
    task, channels_last, _ = MODELS[model]
    single, single_losses = _train(task(), _config(channels_last=channels_last))
    reference = single.model.state_dict()
    assert len(single_losses) == 6
    for rank in (0, 1):
        run = torch.load(pipeline_runs / f"{model}-{schedule}-rank{rank}.pt", weights_only=True)
        assert run["losses"] == pytest.approx(single_losses, abs=1e-5)
        for k, v in reference.items():  # the whole model on every rank after the last epoch
            torch.testing.assert_close(run["weights"][k], v, rtol=0, atol=1e-5, msg=k)
        for got, want in zip(run["history"], single.history):
            for key in ("train_loss", "train_acc", "val_loss", "val_correct"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
    torch.manual_seed(1)  # the weights moved: not two untouched initialisations compared
    fresh = task().build_model().state_dict()
    assert max((fresh[k] - v).abs().max() for k, v in reference.items()) > 1e-2


def test_random_draws_of_the_split_agree_on_every_stage(pipeline_runs):
    flags = torch.load(pipeline_runs / "agree.pt")
    assert len(flags) == 6 and all(f == 1.0 for f in flags), flags


def test_a_pipeline_checkpoint_resumes_on_one_process(pipeline_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline_runs / "run", run)
    resumed, _ = _train(ConvTask(), _config(epochs=2), run, resume=True)
    # the pipeline's epoch 1 (whole model and momentum gathered), then epoch 2 on one process,
    # equals two epochs on one process
    single, _ = _train(ConvTask(), _config(epochs=2))
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)


def test_stages_are_balanced_and_cover_the_model():
    assert balance([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance([10, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert balance([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [(0, 5), (5, 7), (7, 9)]
    model = TransformerTask(4).build_model()
    assert len(model_pieces(model)) == 6  # embedding, 3 blocks, pooling, linear
    chains = split_model(model, 2)
    owned = [{id(p) for p in c.parameters()} for c in chains]
    assert not owned[0] & owned[1]
    assert {id(p) for p in model.parameters()} == owned[0] | owned[1]
    x = torch.randint(0, 11, (5, 7))
    torch.testing.assert_close(chains[1](chains[0](x)), model(x))
    with pytest.raises(DivekitError, match="fewer than the 9 stages"):
        split_model(model, 9)
    with pytest.raises(DivekitError, match="not a chain of layers"):
        split_model(nn.Bilinear(2, 2, 2), 2)
    bert = BertTask(4).build_model()
    chains = split_model(bert, 3)
    owned = [{id(p) for p in c.parameters()} for c in chains]
    assert sum(map(len, owned)) == len(list(bert.parameters()))  # each in exactly one stage
    assert chains[2](chains[1](chains[0](x))).shape == (5, 3)
    torch.testing.assert_close(chains[2](chains[1](chains[0](x))), bert(x))


def test_tied_weights_across_stages_are_refused():
    embedding = nn.Embedding(11, 16)
    head = nn.Linear(16, 11, bias=False)
    head.weight = embedding.weight
    with pytest.raises(DivekitError, match="shared by stages 0 and 1"):
        split_model(nn.Sequential(embedding, nn.Tanh(), nn.Tanh(), head), 2)


def test_a_task_without_the_hooks_cannot_be_pipelined():
    with pytest.raises(DivekitError, match="cannot be pipelined"):
        Task(TrainConfig()).pipeline_split((torch.zeros(1), torch.zeros(1)))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one per stage)")
def test_two_stages_on_two_gpus_equal_one_gpu(tmp_path):
    """`divekit train --nproc 2 --device cuda --strategy pipeline` (nccl) against one GPU:
    LeNet (no BatchNorm), channels_last, 1F1B; the metrics agree (GPU sums are not bitwise
    reproducible, hence 1e-4)."""
    import csv

    from divekit.cli import main

    common = ["lenet", "--data", "digits", "--limit", "512", "--epochs", "2", "--seed", "0",
              "--device", "cuda", "--channels-last", "--quiet", "--batch-size", "64"]
    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["train", *common, "--nproc", "2", "--strategy", "pipeline",
                 "--pipeline-schedule", "1f1b", "--microbatches", "4",
                 "--out", str(tmp_path / "pp")]) == 0
    rows = {}
    for name in ("one", "pp"):
        with open(tmp_path / name / "metrics.csv") as f:
            rows[name] = list(csv.DictReader(f))
    for a, b in zip(rows["one"], rows["pp"], strict=True):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=1e-4), key
