"""Outputs never replace inputs or each other, and an existing file only with --overwrite
(divekit.io.check_output / plan_outputs, used by every command that writes files it is given)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from divekit.cli import main
from divekit.errors import DivekitError
from divekit.io import check_output, plan_outputs


def _image(path, size=12, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _one_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------ the planning functions
def test_inputs_sharing_a_name_get_numbered_outputs_in_the_order_given(tmp_path):
    a, b, c = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "x.jpg"
    assert plan_outputs([a, b, c], tmp_path / "out", ".pred.png") == [
        tmp_path / "out" / "x.pred.png", tmp_path / "out" / "x-2.pred.png",
        tmp_path / "out" / "x-3.pred.png"]


def test_a_planned_name_that_is_an_input_is_skipped(tmp_path):
    photo, clash = _image(tmp_path / "photo.png"), _image(tmp_path / "photo.seg.png")
    planned = plan_outputs([photo, clash], tmp_path, ".seg.png")
    assert planned == [tmp_path / "photo-2.seg.png", tmp_path / "photo.seg.seg.png"]


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    photo = _image(tmp_path / "in" / "photo.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photo.pred.png").write_bytes(b"earlier")
    with pytest.raises(DivekitError, match="photo.pred.png' exists; pass --overwrite"):
        plan_outputs([photo], tmp_path / "out", ".pred.png")
    assert plan_outputs([photo], tmp_path / "out", ".pred.png", overwrite=True) == [
        tmp_path / "out" / "photo.pred.png"]


def test_an_output_folder_that_is_a_file_is_refused(tmp_path):
    photo = _image(tmp_path / "photo.png")
    with pytest.raises(DivekitError, match="exists and is not a folder"):
        plan_outputs([photo], photo, ".pred.png")


def test_an_input_is_never_an_output_even_with_overwrite_or_through_links(tmp_path):
    photo = _image(tmp_path / "photo.png")
    os.link(photo, tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(photo)
    for name in ("photo.png", "hard.png", "soft.png", "./photo.png"):
        with pytest.raises(DivekitError, match="refusing to overwrite the input file"):
            check_output(tmp_path / name, [photo], overwrite=True)
    with pytest.raises(DivekitError, match="is a folder"):
        check_output(tmp_path, [photo])


# ------------------------------------------------------------------------ commands
@pytest.fixture(scope="module")
def detect_run(tmp_path_factory):
    """A one-epoch tiny SSD on eight generated 64x64 scenes (its weights do not matter here)."""
    from divekit.data.detection import DetectionData, make_shapes
    from divekit.engine.run import make_config, train
    from divekit.tasks.detect import DetectConfig, DetectionTask

    (tx, ty), (vx, vy) = make_shapes(8, 64, seed=1), make_shapes(4, 64, seed=2)
    data = DetectionData(tx, ty, vx, vy, ["square", "disc", "triangle"], "shapes")
    out = tmp_path_factory.mktemp("runs") / "ssd"
    cfg = make_config(DetectConfig, {"model": "tiny_ssd", "image_size": 64, "quiet": True,
                                     "device": "cpu", "epochs": 1, "batch_size": 8,
                                     "pictures": 0, "out": str(out)})
    train(DetectionTask(cfg, data=data))
    return out


def test_predict_into_the_inputs_own_folder_keeps_the_input(detect_run, tmp_path, capsys):
    photo = _image(tmp_path / "dir" / "photo.png", 40)
    before = photo.read_bytes()
    assert main(["predict", str(detect_run), str(photo), "-o", str(photo.parent)]) == 0
    assert photo.read_bytes() == before
    assert (photo.parent / "photo.pred.png").is_file()
    capsys.readouterr()
    # the second time the picture exists: refused, then replaced with --overwrite
    assert main(["predict", str(detect_run), str(photo), "-o", str(photo.parent)]) == 2
    _one_error(capsys, "photo.pred.png' exists; pass --overwrite")
    assert main(["predict", str(detect_run), str(photo), "-o", str(photo.parent),
                 "--overwrite"]) == 0
    assert photo.read_bytes() == before


def test_predict_gives_inputs_with_one_name_distinct_pictures(detect_run, tmp_path, capsys):
    a, b = _image(tmp_path / "a" / "x.png", 40, 1), _image(tmp_path / "b" / "x.png", 40, 2)
    assert main(["predict", str(detect_run), str(a), str(b), "-o", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "x.pred.png" in shown and "x-2.pred.png" in shown
    first, second = (np.asarray(Image.open(tmp_path / "out" / n)) for n in ("x.pred.png", "x-2.pred.png"))
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_augment_never_writes_over_its_image_and_asks_before_replacing(tmp_path, capsys):
    photo = _image(tmp_path / "photo.png", 16)
    before = photo.read_bytes()
    assert main(["augment", str(photo), "--n", "1", "-o", str(photo)]) == 2
    _one_error(capsys, "refusing to overwrite the input file")
    assert photo.read_bytes() == before
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"earlier")
    assert main(["augment", str(photo), "--n", "1", "-o", str(grid)]) == 2
    _one_error(capsys, "grid.png' exists; pass --overwrite")
    assert grid.read_bytes() == b"earlier"
    assert main(["augment", str(photo), "--n", "1", "-o", str(grid), "--overwrite"]) == 0
    assert grid.read_bytes().startswith(b"\x89PNG")


def test_hw_tables_and_pictures_ask_before_replacing(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("earlier\n")
    assert main(["hw", "simulate", "lenet", "--csv", str(table)]) == 2
    _one_error(capsys, "t.csv' exists; pass --overwrite")
    assert main(["hw", "simulate", "lenet", "--csv", str(tmp_path / "u.csv"),
                 "--plot", str(tmp_path / "u.csv")]) == 2  # one file for two outputs
    _one_error(capsys, "refusing to overwrite")
    assert main(["hw", "simulate", "lenet", "--csv", str(table), "--overwrite"]) == 0
    assert table.read_text() != "earlier\n"


def test_tokenizer_and_attention_files_ask_before_replacing(tmp_path, capsys):
    model = tmp_path / "tok.model"
    model.write_bytes(b"earlier")
    assert main(["tokenizer", "train", "-o", str(model)]) == 2
    _one_error(capsys, "tok.model' exists; pass --overwrite")
    sentences = tmp_path / "in.txt"
    sentences.write_text("i have two cats .\n")
    assert main(["translate", str(tmp_path), "-i", str(sentences),
                 "--attention", str(sentences)]) == 2
    _one_error(capsys, "--attention")
    assert sentences.read_text() == "i have two cats .\n"
