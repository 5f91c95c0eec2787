"""``--strategy tensor``: attention and feed-forward layers split over 2 gloo processes train to
the weights of one process (plain torch training of the unsplit model, same batches) within
1e-5, on a Transformer encoder classifier, a tiny BERT and LeNet with channels_last on and off;
checkpoints are whole, so a run saved with 2 ranks resumes with 1 and the other way round; the
bytes counted per step equal the model of two all-reduces of the activations per block forward
and two backward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import Task, TrainConfig, Trainer
from divekit.errors import DivekitError
from shared_spawn import section_dir

N, BATCH, STEPS, WIDTH, BLOCKS = 40, 16, 6, 16, 2


class EncoderClassifier(nn.Module):
    """divekit's Transformer encoder (4 heads), mean-pooled over the valid positions, then a
    linear classifier. No attention biases: the key projection's bias has a zero gradient
    (softmax ignores a shift of every score), whose rounding noise Adam would amplify."""

    def __init__(self):
        super().__init__()
        from divekit.models.transformer import TransformerEncoder

        self.encoder = TransformerEncoder(20, WIDTH, 32, 4, BLOCKS, dropout=0.0)
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, tokens, valid_lens):
        h = self.encoder(tokens, valid_lens)  # (B, T, d)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        keep = (positions < valid_lens[:, None]).float()[..., None]
        return self.out((h * keep).sum(1) / keep.sum(1))


class TextTask(Task):
    """Fixed random token sequences (lengths 3-6) and labels; validation on the same data."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(5)
        self.x = torch.randint(0, 20, (N, STEPS), generator=g)
        self.lens = torch.randint(3, STEPS + 1, (N,), generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)
        self.fail_at, self.calls = fail_at, 0

    def build_model(self) -> nn.Module:
        return EncoderClassifier()

    def train_data(self):
        return TensorBatchLoader(self.x, self.lens, self.y, batch_size=BATCH, shuffle=True,
                                 seed=3)

    def val_data(self):
        return TensorBatchLoader(self.x, self.lens, self.y, batch_size=7)

    def logits(self, model, batch):
        x, lens, _ = batch
        return model(x, lens)

    def training_step(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        loss = F.cross_entropy(self.logits(model, batch), batch[-1])
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        return {"loss": F.cross_entropy(self.logits(model, batch), batch[-1], reduction="sum"),
                "count": len(batch[-1])}

    def validation_end(self, sums):
        return {"loss": float(sums["loss"]) / sums["count"]}


class BertTask(TextTask):
    """A tiny BERT (2 layers, 4 heads, width 16) trained on masked-token and next-sentence
    losses at once; the valid lengths pad the shorter sequences."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(fail_at)
        self.y = self.y % 2  # "is the next sentence": two classes

    def build_model(self) -> nn.Module:
        from divekit.models.bert import BertConfig, BertModel

        return BertModel(BertConfig(vocab_size=20, num_layers=BLOCKS, num_hiddens=WIDTH,
                                    num_heads=4, ffn_num_hiddens=32, max_len=8, dropout=0.0))

    def logits(self, model, batch):
        x, lens, _ = batch
        return model(x, None, lens)[2]

    def training_step(self, model, batch):
        self.calls += 1
        x, lens, y = batch
        positions = torch.stack([torch.zeros_like(lens), lens - 1], 1)  # (B, 2)
        _, mlm, nsp = model(x, None, lens, positions)
        target = torch.gather(x, 1, positions)
        loss = F.cross_entropy(nsp, y) + F.cross_entropy(mlm.reshape(-1, 20),
                                                              target.reshape(-1))
        return loss, {"loss": loss.detach()}


class LeNetTask(TextTask):
    """LeNet (its 400→120→84 head split, the convolutions replicated) on random 28×28 images."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(fail_at)
        g = torch.Generator().manual_seed(6)
        self.x = torch.randn(24, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (24,), generator=g)

    def build_model(self) -> nn.Module:
        from divekit.models.lenet import lenet

        return lenet()

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=8, shuffle=True, seed=3)

    def val_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=7)

    def logits(self, model, batch):
        return model(batch[0])


