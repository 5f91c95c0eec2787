"""Several machines, tested on one: the README's two-machine command on 127.0.0.1.

Two ``torchrun --nnodes 2 --node-rank 0|1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT
-m divekit train ...`` processes (each node one worker, as two one-GPU machines would run) must
end at the weights of one process with the global batch; and when one node's worker is killed
mid-run (``kill -9``), both nodes' agents restart their workers (``--max-restarts``), which resume
from the last checkpoint and still end at the same weights. Each node is a real ``torchrun``
subprocess: the elastic agents, the c10d rendezvous and the restarts are PyTorch's own.

The restart across two agents needs each round of workers to agree on a fresh store prefix
(:func:`divekit.engine.distributed.agree_on_round`): the agent's store keeps the dead round's
addresses, and the node restarted for the other node's failure keeps restart count 0, so the
count cannot name the round. The protocol is tested below on its own too, with stale keys.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from divekit.engine.checkpoint import CheckpointDir, read_weights
from divekit.engine.distributed import DistEnv, Round, agree_on_round
from divekit.engine.launch import free_port
from divekit.errors import DivekitError

TESTS = Path(__file__).parent
COMMON = ["--data", "digits", "--limit", "150", "--epochs", "2", "--lr", "0.3", "--device", "cpu",
          "--seed", "3", "--quiet"]


def _node_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _two_nodes(out: Path, strategy: str, extra: list[str], env: dict[str, str],
               max_restarts: int = 1, rdzv_id: bool = True) -> list[str]:
    """Start node 0 and node 1 as two torchrun processes on 127.0.0.1, wait for both, and
    return what each printed. Without ``rdzv_id`` the job has torchrun's default id."""
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--node-rank", str(node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                *(["--rdzv-id", f"divekit-test-{port}"] if rdzv_id else []),
                "--max-restarts", str(max_restarts),
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



@pytest.mark.slow  # 55-80 s at load average 15 on 2 cores: two agents, a kill, a new round
@pytest.mark.parametrize(("strategy", "rdzv_id"), [("ddp", True), ("allreduce", False)])
def test_killed_node_worker_restarts_both_nodes_and_ends_at_the_same_weights(
        tmp_path, one_process, strategy, rdzv_id):
    # 150 samples, global batch 2 x 16 = 32: 5 steps per epoch, 10 in all; a checkpoint every 4
    # steps and at each epoch's end; global rank 1's worker is killed (SIGKILL) right after
    # global step 7, once in the job. --max-restarts 1: one restart each, no spare. Rank 0's
    # node, restarted for the other's failure, knows it resumes from the job's store (an
    # earlier round) and, given --rdzv-id, from config.json's job id: without it, the store alone
    out, log = tmp_path / "killed", tmp_path / "starts.jsonl"
    env = _node_env(DIVEKIT_CRASH_AT_STEP="7", DIVEKIT_CRASH_RANK="1",
                    DIVEKIT_CRASH_MARKER=str(tmp_path / "killed-once"), DIVEKIT_NODE_LOG=str(log))
    outputs = _two_nodes(out, strategy, ["--checkpoint-every", "4", "--callbacks",
                                         "torchrun_faults:NodeLog,torchrun_faults:KillOnce"], env,
                         rdzv_id=rdzv_id)
    assert (tmp_path / "killed-once").exists(), "the worker was never killed"
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    first, again = starts[:2], starts[2:]
    report = "\n".join(map(str, starts)) + "\n" + outputs[0][-2000:] + outputs[1][-2000:]
    # both nodes started a worker twice: once fresh, once resumed from the same checkpoint
    assert len(starts) == 4, report
    assert sorted(s["node"] for s in first) == sorted(s["node"] for s in again) == [0, 1], report
    assert {s["step"] for s in first} == {0}, report
    resumed = {s["step"] for s in again}
    assert len(resumed) == 1 and 0 < resumed.pop() <= 7, report
    assert not {s["pid"] for s in first} & {s["pid"] for s in again}, report
    killed_node = next(s["node"] for s in first if s["rank"] == 1)
    assert next(s["restart_count"] for s in again if s["node"] == killed_node) == 1, report
    _assert_same(out, one_process)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]


@pytest.mark.slow  # 48-68 s at load average 15 on 2 cores: two torchrun jobs of 2 workers
def test_a_later_job_reusing_the_rdzv_id_and_out_is_refused_not_resumed(tmp_path):
    # the job's store, not config.json's recorded --rdzv-id, says whether a round is a restart:
    # a new job under the README's `--rdzv-id myjob` is a new job, and --out holds a run
    out, port = tmp_path / "run", free_port()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "myjob", "--max-restarts", "0", "--monitor-interval", "0.5",
            "-m", "divekit", "train", "lenet", "--data", "digits", "--limit", "64",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--quiet",
            "--out", str(out)]
    runs = [subprocess.run(argv, env=_node_env(), capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr[-2500:]
    assert json.loads((out / "config.json").read_text())["distributed"]["job_id"] == "myjob"
    assert runs[1].returncode != 0
    assert f"error: {out} already holds a run; pass --resume" in runs[1].stdout + runs[1].stderr


# ------------------------------------------------------------------ the round agreement alone
def _agree_all(store_port: int, world: int, order: list[int], timeout_s: float = 20.0,
               ) -> dict[int, Round | Exception]:
    """Run :func:`agree_on_round` for ``world`` ranks on threads started in ``order``, each
    with its own client of the TCPStore at ``store_port``; rank -> its Round (or the error)."""
    results: dict[int, Round | Exception] = {}

    def one(rank: int) -> None:
        client = torch.distributed.TCPStore("127.0.0.1", store_port, is_master=False,
                                            timeout=datetime.timedelta(seconds=timeout_s))
        try:
            results[rank] = agree_on_round(client, DistEnv(rank, world, rank),
                                           datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - the test reads it
            results[rank] = e

    threads = []
    for rank in order:
        threads.append(threading.Thread(target=one, args=(rank,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout_s + 10)
    return results


@pytest.fixture
def server() -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=30))


def test_each_round_agrees_on_a_fresh_name_despite_the_dead_rounds_keys(server):
    rounds = []
    # round 1 in order; round 2: rank 0 first, so it reads the dead round's hello keys before
    # the new ranks overwrite them; round 3: rank 0 last
    for order in ([0, 1, 2], [0, 2, 1], [2, 1, 0]):
        results = _agree_all(server.port, 3, order)
        assert sorted(results) == [0, 1, 2], results
        assert len(set(results.values())) == 1, results
        assert all(isinstance(v, Round) for v in results.values()), results
        rounds.append(results[0])
    assert len({r.name for r in rounds}) == 3  # no round reuses a name or reads another's keys
    assert [r.earlier for r in rounds] == [0, 1, 2]  # and each knows how many came before


def test_a_round_whose_peer_never_comes_ends_in_one_line(server):
    # the dead round's rank 1 left its hello key; this round's rank 1 never starts
    _agree_all(server.port, 2, [0, 1])
    alone = _agree_all(server.port, 2, [0], timeout_s=1.0)
    assert isinstance(alone[0], DivekitError) and "rank(s) [1]" in str(alone[0])
    assert "\n" not in str(alone[0])
    # and a rank 1 whose rank 0 never starts: the stale answer is for another nonce
    orphan = _agree_all(server.port, 2, [1], timeout_s=1.0)
    assert isinstance(orphan[1], DivekitError) and "did not answer" in str(orphan[1])
