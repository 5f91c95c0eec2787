"""Translation validation under data parallelism: two gloo workers, each validating its shard,
report the loss, token accuracy, BLEU and translations of one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from divekit.data.loader import TensorBatchLoader
from divekit.engine.launch import free_port
from divekit.engine.run import make_config
from divekit.engine.trainer import run_validation
from divekit.tasks.translate import TranslateConfig, TranslationTask

VALUES = dict(model="transformer", data="numbers-fr", max_examples=600, bleu_examples=45,
              bleu_beam=2, batch_size=16, num_hiddens=16, ffn_num_hiddens=32, num_heads=2,
              num_blks=1, quiet=True, device="cpu")


def _validate(world: int) -> dict:
    task = TranslationTask(make_config(TranslateConfig, VALUES))
    torch.manual_seed(0)
    model = task.build_model()
    # the task's 60 validation pairs, 8 a batch per worker, so that the ranks' pairs interleave
    loader = TensorBatchLoader(*task.val_data().tensors, batch_size=8)
    if world > 1:
        loader.shard(dist.get_rank(), world)
    return run_validation(task, model, loader, torch.device("cpu"), reduce=world > 1)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.save(_validate(world), Path(out) / f"metrics-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_workers_validate_as_one_process(tmp_path):
    one = _validate(1)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        two = torch.load(tmp_path / f"metrics-{rank}.pt", weights_only=False)
        assert two["translations"] == one["translations"] and len(one["translations"]) == 45
        assert two["bleu"] == one["bleu"] and two["bleu_beam2"] == one["bleu_beam2"]
        assert two["acc"] == pytest.approx(one["acc"], abs=1e-12)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
