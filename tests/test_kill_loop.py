"""``kill -9`` at random moments, again and again (issue 17): every time the run resumes, and in
the end its weights are bit-identical to an uninterrupted run's.

Each training process is a real process killed with SIGKILL: it is forked from a
``multiprocessing`` fork server that has imported divekit once (a fresh interpreter per attempt
would spend seconds importing torch for every kill). The run checkpoints after every optimizer
step, so writes are frequent. The moments are drawn with a fixed seed, one of three ways each
time: anywhere between the start and the first step (imports, the record, the lock, the
restore), anywhere in the step after the run moved on by one, or inside a checkpoint write (its
temporary folder exists). The windows are scaled by an uninterrupted run's own timing, so each
kill moves the run on by two steps at most on a fast or a slow machine. After each kill the next
attempt must take over the dead process's lock with a note, and no attempt may print a
traceback.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.lock import LOCK_FILE

OPTIONS = ["lenet_bn", "--data", "digits", "--limit", "64", "--batch-size", "8", "--epochs", "6",
           "--lr", "0.05", "--scheduler", "none", "--seed", "5", "--device", "cpu", "--quiet",
           "--threads", "1", "--checkpoint-every", "1"]  # 8 steps an epoch, a checkpoint after each
STEPS = 6 * 8


def _child(argv: list[str], log: str) -> None:
    """A training process: ``divekit`` with ``argv``, stdout and stderr into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from divekit.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def spawn():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["divekit.cli", "divekit.tasks.classify", "divekit.engine.trainer",
                                "divekit.data.vision", "sklearn.datasets", "divekit.viz", __name__])

    def start(argv: list[str], log: Path) -> multiprocessing.Process:
        p = ctx.Process(target=_child, args=(argv, str(log)), daemon=True)
        p.start()
        return p

    return start


def _pointer(run: Path) -> str | None:
    try:
        return (run / "checkpoint" / "latest").read_text()
    except OSError:
        return None


def _debris(run: Path) -> set[str]:
    """Temporary folders and files of checkpoint writes (a kill inside one leaves them)."""
    root = run / "checkpoint"
    return {str(p.relative_to(root)) for p in root.rglob(".*")} if root.is_dir() else set()


def _wait(p: multiprocessing.Process, ready) -> None:
    deadline = time.monotonic() + 120
    while p.is_alive() and not ready() and time.monotonic() < deadline:
        time.sleep(0.001)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
        return [{k: row[k] for k in keep} for row in csv.DictReader(f)]


def _finish(spawn, argv: list[str], log: Path) -> str:
    p = spawn(argv, log)
    p.join(timeout=600)
    text = log.read_text()
    assert p.exitcode == 0, text[-3000:]
    return text


@pytest.mark.parametrize("kills", [8, pytest.param(20, marks=pytest.mark.slow)])  # 20: make test-all
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, spawn,
                                                                              kills):
    reference, run, logs = tmp_path / "reference", tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    _finish(spawn, ["datasets"], logs / "warm-up.txt")  # the fork server imports divekit once
    # the uninterrupted run, timed: how long a process takes to its first step, and a step
    t0 = time.monotonic()
    p = spawn(["train", *OPTIONS, "--out", str(reference)], logs / "reference.txt")
    _wait(p, lambda: _pointer(reference) is not None)
    startup = time.monotonic() - t0
    p.join(timeout=600)
    assert p.exitcode == 0, (logs / "reference.txt").read_text()[-3000:]
    step = max((time.monotonic() - t0 - startup) / (STEPS - 1), 0.005)

    rng = random.Random(1700 + kills)
    killed = mid_write = takeovers = 0
    attempt, story = 0, []
    while killed < kills:
        attempt += 1
        assert attempt <= 3 * kills, "the run finished before it could be killed often enough"
        resume = CheckpointDir(run).latest() is not None
        argv = ["train", *OPTIONS, "--out", str(run), *(["--resume"] if resume else [])]
        owner_before = (run / LOCK_FILE).read_text().split() if (run / LOCK_FILE).exists() else []
        log = logs / f"attempt-{attempt:02d}.txt"
        before, debris, t0 = _pointer(run), _debris(run), time.monotonic()
        p = spawn(argv, log)
        # each way moves the run on by two steps at most, so 20 kills fit in its 48 steps
        mode = rng.choice(["start", "step", "write"])
        if mode == "start":  # from the start to the first step: imports, record, lock, restore
            p.join(timeout=rng.uniform(0.0, startup))
        elif mode == "step":  # anywhere in the step after the run moved on by one
            _wait(p, lambda was=before: _pointer(run) != was)
            time.sleep(rng.uniform(0.0, step))
        else:  # inside a checkpoint write: its temporary folder exists
            _wait(p, lambda had=debris: bool(_debris(run) - had))
            time.sleep(rng.uniform(0.0, 0.004))
        if p.is_alive():
            p.kill()  # SIGKILL
            p.join()
            killed += 1
            interrupted = bool(_debris(run) - debris)
            mid_write += interrupted
            story.append(f"{mode} {time.monotonic() - t0:.2f}s → "
                         f"{(_pointer(run) or '-').strip()}{' (mid-write)' if interrupted else ''}")
        text = log.read_text() if log.exists() else ""  # killed before it opened its log
        assert "Traceback" not in text, text[-3000:]
        if p.exitcode not in (0, -9):
            lines = [line for line in text.splitlines() if line.startswith("error: ")]
            pytest.fail(f"attempt {attempt} refused to resume (exit {p.exitcode}): {lines}")
        assert p.exitcode == -9 or "run directory:" in text, text[-3000:]
        owner_now = (run / LOCK_FILE).read_text().split() if (run / LOCK_FILE).exists() else []
        if owner_before and owner_now[:1] == [str(p.pid)]:  # it took a dead process's lock
            assert f"taking over the lock left by process {owner_before[0]} on " in text, text
            takeovers += 1

    text = _finish(spawn, ["train", *OPTIONS, "--out", str(run), "--resume"], logs / "final.txt")
    assert "Traceback" not in text
    print(f"\n{kills} kills in {attempt} attempts (startup {startup:.2f}s, step {step:.3f}s): "
          f"{mid_write} inside a checkpoint write, "
          f"{takeovers} locks taken over; " + "; ".join(story))
    assert (run / LOCK_FILE).read_text() == ""
    assert CheckpointDir(run).latest().name == "epoch-0006"
    want = load_file(str(CheckpointDir(reference).latest() / "model.safetensors"))
    got = load_file(str(CheckpointDir(run).latest() / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert _rows(run) == _rows(reference)
