"""``--strategy fsdp`` (FSDP2 ``fully_shard`` on gloo) changes nothing but where the numbers
live: 2 processes with per-worker batch B end with the weights of plain one-process training
with batch 2B — on a convolutional model without BatchNorm (channels_last on and off) and on a
tiny BERT, with SGD and with Adam, with and without gradient clipping — while each rank holds about half of the
parameters, gradients and optimizer state. Checkpoints are whole: a run saved with 2 ranks
resumes with 1 process, and one saved by 1 process resumes with 2, ending where one
uninterrupted process ends."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.data.loader import TensorBatchLoader
from divekit.engine import TrainConfig, Trainer
from divekit.models.bert import BertConfig, BertModel
from shared_spawn import section_dir
from tensor_task import CrossEntropyTask

pytest.importorskip("torch.distributed.checkpoint.state_dict")

PER_WORKER = 8
N = 75  # 4·16 + 11: the last global batch splits 6/5


class ConvTask(CrossEntropyTask):
    """Softmax regression through two convolutions (no BatchNorm) on fixed random 2×6×6
    images; validation on the same data, split over the ranks and summed."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 2, 6, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.per_batch = batch_size

    def build_model(self) -> nn.Module:
        # 5 output channels: a weight of 5 rows splits unevenly (3 + 2) over 2 ranks
        return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))



class WholeValidationTask(ConvTask):
    """Validation data that cannot be split over the ranks (a plain list of batches): rank 0
    validates alone while the others wait, which FSDP's collective forward pass would hang on
    had the strategy not gathered a whole replica for validation."""

    def val_data(self):
        return list(super().val_data())


BERT = BertConfig(vocab_size=40, num_layers=2, num_hiddens=16, num_heads=2, ffn_num_hiddens=24,
                  max_len=12, dropout=0.0)


