"""issue 25, item 7: a tampered ``config.json`` of a text fine-tuning run was checked for types
but not ranges: ``max_len -5`` evaluated and printed "truncated to max_len -5", ``labels ["x",
"x"]`` predicted, ``head "nope"`` and a foreign ``model`` were ignored. Each is now refused in
one line naming the file, by ``evaluate`` and ``predict`` alike; the untouched run still works."""

from __future__ import annotations

import json
import shutil

import pytest

from divekit.cli import main
from test_reliability_2_options import text_run  # noqa: F401  (the module's fixture)


@pytest.mark.parametrize("where,key,value,words", [
    ("config", "max_len", -5, ["--max-len must be in [16, 4096]", "-5"]),
    ("config", "head_dropout", 2.0, ["--head-dropout"]),
    ("config", "model", "resnet18", ["model 'resnet18'"]),
    ("record", "labels", ["x", "x"], ["labels name 'x' twice"]),
    ("record", "labels", ["only"], ["2 or more"]),
    ("record", "head", "nope", ["head 'nope'"]),
])
def test_a_tampered_config_is_refused_in_one_line(text_run, tmp_path, capsys,  # noqa: F811
                                                  where, key, value, words):
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    record = json.loads((run / "config.json").read_text())
    (record["config"] if where == "config" else record)[key] = value
    (run / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    for command in (["predict", str(run), "a great kettle"], ["evaluate", str(run)]):
        code = main([*command, "--device", "cpu"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
        assert "config.json" in err[0] and all(w in err[0] for w in words), err[0]


def test_the_untouched_run_still_predicts(text_run, capsys):  # noqa: F811
    assert main(["predict", str(text_run), "a great kettle", "--device", "cpu"]) == 0
