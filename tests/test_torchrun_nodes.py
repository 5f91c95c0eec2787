"""Several machines, tested on one: the README's two-machine command on 127.0.0.1.

Two ``torchrun --nnodes 2 --node-rank 0|1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT
-m divekit train ...`` processes (each node one worker, as two one-GPU machines would run) must
end at the weights of one process with the global batch. Each node is a real ``torchrun``
subprocess: the elastic agents and the c10d rendezvous are PyTorch's own. (A worker killed on
one node, with ``--max-restarts``, is tested within one node in test_distributed.py; across two
agents on one host the restarted round has not yet been seen to finish here: see issue 27.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divekit.engine.checkpoint import CheckpointDir, read_weights
from divekit.engine.launch import free_port

TESTS = Path(__file__).parent
COMMON = ["--data", "digits", "--limit", "150", "--epochs", "2", "--lr", "0.3", "--device", "cpu",
          "--seed", "3", "--quiet"]


def _node_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _two_nodes(out: Path, strategy: str, extra: list[str], env: dict[str, str]) -> list[str]:
    """Start node 0 and node 1 as two torchrun processes on 127.0.0.1, wait for both, and
    return what each printed."""
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--node-rank", str(node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"divekit-test-{port}", "--max-restarts", "1",
                "--monitor-interval", "0.5",
                "-m", "divekit", "train", "lenet", *COMMON, "--batch-size", "16",
                "--strategy", strategy, "--out", str(out), *extra]
        nodes.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for node in nodes:
            text, _ = node.communicate(timeout=400)
            outputs.append(text)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], "\n".join(f"node {i} exited {c}:\n{t[-2500:]}"
                                       for i, (c, t) in enumerate(zip(codes, outputs)))
    return outputs


def _one_process(out: Path) -> dict[str, torch.Tensor]:
    from divekit.cli import main

    code = main(["train", "lenet", *COMMON, "--batch-size", "32", "--out", str(out)])
    assert code == 0
    return read_weights(CheckpointDir(out).latest() / "model.safetensors")


def _assert_same(run: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = read_weights(CheckpointDir(run).latest() / "model.safetensors")
    assert weights.keys() == reference.keys()
    for k, v in weights.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _one_process(tmp_path_factory.mktemp("one") / "run")


@pytest.mark.slow  # 11 s: two torchrun agents and three trainings (make test-all runs it)
def test_two_torchrun_nodes_equal_one_process(tmp_path, one_process):
    out = tmp_path / "two-nodes"
    _two_nodes(out, "allreduce", [], _node_env())
    _assert_same(out, one_process)

