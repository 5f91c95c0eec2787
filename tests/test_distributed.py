"""Multi-device training: the course's helpers, the ring all-reduce, sharding, mid-epoch resume,
fault tolerance under torch.distributed's elastic agent, communication accounting, bad input."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from divekit.cli import main
from divekit.data.loader import TensorBatchLoader, shard_bounds
from divekit.engine import Task, TrainConfig, Trainer
from divekit.engine import distributed as D
from divekit.engine.checkpoint import CheckpointDir, load_weights
from divekit.engine.launch import free_port
from divekit.engine.strategies import bytes_per_step
from divekit.errors import DivekitError


# ----------------------------------------------------------------- the course's helpers
def test_split_batch_gives_each_device_a_near_equal_part():
    X, y = torch.arange(14.0).reshape(7, 2), torch.arange(7)
    xs, ys = D.split_batch(X, y, ["cpu", "cpu", "cpu"])
    assert [len(t) for t in xs] == [3, 2, 2] == [len(t) for t in ys]
    assert torch.equal(torch.cat(xs), X) and torch.equal(torch.cat(ys), y)
    with pytest.raises(DivekitError, match="cannot split a batch of 2 across 3"):
        D.split_batch(X[:2], y[:2], ["cpu"] * 3)
    with pytest.raises(DivekitError, match="X holds 7 samples but y holds 6"):
        D.split_batch(X, y[:6], ["cpu"])


def test_allreduce_writes_the_sum_into_every_tensor():
    data = [torch.randn(3, 5) for _ in range(4)]
    expected = torch.stack(data).sum(0)
    out = D.allreduce([t.clone() for t in data])
    for t in out:
        torch.testing.assert_close(t, expected)
    with pytest.raises(DivekitError, match="one shape"):
        D.allreduce([torch.zeros(2), torch.zeros(3)])


# ----------------------------------------------------------------- ring all-reduce (3 processes)
RING_SHAPES = [(1,), (2,), (7,), (13,), (101,), (5, 7), (4, 3, 3)]


def _ring_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = []
    try:
        for i, shape in enumerate(RING_SHAPES):
            g = torch.Generator().manual_seed(100 * i + rank)
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            reference = x.clone()
            dist.all_reduce(reference)
            counter = D.CommCounter()
            D.ring_allreduce(x, counter=counter)
            results.append((x, reference, counter.sent))
        transposed = torch.randn(6, 5).t()  # non-contiguous input is reduced in place too
        ref = transposed.clone()
        dist.all_reduce(ref)
        D.ring_allreduce(transposed)
        results.append((transposed, ref, 0))
        torch.save(results, Path(out) / f"ring-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ring_allreduce_equals_torch_all_reduce_on_odd_sizes(tmp_path):
    world = 3
    mp.spawn(_ring_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"ring-{r}.pt", weights_only=True) for r in range(world)]
    for r in range(world):
        for x, reference, _ in per_rank[r]:  # float64: only the order of the sums differs
            tight = x.dtype == torch.float64
            torch.testing.assert_close(x, reference, rtol=1e-12 if tight else 1e-6,
                                       atol=1e-12 if tight else 1e-6)
    # every rank sends 2(W-1)/W of the tensor: 2(W-1)·P bytes over the whole ring
    for i, shape in enumerate(RING_SHAPES):
        nbytes = torch.Size(shape).numel() * 8
        assert sum(per_rank[r][i][2] for r in range(world)) == 2 * (world - 1) * nbytes


def test_bytes_per_step_models():
    assert bytes_per_step("ddp", 1000, 1) == 0
    assert bytes_per_step("allreduce", 1000, 4) == pytest.approx(1500)
    assert bytes_per_step("ps", 1000, 4, rank=0) == 3000  # the server sends W-1 copies
    assert bytes_per_step("ps", 1000, 4, rank=2) == 1000
    assert bytes_per_step("async", 1000, 4, rank=0) == 3000
    assert bytes_per_step("fsdp", 1000, 2) == pytest.approx(1500)  # 2 all-gathers + 1 scatter
    with pytest.raises(DivekitError, match="activations"):
        bytes_per_step("tensor", 1000, 2)
    with pytest.raises(DivekitError, match="unknown strategy 'bogus'"):
        bytes_per_step("bogus", 1, 2)


# ----------------------------------------------------------------- sharding
def test_shards_cover_the_dataset_once_per_epoch():
    n, per_worker, world = 48, 4, 3
    seen = []
    for rank in range(world):
        loader = TensorBatchLoader(torch.arange(n), batch_size=per_worker, shuffle=True, seed=2)
        loader.shard(rank, world).set_epoch(5)
        seen += torch.cat([b[0] for b in loader]).tolist()
    assert sorted(seen) == list(range(n))


def test_global_batches_match_one_process_including_the_last_partial_one():
    n, per_worker, world = 23, 3, 2  # global batch 6: 6, 6, 6, 5 → the last splits 3/2
    single = TensorBatchLoader(torch.arange(n), batch_size=per_worker * world, shuffle=True, seed=4)
    shards = [TensorBatchLoader(torch.arange(n), batch_size=per_worker, shuffle=True, seed=4)
              .shard(r, world) for r in range(world)]
    for loader in [single, *shards]:
        loader.set_epoch(2)
    assert len(single) == len(shards[0]) == 4
    for b, batches in enumerate(zip(single, *shards)):
        whole, parts = batches[0][0], [p[0] for p in batches[1:]]
        assert torch.equal(torch.cat(parts), whole)
        assert shards[0].global_batch_size(b) == len(whole)
    assert [shard_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert shard_bounds(1, 1, 2) == (1, 1)  # an empty share, never a padded duplicate


def test_skip_batches_resumes_mid_epoch():
    loader = TensorBatchLoader(torch.arange(20), batch_size=3, shuffle=True, seed=1)
    loader.set_epoch(1)
    every = [b[0] for b in loader]
    loader.skip_batches(4)
    assert [b[0].tolist() for b in loader] == [b.tolist() for b in every[4:]]
    assert len(list(loader)) == len(every)  # skipping applies to one pass only


def test_world_larger_than_the_dataset_is_a_clear_error():
    loader = TensorBatchLoader(torch.arange(3), batch_size=2)
    with pytest.raises(DivekitError, match=r"world size 4 is larger than the dataset \(3 samples\)"):
        loader.shard(0, 4)


# ----------------------------------------------------------------- mid-epoch checkpoints
class DropoutTask(Task):
    """Dropout and BatchNorm, so RNG and buffers both matter; can fail at a chosen step."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(TrainConfig())
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(90, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.fail_at, self.calls = fail_at, 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(16, 2))

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=16, shuffle=True, seed=3)

    def val_data(self):
        return None

    def training_step(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {"loss": loss.detach()}

    def validation_step(self, model, batch):
        return {}


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.1, quiet=True, device="cpu", scheduler="cosine",
                      checkpoint_every=4)
    straight = Trainer(DropoutTask(), cfg, tmp_path / "a")
    straight.fit()
    crashed = Trainer(DropoutTask(fail_at=6 + 3), cfg, tmp_path / "b")  # epoch 2, step 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert CheckpointDir(tmp_path / "b").latest().name == "epoch-0001-step-000002"  # global step 8
    resumed = Trainer(DropoutTask(), cfg, tmp_path / "b")
    resumed.fit(resume=True)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


