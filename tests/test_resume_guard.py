"""``--resume`` continues the run config.json describes (issue 17): an option that changes what
the run learns is refused with one line listing each difference; ``--force-resume`` continues
anyway and records the change; options that only extend the run or change nothing it learns
stay free. The CLI and the Python API behave the same."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from divekit.cli import main
from divekit.config import option
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.config import TaskConfig
from divekit.engine.record import resume_changes
from divekit.errors import DivekitError
from divekit.tasks import train
from divekit.tasks.classify import ClassifyConfig

TINY = ["--data", "digits", "--limit", "64", "--batch-size", "32", "--device", "cpu", "--quiet",
        "--scheduler", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "lenet"
    assert main(["train", "lenet", *TINY, "--epochs", "1", "--seed", "0", "--lr", "0.1",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(one_epoch, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    return out


def record(run: Path) -> dict[str, Any]:
    return json.loads((run / "config.json").read_text())


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def resume(run: Path, *extra: str) -> list[str]:
    return ["train", "lenet", "--resume", "--out", str(run), *extra]


def test_resume_with_another_seed_is_refused_and_nothing_is_written(run, capsys):
    before = (run / "config.json").read_text()
    line = refused(resume(run, "--seed", "1", "--epochs", "2"), capsys)
    assert "--seed: 0 in the run, 1 now" in line and "--force-resume" in line
    assert CheckpointDir(run).latest().name == "epoch-0001"
    assert (run / "config.json").read_text() == before


def test_every_difference_is_listed_in_the_one_line(run, capsys):
    line = refused(resume(run, "--seed", "1", "--lr", "0.2", "--batch-size", "16",
                          "--optimizer", "adam"), capsys)
    for part in ("--seed: 0 in the run, 1 now", "--lr: 0.1 in the run, 0.2 now",
                 "--batch-size: 32 in the run, 16 now", "--optimizer: 'sgd' in the run, 'adam' now"):
        assert part in line, line
    assert "--epochs" not in line


def test_force_resume_continues_and_records_the_change(run, capsys):
    assert main(resume(run, "--seed", "1", "--force-resume", "--epochs", "2")) == 0
    out = capsys.readouterr()
    assert "--force-resume" in out.err and "--seed: 0 in the run, 1 now" in out.err
    rec = record(run)
    assert rec["forced_changes"] == [
        {"option": "--seed", "run": 0, "now": 1, "from_checkpoint": "epoch-0001"}]
    assert rec["config"]["seed"] == 1 and CheckpointDir(run).latest().name == "epoch-0002"
    # the run is now a seed-1 run: resuming it as it is needs nothing forced; the record stays
    assert main(resume(run, "--epochs", "3")) == 0
    assert record(run)["forced_changes"] == rec["forced_changes"]
    # --force-resume is never carried over from config.json: the next change is refused again
    line = refused(resume(run, "--seed", "2", "--epochs", "4"), capsys)
    assert "--seed: 1 in the run, 2 now" in line


def test_options_that_extend_the_run_or_change_nothing_learned_stay_free(run, capsys):
    assert main(resume(run, "--epochs", "2", "--quiet", "--threads", "2", "--device", "cpu",
                       "--checkpoint-every", "5", "--no-channels-last")) == 0
    assert "forced_changes" not in record(run)
    assert CheckpointDir(run).latest().name == "epoch-0002"


def test_retyping_the_runs_own_values_is_no_change(run):
    assert main(resume(run, *TINY, "--seed", "0", "--lr", "0.1", "--epochs", "2")) == 0
    assert "forced_changes" not in record(run)


def test_force_resume_without_resume_is_one_line(tmp_path, capsys):
    line = refused(["train", "lenet", *TINY, "--force-resume", "--out", str(tmp_path / "r")], capsys)
    assert "--force-resume only goes with --resume" in line


def test_another_number_of_workers_is_a_change_too(run, capsys):
    rec = record(run)
    rec["distributed"]["world_size"] = 2  # as if trained with --nproc 2
    (run / "config.json").write_text(json.dumps(rec))
    assert "--nproc: 2 in the run, 1 now" in refused(resume(run, "--epochs", "2"), capsys)


# ----------------------------------------------------------------------------- the Python API
def test_python_api_takes_the_runs_options_and_refuses_the_same_changes(run):
    with pytest.raises(DivekitError, match="--seed: 0 in the run, 1 now"):
        train({"model": "lenet", "data": "digits", "resume": True, "out": str(run), "seed": 1})
    # options left out come from the run (limit 64, batch 32, lr 0.1), not from the defaults
    result = train({"model": "lenet", "resume": True, "out": str(run), "epochs": 2, "quiet": True})
    saved = record(run)["config"]
    assert (saved["limit"], saved["batch_size"], saved["lr"]) == (64, 32, 0.1)
    assert [row["epoch"] for row in result.history] == [1, 2]
    # a whole config dataclass is compared as it is
    cfg = dataclasses.replace(ClassifyConfig(**record(run)["config"]), resume=True, epochs=3)
    with pytest.raises(DivekitError, match="--lr: 0.1 in the run, 0.5 now"):
        train(dataclasses.replace(cfg, lr=0.5))
    with_force = train(dataclasses.replace(cfg, lr=0.5, force_resume=True))
    assert with_force.history[-1]["epoch"] == 3
    assert record(run)["forced_changes"][0]["option"] == "--lr"


# ----------------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class WithFamily(TaskConfig):
    tta: str = option("none", "evaluation-time option")
    RESUME_FREE = TaskConfig.RESUME_FREE | {"tta"}


def test_resume_changes_compares_model_options_one_by_one_and_skips_free_options():
    saved = dataclasses.asdict(WithFamily(model="m", model_options={"num_hiddens": 32, "dropout": 0.1}))
    saved.pop("weight_decay")  # a record from an older divekit: not compared
    now = WithFamily(model="m", epochs=50, device="cuda", tta="flip", weight_decay=0.5,
                     model_options={"num_hiddens": 64, "dropout": 0.1, "num_layers": 2})
    assert resume_changes(saved, now) == [("--num-hiddens", 32, 64),
                                          ("--num-layers", "default", 2)]
    assert resume_changes(saved, dataclasses.replace(now, model_options=saved["model_options"])) == []


# ----------------------------------------------------------------------------- code in run files
# issue 25: a run's files are data, never code. `callbacks` is the one config.json field that
# names code (MODULE:CLASS); a resume takes it only from what is typed now.
CODE_FIELDS = ("callbacks",)
PLANTED = """\
import pathlib
pathlib.Path(__file__).with_name("planted.ran").write_text("imported")
from divekit.engine.callbacks import Callback
class Cb(Callback):
    pass
