"""One writer per run directory, and checkpoint pointers that never leave their run (issue 17).

The concurrent-writer test runs two real ``python -m divekit train`` processes into one ``--out``;
the first is held inside its run (after it took the lock, before its first checkpoint) by the
:class:`Hold` callback below, so the second one meets it there however fast the machine is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from divekit.cli import main
from divekit.engine.callbacks import Callback
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.lock import LOCK_FILE, RunLock, RunLocked
from divekit.engine.run import evaluate

TESTS = Path(__file__).resolve().parent
TINY = ["--data", "digits", "--limit", "64", "--batch-size", "32", "--device", "cpu", "--quiet",
        "--scheduler", "none", "--threads", "1"]


class Hold(Callback):
    """``DIVEKIT_TEST_HOLD=PATH``: at the start of ``fit`` (the lock is held, no checkpoint yet)
    create ``PATH.reached`` and wait until ``PATH.go`` exists."""

    def on_fit_start(self, trainer) -> None:
        hold = os.environ.get("DIVEKIT_TEST_HOLD")
        if not hold:
            return
        Path(hold + ".reached").touch()
        deadline = time.monotonic() + 120
        while not Path(hold + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the holder exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the lock itself
def test_the_lock_file_names_its_owner_and_is_emptied_on_release(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    owner = (tmp_path / "run" / LOCK_FILE).read_text().split()
    assert owner[0] == str(os.getpid()) and lock.held
    with pytest.raises(RunLocked, match=rf"being written by process {os.getpid()} on "):
        RunLock(tmp_path / "run").acquire()  # a second open file: flock refuses it too
    lock.release()
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path / "run") as again:  # free again, and no previous owner to report
        assert again.previous_owner is None


def test_a_resume_is_a_writer_too(tmp_path, capsys, trained_lenet_run):
    run = tmp_path / "run"
    shutil.copytree(trained_lenet_run, run)
    with RunLock(run):
        code = main(["train", "lenet_bn", "--resume", "--epochs", "3", "--out", str(run),
                     "--quiet", "--device", "cpu"])
        err = one_line_error(capsys.readouterr().err)
    assert code == 2 and f"is being written by process {os.getpid()} on " in err


@pytest.mark.slow  # 16 s; the refusal itself is tested above (make test-all runs this)
def test_two_concurrent_trains_into_one_out(tmp_path, capsys):
    """One is refused naming the holder's pid; the holder finishes; its run resumes cleanly."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "DIVEKIT_TEST_HOLD": str(hold), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "divekit", "train", "lenet", *TINY, "--epochs", "1", "--out", str(out)]
    first = subprocess.Popen([*cmd, "--callbacks", "test_run_lock:Hold"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(str(hold) + ".reached"), first)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        line = one_line_error(second.stderr)
        assert f"being written by process {first.pid} on " in line and str(out) in line
        # a reader needs no lock: nothing to evaluate yet, and it says so in one line
        assert main(["evaluate", str(out), "--device", "cpu"]) == 2
        assert "holds no checkpoint yet" in one_line_error(capsys.readouterr().err)
    finally:
        Path(str(hold) + ".go").touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "run directory:" in stdout
    assert (out / LOCK_FILE).read_text() == ""  # released cleanly: no owner left behind
    # the run was trained with --callbacks, which a resume never takes from config.json (issue
    # 25): typed again (here: none) or the resume is refused
    assert main(["train", "lenet", "--resume", "--epochs", "2", "--out", str(out), "--quiet",
                 "--callbacks", ""]) == 0
    captured = capsys.readouterr()
    assert "taking over" not in captured.err + captured.out
    assert CheckpointDir(out).latest().name == "epoch-0002"


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys,
                                                                  trained_lenet_run):
    run = tmp_path / "run"
    shutil.copytree(trained_lenet_run, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from divekit.engine.lock import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"process {holder.pid} on "):
        RunLock(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run / LOCK_FILE).read_text()  # the dead owner's line stays
    code = main(["train", "lenet_bn", "--resume", "--epochs", "3", "--out", str(run), "--quiet",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.err.splitlines() if "taking over" in line]
    assert len(notes) == 1 and f"left by process {holder.pid} on " in notes[0]
    assert CheckpointDir(run).latest().name == "epoch-0003"


# ----------------------------------------------------------------------------- confined pointers
@pytest.fixture
def two_runs(trained_lenet_run, tmp_path) -> tuple[Path, Path]:
    mine, other = tmp_path / "runs" / "mine", tmp_path / "runs" / "other"
    shutil.copytree(trained_lenet_run, mine)
    shutil.copytree(trained_lenet_run, other)
    return mine, other


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "seven.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(path)
    return path


def _refused(argv: list[str], capsys, pointer: Path, content: str) -> None:
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(pointer) in line and content in line, line


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_a_pointer_out_of_the_run_is_refused(two_runs, capsys, image, kind):
    mine, other = two_runs
    name = CheckpointDir(other).latest().name
    content = f"../../other/checkpoint/{name}" if kind == "dotdot" else str(other / "checkpoint" / name)
    pointer = mine / "checkpoint" / "latest"
    pointer.write_text(content + "\n")
    _refused(["evaluate", str(mine), "--device", "cpu"], capsys, pointer, content)
    _refused(["predict", str(mine), str(image), "--device", "cpu"], capsys, pointer, content)


def test_a_checkpoint_linked_out_of_the_run_is_refused(two_runs, capsys):
    mine, other = two_runs
    name = CheckpointDir(mine).latest().name
    shutil.rmtree(mine / "checkpoint" / name)
    (mine / "checkpoint" / name).symlink_to(other / "checkpoint" / name, target_is_directory=True)
    _refused(["evaluate", str(mine), "--device", "cpu"], capsys, mine / "checkpoint" / "latest", name)


@pytest.mark.parametrize("content", [".", "..", ".epoch-0002.tmp", "epoch-0002/../epoch-0001", ""])
def test_a_pointer_holding_anything_but_a_plain_name_is_refused(two_runs, capsys, content):
    mine, _ = two_runs
    pointer = mine / "checkpoint" / "latest"
    pointer.write_text(content + "\n")
    _refused(["evaluate", str(mine), "--device", "cpu"], capsys, pointer, repr(content))


def test_a_pointer_inside_the_run_still_opens(two_runs):
    mine, _ = two_runs
    (mine / "checkpoint" / "latest").write_text("epoch-0001\n")  # an older checkpoint of its own
    assert CheckpointDir(mine).latest().name == "epoch-0001"
    assert 0 <= evaluate(mine, device="cpu")["acc"] <= 1
