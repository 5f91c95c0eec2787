"""Every strategy beyond data parallel survives a machine failure (issue 27, item 7).

``divekit train lenet --nproc 2 --strategy S --max-restarts 1 --checkpoint-every 4``: the last
rank's worker is killed (SIGKILL, ``tests/faults.py``) after global step 7, in the first attempt
only; torch.distributed's elastic agent restarts both workers, they resume from the newest
(mid-epoch) checkpoint, written whole by every strategy, and the run ends at the weights of one
uninterrupted process with the global batch (LeNet has no BatchNorm). ddp, allreduce and ps have
the same test in test_distributed.py. Each run takes a minute or more: slow.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

COMMON = dict(data="digits", limit=150, epochs=2, lr=0.3, device="cpu", seed=3)
GLOBAL_BATCH = 32  # 150 samples: 5 steps an epoch; checkpoints after steps 4, 5, 8 and 10

# strategy -> its options; the data-parallel ones give each of the 2 ranks half the batch
CASES = {
    "async": (["--staleness", "0"], GLOBAL_BATCH // 2),
    "fsdp": ([], GLOBAL_BATCH // 2),
    "pipeline": (["--microbatches", "3"], GLOBAL_BATCH),
    "tensor": ([], GLOBAL_BATCH),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    from divekit.tasks import train
    from divekit.tasks.classify import ClassifyConfig

    out = tmp_path_factory.mktemp("one") / "run"
    single = train(ClassifyConfig(model="lenet", batch_size=GLOBAL_BATCH, quiet=True,
                                  out=str(out), **COMMON))
    return {k: v.clone() for k, v in single.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(CASES))
def test_a_killed_worker_restarts_and_ends_where_one_process_ends(strategy, one_process, tmp_path,
                                                                  monkeypatch, capfd):
    from divekit.cli import main
    from divekit.engine.checkpoint import CheckpointDir, read_weights

    options, per_rank = CASES[strategy]
    out = tmp_path / "run"
    monkeypatch.setenv("DIVEKIT_CRASH_AT_STEP", "7")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tests_dir = str(Path(__file__).parent)  # the workers import faults.KillWorker
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    flags = [a for k, v in COMMON.items() for a in (f"--{k}", str(v))]
    code = main(["train", "lenet", *flags, "--batch-size", str(per_rank), "--nproc", "2",
                 "--strategy", strategy, *options, "--max-restarts", "1",
                 "--checkpoint-every", "4", "--quiet", "--callbacks", "faults:KillWorker",
                 "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]
    weights = read_weights(CheckpointDir(out).latest() / "model.safetensors")
    assert weights.keys() == one_process.keys()
    for k, v in weights.items():
        torch.testing.assert_close(v, one_process[k], rtol=0, atol=1e-5, msg=k)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]  # each epoch once, after the restart