"""


@pytest.fixture
def planted(tmp_path, monkeypatch) -> Path:
    """A module beside the run, importable, that leaves a file behind when it is imported."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "planted_cb.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(__import__("sys").modules, "planted_cb", raising=False)
    return code / "planted.ran"


def plant(run: Path, field: str = "callbacks", value: str = "planted_cb:Cb") -> None:
    rec = record(run)
    rec["config"][field] = value
    (run / "config.json").write_text(json.dumps(rec))


def test_the_fields_that_name_code_are_known():
    from divekit.engine.record import _NAMES_CODE

    assert set(_NAMES_CODE) == set(CODE_FIELDS)
    names = {f.name for f in dataclasses.fields(ClassifyConfig)}
    assert set(CODE_FIELDS) <= names


@pytest.mark.parametrize("field", CODE_FIELDS)
def test_resume_never_imports_code_named_in_the_run_and_says_so_in_one_line(run, planted, field,
                                                                           capsys):
    plant(run, field)
    before = (run / "config.json").read_text()
    line = refused(resume(run, "--epochs", "2"), capsys)
    assert "'planted_cb:Cb'" in line and "--callbacks" in line and "never imports" in line
    assert not planted.exists()
    assert (run / "config.json").read_text() == before
    assert CheckpointDir(run).latest().name == "epoch-0001"
    # the Python API goes through the same merge
    with pytest.raises(DivekitError, match="never imports"):
        train({"model": "lenet", "resume": True, "out": str(run), "epochs": 2, "quiet": True})
    assert not planted.exists()


def test_this_module_from_a_run_is_not_imported(run, capsys):
    plant(run, value="this:X")  # the example: it printed the Zen of Python
    code = main(resume(run, "--epochs", "2"))
    out = capsys.readouterr()
    assert code == 2 and "Zen of Python" not in out.out + out.err
    assert "'this:X'" in out.err


def test_callbacks_typed_again_are_used_and_an_empty_list_continues_without(run, planted, capsys):
    plant(run)
    assert main(resume(run, "--epochs", "2", "--callbacks", "")) == 0
    assert not planted.exists() and CheckpointDir(run).latest().name == "epoch-0002"
    plant(run)
    assert main(resume(run, "--epochs", "3", "--callbacks", "planted_cb:Cb")) == 0
    assert planted.exists()  # typed on this command line: the user's choice


def test_image_finetune_resume_never_imports_code_named_in_the_run(run, planted, capsys):
    plant(run)
    line = refused(["finetune", str(run), "--resume", "--out", str(run), "--epochs", "2"], capsys)
    assert "'planted_cb:Cb'" in line and not planted.exists()


def test_opening_a_run_never_imports_code_named_in_it(run, planted):
    from divekit.engine.run import evaluate, load_run

    plant(run)
    assert load_run(run).config.callbacks is None
    assert "acc" in evaluate(run, device="cpu")
    assert not planted.exists()
