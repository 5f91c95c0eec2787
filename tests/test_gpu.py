"""GPU checks (`make test-gpu`): one short run per task on CUDA with AMP (bf16) and
channels_last, `evaluate` and `predict` on each result, and the data-parallel strategies on CUDA
tensors. Every test skips cleanly without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divekit.cli import main

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = ["--device", "cuda", "--amp", "--channels-last", "--quiet"]

# (model, dataset, options for a run of a few seconds)
RUNS = [
    ("lenet_bn", "digits", ["--limit", "400", "--epochs", "2", "--lr", "0.1"]),
    ("resnet18", "digits", ["--limit", "400", "--epochs", "1"]),
    ("tiny_ssd", "shapes", ["--limit", "64", "--epochs", "1"]),
    ("gru", "pydoc", ["--max-tokens", "20000", "--epochs", "1"]),
    ("transformer", "numbers-fr", ["--limit", "512", "--epochs", "1"]),
    ("fcn_resnet18", "shapes-seg", ["--limit", "32", "--epochs", "1"]),
    ("bert_small", "pydoc", ["--limit", "64", "--epochs", "1"]),
]


@pytest.fixture
def digit_png(tmp_path: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    image = (load_digits().images[7] * 255 / 16).astype("uint8")
    path = tmp_path / "seven.png"
    Image.fromarray(image).resize((28, 28)).save(path)
    return path


@pytest.mark.parametrize("model,data,options", RUNS, ids=[r[0] for r in RUNS])
def test_a_short_run_trains_evaluates_and_predicts_on_cuda(tmp_path, model, data, options,
                                                           digit_png, capsys):
    out = tmp_path / model
    assert main(["train", model, "--data", data, *options, *CUDA, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert (out / "metrics.csv").is_file()
    assert main(["evaluate", str(out), "--device", "cuda"]) == 0, capsys.readouterr().err
    if model in ("lenet_bn", "resnet18", "tiny_ssd", "fcn_resnet18"):
        predict = ["predict", str(out), str(digit_png), "--device", "cuda"]
        if model in ("tiny_ssd", "fcn_resnet18"):
            predict += ["-o", str(tmp_path / "pictures")]
        assert main(predict) == 0, capsys.readouterr().err


def _strategy_worker(rank: int, strategy: str, out: str) -> None:
    from divekit.data.loader import TensorBatchLoader
    from divekit.engine import Task, TrainConfig, Trainer

    class Mlp(Task):
        x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
        y = (x[:, 0] > 0).long()

        def train_data(self):
            return TensorBatchLoader(self.x, self.y, batch_size=8, shuffle=True, seed=1)

        def val_data(self):
            return None

        def build_model(self):
            return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

        def training_step(self, model, batch):
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            return loss, {"loss": loss.detach()}

        def validation_step(self, model, batch):
            return {}

    cfg = TrainConfig(epochs=1, lr=0.1, device=f"cuda:{rank}", strategy=strategy, quiet=True)
    trainer = Trainer(Mlp(cfg), cfg)
    trainer.fit()
    torch.save({k: v.cpu() for k, v in trainer.model.state_dict().items()}, f"{out}/{strategy}-{rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one GPU per process")
@pytest.mark.parametrize("strategy", ["ddp", "allreduce", "ps"])
def test_data_parallel_strategies_agree_across_gpus(tmp_path, strategy):
    import torch.multiprocessing as mp

    from divekit.engine.launch import free_port

    port = free_port()
    mp.spawn(_spawned, args=(strategy, str(tmp_path), port), nprocs=2, join=True)
    a = torch.load(tmp_path / f"{strategy}-0.pt", weights_only=True)
    b = torch.load(tmp_path / f"{strategy}-1.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _spawned(rank: int, strategy: str, out: str, port: int) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _strategy_worker(rank, strategy, out)