# name -> (task, channels_last, optimizer, grad_clip)
CASES = {
    "transformer": (TextTask, None, "adam", 0.5),
    "bert": (BertTask, None, "sgd", None),
    "lenet": (LeNetTask, False, "sgd", None),
    "lenet-cl": (LeNetTask, True, "sgd", 1.0),
}


def _config(name: str, strategy: str = "ddp", epochs: int = 1) -> TrainConfig:
    _, channels_last, optimizer, clip = CASES[name]
    return TrainConfig(epochs=epochs, lr=0.05 if optimizer == "sgd" else 0.01,
                       optimizer=optimizer, momentum=0.9, weight_decay=1e-3, scheduler="cosine",
                       strategy=strategy, quiet=True, device="cpu", seed=1,
                       channels_last=channels_last, grad_clip=clip)


def _worker(rank: int, out: str) -> None:
    from divekit.engine.tensor_parallel import activation_bytes_per_step

    out_dir = Path(out)
    for name, (task, *_rest) in CASES.items():
        trainer = Trainer(task(), _config(name, "tensor"))
        history = trainer.fit()
        torch.save({"weights": trainer.strategy.full_state_dict(), "history": history,
                    "local": {k: type(v).__name__ for k, v in trainer.model.state_dict().items()}},
                   out_dir / f"{name}-rank{rank}.pt")
    # a two-rank run stopped in its second epoch (the epoch-1 checkpoint written), and a
    # two-rank resume of a one-process run stopped alike (written by _prepare before)
    crashed = Trainer(TextTask(fail_at=4), _config("transformer", "tensor", 2), out_dir / "tp2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = Trainer(TextTask(), _config("transformer", "tensor", 2), out_dir / "tp1")
    resumed.fit(resume=True)
    torch.save(resumed.strategy.full_state_dict(), out_dir / f"resumed-rank{rank}.pt")
    # --profile-comm: the bytes this rank sent per step, against the model
    cfg = dataclasses.replace(_config("transformer", "tensor"), profile_comm=True, grad_clip=None)
    history = Trainer(TextTask(), cfg).fit()
    if rank == 0:
        # 40 samples in batches of 16, 16, 8; T = 6; every rank sends the same
        expected = sum(activation_bytes_per_step(b, STEPS, WIDTH, BLOCKS, 2)
                       for b in (16, 16, 8)) / 3
        torch.save((history[0]["comm_MB_per_step"] * 1e6, expected), out_dir / "count.pt")


def _prepare(out: Path) -> None:
    """Before the spawn, in one process: a run stopped in its second epoch (the epoch-1
    checkpoint written), which ``_worker`` resumes on two ranks."""
    one = Trainer(TextTask(fail_at=4), _config("transformer", epochs=2), out / "tp1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        one.fit()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Path:
    """``_prepare``'s and ``_worker``'s files, from the session's one 2-process spawn
    (tests/shared_spawn.py)."""
    return section_dir("tensor", request, tmp_path_factory)


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(runs, name):
    task = CASES[name][0]
    single = Trainer(task(), _config(name))
    history = single.fit()
    reference = single.model.state_dict()
    for rank in (0, 1):
        run = torch.load(runs / f"{name}-rank{rank}.pt", weights_only=True)
        _close(run["weights"], reference)
        row = run["history"][0]
        assert row["train_loss"] == pytest.approx(history[0]["train_loss"], abs=1e-5)
        assert row["val_loss"] == pytest.approx(history[0]["val_loss"], abs=1e-5)
        assert "DTensor" in run["local"].values()  # the model really was split
    torch.manual_seed(1)
    fresh = task().build_model().state_dict()
    assert any((fresh[k] - v).abs().max() > 1e-3 for k, v in reference.items())  # it trained


def test_checkpoints_resume_with_another_number_of_ranks(runs, tmp_path):
    straight = Trainer(TextTask(), _config("transformer", epochs=2))
    straight.fit()
    # saved with 2 ranks, resumed with 1
    resumed = Trainer(TextTask(), _config("transformer", epochs=2), runs / "tp2")
    resumed.fit(resume=True)
    _close(resumed.model.state_dict(), straight.model.state_dict())
    # saved with 1, resumed with 2
    for rank in (0, 1):
        _close(torch.load(runs / f"resumed-rank{rank}.pt", weights_only=True),
               straight.model.state_dict())


def test_bytes_per_step_equal_the_model(runs):
    measured, expected = torch.load(runs / "count.pt", weights_only=True)
    assert measured == pytest.approx(expected, rel=1e-6)


def test_plan_refuses_heads_that_do_not_divide():
    from divekit.engine.tensor_parallel import tensor_parallel_plan

    with pytest.raises(DivekitError, match="must divide the attention heads"):
        tensor_parallel_plan(EncoderClassifier(), 3)
    plan = tensor_parallel_plan(LeNetTask().build_model(), 2)
    assert sorted(plan.values()) == ["colwise", "rowwise"]  # 400→120 by columns, 120→84 by rows
    with pytest.raises(DivekitError, match="nothing to split"):
        tensor_parallel_plan(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), 2)


# ----------------------------------------------------------------- CUDA (nccl)
def _cuda_exact() -> None:
    """Full fp32 products (no TF32), so that GPU runs compare at 1e-5."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _one_rank_tensor(rank: int, port: int, out: str) -> None:
    """TensorParallelStrategy on a 1-rank nccl group (what one GPU can run): a CUDA device
    mesh, DTensor parameters, the optimizer guard, clipping and the whole-state round trip,
    against plain training of the same model."""
    import os

    import torch.distributed as dist

    from divekit.engine.distributed import DistEnv
    from divekit.engine.tensor_parallel import TensorParallelStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _cuda_exact()
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        results = {}
        for split in (False, True):
            torch.manual_seed(0)
            task = BertTask()
            model = task.build_model().cuda()
            strategy = TensorParallelStrategy(model, DistEnv(0, 1, 0)) if split else None
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
            for batch in task.train_data():
                batch = tuple(t.cuda() for t in batch)
                opt.zero_grad()
                task.training_step(model, batch)[0].backward()
                if strategy is not None:
                    strategy.clip_grad_norm_(0.5)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
            if strategy is None:
                results["plain"] = {k: v.cpu() for k, v in model.state_dict().items()}
                results["plain_opt"] = opt.state_dict()
                continue
            results["split"] = {k: v.cpu() for k, v in strategy.full_state_dict().items()}
            strategy.load_full_state_dict(results["plain"])
            strategy.load_optimizer_state_dict(opt, results["plain_opt"])
            results["reloaded"] = {k: v.cpu() for k, v in strategy.full_state_dict().items()}
        torch.save(results, Path(out) / "one_rank.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensor_strategy_on_one_gpu_matches_plain_training_and_round_trips(tmp_path):
    import torch.multiprocessing as mp

    from divekit.engine.launch import free_port

    mp.spawn(_one_rank_tensor, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    r = torch.load(tmp_path / "one_rank.pt", weights_only=True)
    _close(r["split"], r["plain"])
    _close(r["reloaded"], r["plain"])


def _cuda_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _cuda_exact()
    for name, (task, *_rest) in CASES.items():
        cfg = dataclasses.replace(_config(name, "tensor" if world > 1 else "ddp"), device="cuda")
        trainer = Trainer(task(), cfg)
        trainer.fit()
        whole = (trainer.strategy.full_state_dict() if world > 1
                 else trainer.model.state_dict())
        if rank == 0:
            torch.save({k: v.cpu() for k, v in whole.items()}, Path(out) / f"{name}.pt")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one GPU per process")
def test_two_gpus_equal_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    from divekit.engine.launch import free_port

    for world in (2, 1):
        (tmp_path / str(world)).mkdir()
        mp.spawn(_cuda_worker, args=(world, free_port(), str(tmp_path / str(world))),
                 nprocs=world, join=True)
    for name in CASES:
        _close(torch.load(tmp_path / "2" / f"{name}.pt", weights_only=True),
               torch.load(tmp_path / "1" / f"{name}.pt", weights_only=True))
