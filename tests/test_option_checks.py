"""Every option is checked where it enters: bounds on lengths and counts, options the chosen
task or dataset ignores, unknown names, and one check shared by the CLI and the Python API."""

from __future__ import annotations

import time

import pytest

from divekit.cli import main
from divekit.errors import DivekitError


def _one_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_threshold_on_a_classifier_is_refused(trained_lenet_run, tmp_path, capsys):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "seven.png")
    code = main(["predict", str(trained_lenet_run), str(tmp_path / "seven.png"), "--threshold", "5"])
    assert code == 2
    _one_error(capsys, "--threshold does not apply to a classify run; it takes --top-k")
    assert main(["predict", str(trained_lenet_run), str(tmp_path / "seven.png"),
                 "-o", str(tmp_path / "out")]) == 2
    _one_error(capsys, "--output does not apply to a classify run")
    assert not (tmp_path / "out").exists()
    from divekit.errors import DivekitError
    from divekit.tasks import predict

    with pytest.raises(DivekitError, match="--threshold does not apply to a classify run; "
                       "it takes --top-k"):
        predict(trained_lenet_run, [str(tmp_path / "seven.png")], threshold=5)  # the API too
    assert predict(trained_lenet_run, [str(tmp_path / "seven.png")], top_k=2)


def test_data_dir_for_an_embedded_dataset_is_refused_by_cli_and_api(tmp_path, capsys):
    from divekit.tasks import train

    assert main(["train", "lenet_bn", "--data", "digits", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    message = _one_error(capsys, "--data-dir does not apply to --data digits")
    with pytest.raises(DivekitError) as e:  # the same check, not a second copy of it
        train({"model": "lenet_bn", "data": "digits", "data_dir": str(tmp_path)})
    assert f"error: {e.value}" == message.strip()
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_a_data_dir_it_would_ignore_or_cannot_read(trained_lenet_run, capsys):
    assert main(["evaluate", str(trained_lenet_run), "--data-dir", "/nonexistent"]) == 2
    _one_error(capsys, "--data-dir does not apply to --data digits")
    from divekit.engine.config import data_dir_check

    ok, message = data_dir_check("fashion-mnist", "/nonexistent")
    assert not ok and "'/nonexistent' is not a folder" in message


def test_an_unknown_task_lists_the_known_ones(capsys):
    assert main(["models", "--task", "bogus"]) == 2
    err = _one_error(capsys, "unknown task 'bogus'; choose one of:")
    assert "classify" in err and "detect" in err and "language_model" in err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "/nonexistent", "--prefix", "the", "--length", "10000000000000000000"],
     "--length must be a whole number in [0, 10000]"),
    (["generate", "/nonexistent", "--prefix", "the", "--temperature", "nan"], "--temperature"),
    (["augment", "/nonexistent.png", "--n", "100000000"], "--n must be in [1, 100]"),
    (["summary", "lenet", "--input-shape", "1,100000,100000"], "sides up to 4096"),
    (["summary", "lenet", "--num-classes", "1000000000"], "--num-classes in 1..100000"),
])
def test_huge_lengths_and_counts_are_refused_at_once(argv, needle, capsys):
    start = time.perf_counter()
    assert main(argv) == 2
    _one_error(capsys, needle)
    assert time.perf_counter() - start < 10  # refused, not run until killed


def test_bounds_are_in_the_help(capsys):
    for argv, needle in ((["generate", "--help"], "0 to 10000"), (["augment", "--help"], "1 to 100")):
        with pytest.raises(SystemExit):
            main(argv)
        assert needle in capsys.readouterr().out


def test_the_python_api_enforces_the_cli_ranges(tmp_path, capsys):
    from divekit.tasks import train

    assert main(["train", "lenet_bn", "--data", "digits", "--grad-clip", "-1", "--quiet",
                 "--out", str(tmp_path / "r")]) == 2
    message = _one_error(capsys, "--grad-clip")
    with pytest.raises(DivekitError) as e:
        train({"model": "lenet_bn", "data": "digits", "grad_clip": -1.0})
    assert f"error: {e.value}" == message.strip()