class BertTask(ConvTask):
    """A tiny BERT's two pretraining losses (masked tokens and next sentence) on random
    sequences; dropout is off, so the ranks' forward passes are deterministic."""

    def __init__(self, n: int, batch_size: int):
        super().__init__(n, batch_size)
        g = torch.Generator().manual_seed(n + 1)
        self.tokens = torch.randint(0, BERT.vocab_size, (n, 10), generator=g)
        self.segments = (torch.arange(10) >= 5).long().expand(n, 10).clone()
        self.positions = torch.randint(0, 10, (n, 3), generator=g)
        self.targets = torch.randint(0, BERT.vocab_size, (n, 3), generator=g)
        self.valid = torch.randint(6, 11, (n,), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = self.tokens  # the loaders below carry every field

    def build_model(self) -> nn.Module:
        return BertModel(BERT)

    def train_data(self):
        return TensorBatchLoader(self.tokens, self.segments, self.valid, self.positions,
                                 self.targets, self.y, batch_size=self.per_batch, shuffle=True,
                                 seed=7)

    def val_data(self):
        return TensorBatchLoader(self.tokens, self.segments, self.valid, self.positions,
                                 self.targets, self.y, batch_size=7)

    def _losses(self, model, batch):
        tokens, segments, valid, positions, targets, y = batch
        _, mlm, nsp = model(tokens, segments, valid, positions)
        mlm_loss = F.cross_entropy(mlm.reshape(-1, BERT.vocab_size), targets.reshape(-1),
                                   reduction="none").view(len(y), -1).mean(1)
        return mlm_loss + F.cross_entropy(nsp, y, reduction="none")

    def training_step(self, model, batch):
        loss = self._losses(model, batch).mean()
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        return {"loss": self._losses(model, batch).sum(), "count": len(batch[0])}


# case -> (task class, channels_last, optimizer, grad_clip). BERT trains with SGD: the
# attention's key bias has a gradient of exactly zero in exact arithmetic (a softmax does not
# change when every score of a query moves by the same q·b), so it holds rounding noise of
# ~1e-9, which Adam divides by its own square root into steps of the learning rate's size:
# any two summation orders (one process or two) then disagree there by ~1e-4.
CASES = {
    "conv": (WholeValidationTask, False, "sgd", None),
    "conv-cl": (ConvTask, True, "adam", 0.5),
    "bert": (BertTask, None, "sgd", 0.5),
}
RESUMED = "conv-cl"  # checkpoints across world sizes: Adam's state, channels_last


def _config(case: str, strategy: str = "fsdp", epochs: int = 1,
            scheduler: str = "cosine") -> TrainConfig:
    """The cosine schedule spans the run's epochs; runs cut short and resumed use a constant
    rate (``scheduler="none"``), so that 1 epoch then 1 more is 2 epochs at once."""
    _, channels_last, optimizer, clip = CASES[case]
    lr = 0.01 if optimizer == "adam" else 0.2
    return TrainConfig(epochs=epochs, lr=lr, optimizer=optimizer, momentum=0.9,
                       weight_decay=1e-3, scheduler=scheduler, strategy=strategy, quiet=True,
                       device="cpu", seed=1, channels_last=channels_last, grad_clip=clip)


def _worker(rank: int, out: str) -> None:
    from divekit.engine.fsdp import FSDPStrategy, local_bytes

    root = Path(out)
    for case, (task, *_) in CASES.items():
        config = dataclasses.replace(_config(case), profile_comm=True)
        trainer = Trainer(task(N, PER_WORKER), config)
        history = trainer.fit()
        assert isinstance(trainer.strategy, FSDPStrategy)
        whole = trainer.strategy.full_state_dict()  # collective: every rank calls it
        held = local_bytes(trainer.model, trainer.optimizer)
        torch.save({"history": history, "bytes": held, "weights": whole,
                    "sharded": all(hasattr(p, "to_local") for p in trainer.model.parameters())},
                   root / f"{case}-rank{rank}.pt")
    # checkpoints across world sizes
    task = CASES[RESUMED][0]
    Trainer(task(N, PER_WORKER), _config(RESUMED, epochs=1, scheduler="none"),
            run_dir=root / "saved-by-2").fit()
    Trainer(task(N, PER_WORKER), _config(RESUMED, epochs=2, scheduler="none"),
            run_dir=root / "saved-by-1").fit(resume=True)


def _single(case: str, epochs: int = 1, run_dir: Path | None = None, resume: bool = False,
            scheduler: str = "cosine") -> Trainer:
    """Plain one-process training (no process group: the strategy name is not used)."""
    task = CASES[case][0]
    trainer = Trainer(task(N, 2 * PER_WORKER), _config(case, "ddp", epochs, scheduler),
                      run_dir=run_dir)
    trainer.fit(resume=resume)
    return trainer


@functools.cache
def _reference(case: str) -> Trainer:
    """One process, one epoch of ``case`` (shared by the tests below)."""
    return _single(case)


@functools.cache
def _uninterrupted() -> dict[str, torch.Tensor]:
    """One process, two epochs at a constant rate: where a resumed run must end."""
    return _single(RESUMED, epochs=2, scheduler="none").model.state_dict()


def _prepare(out: Path) -> None:
    """Before the spawn, in one process: the epoch 1 that ``_worker`` resumes on two ranks."""
    _single(RESUMED, epochs=1, run_dir=out / "saved-by-1", scheduler="none")


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Path:
    """``_prepare``'s and ``_worker``'s files, from the session's one 2-process spawn
    (tests/shared_spawn.py)."""
    return section_dir("fsdp", request, tmp_path_factory)


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("case", CASES)
def test_two_fsdp_workers_equal_one_process(runs, case):
    single = _reference(case)
    reference = single.model.state_dict()
    rank0 = torch.load(runs / f"{case}-rank0.pt", weights_only=True)
    rank1 = torch.load(runs / f"{case}-rank1.pt", weights_only=True)
    assert rank0["sharded"] and rank1["sharded"]
    assert rank1["weights"] == {}  # the whole model is gathered on rank 0 only
    _assert_same_weights(rank0["weights"], reference)
    for run in (rank0, rank1):
        assert run["history"][0]["train_loss"] == pytest.approx(
            single.history[0]["train_loss"], abs=1e-5)
        assert run["history"][0]["val_seen"] == N
        # --profile-comm: 2 all-gathers and 1 reduce-scatter of the parameters per step, each
        # sending (W-1)/W = 1/2 of their bytes (the ring model)
        param_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
        assert run["history"][0]["comm_MB_per_step"] == pytest.approx(1.5 * param_bytes / 1e6)
        assert run["history"][0]["val_loss"] == pytest.approx(
            single.history[0]["val_loss"], abs=1e-5)
    # the weights moved: not a comparison of two untouched initialisations
    torch.manual_seed(1)
    fresh = CASES[case][0](N, 1).build_model().state_dict()
    assert any(not torch.allclose(fresh[k], reference[k], atol=1e-3) for k in reference)


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_about_half(runs, case):
    from divekit.engine.fsdp import local_bytes

    single = _reference(case)
    whole = local_bytes(single.model, single.optimizer)
    for rank in (0, 1):
        held = torch.load(runs / f"{case}-rank{rank}.pt", weights_only=True)["bytes"]
        for what in ("params", "grads", "optimizer"):
            # half, plus padding of rows that do not split evenly and Adam's step counters
            assert 0.3 * whole[what] < held[what] < 0.7 * whole[what], (what, held, whole)


@pytest.mark.parametrize("saved_by", ["saved-by-2", "saved-by-1"])
def test_checkpoint_resumes_with_another_number_of_ranks(runs, saved_by):
    """saved-by-2: epoch 1 on 2 ranks, epoch 2 in one process (here); saved-by-1: epoch 1 in
    one process, epoch 2 on 2 ranks. Both end at one uninterrupted process's weights."""
    uninterrupted = _uninterrupted()
    if saved_by == "saved-by-2":
        resumed = _single(RESUMED, epochs=2, run_dir=runs / saved_by, resume=True,
                          scheduler="none")
        assert len(resumed.history) == 2
        weights = resumed.model.state_dict()
    else:
        from divekit.engine.checkpoint import CheckpointDir, read_weights

        latest = CheckpointDir(runs / saved_by).latest()
        assert latest is not None and latest.name == "epoch-0002"
        weights = read_weights(latest / "model.safetensors")
    _assert_same_weights(weights, uninterrupted)




def test_blocks_are_the_encoder_blocks_and_the_cnn_stages():
    from divekit.engine.fsdp import shard_units
    from divekit.models.registry import create_model

    def names(model: nn.Module) -> list[str]:
        ids = {id(m) for m in shard_units(model)}
        return [n for n, m in model.named_modules() if id(m) in ids]

    assert names(BertModel(BERT)) == ["encoder.blks.0", "encoder.blks.1", "hidden.0"]
    assert names(create_model("resnet18")) == [f"features.b{i}" for i in range(1, 6)] + [
        "head.2"]
    assert names(create_model("lenet")) == ["features.0", "features.3", "head.1", "head.3",
                                            "head.5"]
    # a Sequential model: each layer with parameters
    assert names(CASES["conv"][0](N, 1).build_model()) == ["0", "2", "5"]


# ---------------------------------------------------------------- CUDA (nccl)
def _cuda_exact() -> None:
    """Full fp32 convolutions and products (no TF32), so that GPU runs compare at 1e-5."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _cuda_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _cuda_exact()
    for case, (task, *_) in CASES.items():
        cfg = dataclasses.replace(_config(case), device="cuda")  # cuda:LOCAL_RANK, nccl
        trainer = Trainer(task(N, 2 * PER_WORKER // world), cfg)
        trainer.fit()
        whole = trainer.strategy.full_state_dict()
        if world == 1:  # one GPU: FSDPStrategy itself, on a 1-rank nccl group (see below)
            whole = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
        if rank == 0:
            torch.save(whole, Path(out) / f"{case}.pt")


def _one_rank_fsdp(rank: int, port: int, out: str) -> None:
    """FSDPStrategy on a 1-rank nccl group (what a machine with one GPU can run): sharding,
    a few Adam steps with clipping and the full-state round trip of model and optimizer."""
    import os

    import torch.distributed as dist

    from divekit.engine.distributed import DistEnv
    from divekit.engine.fsdp import FSDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _cuda_exact()
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        results = {}
        for sharded in (False, True):
            torch.manual_seed(0)
            model = BertModel(BERT).cuda()
            strategy = FSDPStrategy(model, DistEnv(0, 1, 0)) if sharded else None
            opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
            task = BertTask(N, 16)
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
            results["fsdp"] = strategy.full_state_dict()
            saved_opt = strategy.optimizer_state_dict(opt)
            results["fsdp_opt"] = saved_opt
            strategy.load_full_state_dict(results["plain"])
            strategy.load_optimizer_state_dict(opt, results["plain_opt"])
            results["reloaded"] = strategy.full_state_dict()
            results["reloaded_opt"] = strategy.optimizer_state_dict(opt)
        torch.save(results, Path(out) / "one_rank.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fsdp_on_one_gpu_matches_plain_training_and_round_trips(tmp_path):
    import torch.multiprocessing as mp

    from divekit.engine.launch import free_port

    mp.spawn(_one_rank_fsdp, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    r = torch.load(tmp_path / "one_rank.pt", weights_only=True)
    # dropout is off and the BERT's W_k bias is excluded: Adam amplifies its rounding noise
    keep = [k for k in r["plain"] if not k.endswith("W_k.bias")]
    _assert_same_weights({k: r["fsdp"][k] for k in keep}, {k: r["plain"][k] for k in keep})
    _assert_same_weights(r["reloaded"], r["plain"])
    for i, state in r["plain_opt"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(r["reloaded_opt"]["state"][i][k].cpu().float(),
                                       v.cpu().float(), rtol=0, atol=0, msg=f"{i} {k}")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one GPU per process")
def test_two_gpus_equal_one_gpu(tmp_path):
    import torch.multiprocessing as mp

    from divekit.engine.launch import free_port

    for world in (2, 1):
        (tmp_path / str(world)).mkdir()
        mp.spawn(_cuda_worker, args=(world, free_port(), str(tmp_path / str(world))),
                 nprocs=world, join=True)
    for case in CASES:
        _assert_same_weights(torch.load(tmp_path / "2" / f"{case}.pt", weights_only=True),
                             torch.load(tmp_path / "1" / f"{case}.pt", weights_only=True))