# ----------------------------------------------------------------- torchrun: restart after a kill
@pytest.mark.slow  # 15 s; make test-all (test_strategy_faults and test_torchrun_nodes kill too)
def test_killed_worker_restarts_from_checkpoint_and_finishes(tmp_path, monkeypatch, capfd):
    """`divekit train --nproc 2 --max-restarts 1` runs torch.distributed's elastic agent here."""
    out = tmp_path / "run"
    common = dict(data="digits", limit=150, epochs=2, lr=0.3, device="cpu", seed=3)
    # 150 samples, global batch 2 × 16 = 32 → 5 steps per epoch; checkpoint at step 4 (epoch 1),
    # rank 1 is killed after global step 7 (epoch 2) in the first attempt only
    monkeypatch.setenv("DIVEKIT_CRASH_AT_STEP", "7")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tests_dir = str(pathlib.Path(__file__).parent)  # the workers import faults.KillWorker
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    flags = [a for k, v in common.items() for a in (f"--{k}", str(v))]
    code = main(["train", "lenet", *flags, "--batch-size", "16", "--nproc", "2",
                 "--max-restarts", "1", "--checkpoint-every", "4", "--profile-comm", "--quiet",
                 "--callbacks", "faults:KillWorker",
                 "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]
    assert captured.out.count("run directory:") == 1  # rank 0 alone reports
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # ddp's gradient all-reduce: 2(W-1)/W of LeNet's float32 gradients per step and worker
    lenet_bytes = 61_706 * 4
    assert float(rows[0]["comm_MB_per_step"]) == pytest.approx(lenet_bytes / 1e6, rel=1e-3)
    record = json.loads((out / "config.json").read_text())
    assert record["distributed"]["world_size"] == 2
    assert record["distributed"]["global_batch_size"] == 32
    assert record["distributed"]["batch_size_per_worker"] == 16

    # an uninterrupted single process with the global batch reaches the same weights
    from divekit.tasks import train
    from divekit.tasks.classify import ClassifyConfig

    single = train(ClassifyConfig(model="lenet", batch_size=32, quiet=True, out=str(tmp_path / "one"),
                                  **common))
    model = single.model
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, CheckpointDir(out).latest() / "model.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5, msg=k)


# ----------------------------------------------------------------- bad input, one line each
def test_port_in_use_is_one_clear_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["train", "lenet", "--nproc", "2", "--port", str(port), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: port {port} is in use on 127.0.0.1; pick another " \
        "--port or leave it out to use a free one"


def test_unknown_strategy_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "lenet", "--strategy", "gossip"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gossip'" in capsys.readouterr().err


def test_rendezvous_times_out_instead_of_hanging(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # the second process never comes
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(DivekitError, match=r"rendezvous of 2 processes .* failed within 1 s"):
        D.init_process_group(torch.device("cpu"), timeout_s=1)
    assert not dist.is_initialized()


# ----------------------------------------------------------------- comm ratio
def test_comm_ratio_ranks_inception_over_resnet_over_alexnet():
    from divekit.models.summary import comm_ratio_table

    rows = {r.name: r for r in comm_ratio_table(["alexnet", "googlenet", "resnet18"])}
    assert rows["googlenet"].ratio_224 > rows["resnet18"].ratio_224 > rows["alexnet"].ratio_224
    assert rows["alexnet"].gradient_bytes == 4 * rows["alexnet"].params
    # forward + backward ≈ 3 × forward: AlexNet's ~0.7 GMACs forward at 224×224, 1 channel
    assert 2.5e9 < rows["alexnet"].train_flops_224 < 6e9
