"""Detection: the shapes and banana datasets, tiny SSD, training, prediction, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divekit.data import load_dataset
from divekit.data.detection import SHAPE_COLOURS, DetectionData, make_shapes
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.tasks import detect


@pytest.fixture(scope="module")
def tiny_shapes() -> DetectionData:
    tx, ty = make_shapes(48, 64, seed=1)
    vx, vy = make_shapes(12, 64, seed=2)
    return DetectionData(tx, ty, vx, vy, ["square", "disc", "triangle"], "shapes")


def test_shapes_are_deterministic_and_padded_like_bananas():
    a, b = make_shapes(10, 64, seed=3), make_shapes(10, 64, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    images, labels = a
    assert images.shape == (10, 3, 64, 64) and labels.shape == (10, 3, 5)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    padding = labels[..., 0] < 0
    assert bool((labels[padding] == -1).all())
    counts = (~padding).sum(1)
    assert int(counts.min()) >= 0 and int(counts.max()) <= 3


def test_a_square_fills_its_box_exactly():
    images, labels = make_shapes(60, 64, seed=4)
    checked = 0
    for img, rows in zip(images, labels):
        for c, x1, y1, x2, y2 in rows.tolist():
            if c != 0:
                continue
            px = [round(v * 64) for v in (x1, y1, x2, y2)]
            inside = img[:, px[1]:px[3], px[0]:px[2]]
            colour = torch.from_numpy(SHAPE_COLOURS[0])[:, None, None]
            assert torch.allclose(inside, colour.expand_as(inside))
            checked += 1
    assert checked > 0


def _write_banana_split(folder: Path, rows: list[tuple[str, int, int, int, int, int]]) -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
        for name, *values in rows:
            Image.fromarray(np.full((256, 256, 3), 90, dtype=np.uint8)).save(folder / "images" / name)
            w.writerow([name, *values])


def test_banana_loader_reads_the_course_format(tmp_path):
    _write_banana_split(tmp_path / "bananas_train", [("0.png", 0, 10, 20, 74, 84), ("1.png", 0, 128, 0, 256, 64)])
    _write_banana_split(tmp_path / "bananas_val", [("0.png", 0, 0, 0, 32, 32)])
    data = load_dataset("banana", data_dir=str(tmp_path))
    assert data.train_images.shape == (2, 3, 256, 256) and data.classes == ["banana"]
    assert torch.allclose(data.train_labels[0, 0], torch.tensor([0, 10 / 256, 20 / 256, 74 / 256, 84 / 256]))
    assert data.val_labels.shape == (1, 1, 5)


def test_banana_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DivekitError, match="bananas_train/label.csv"):
        load_dataset("banana", data_dir=str(tmp_path))


def test_tiny_ssd_output_shapes():
    assert model_info("tiny_ssd").task == "detect"
    model = create_model("tiny_ssd", num_classes=2)
    anchors, cls_preds, bbox_preds = model(torch.rand(2, 3, 64, 64))
    # feature maps 8, 4, 2, 1, 1 with 4 anchors per pixel
    a = 4 * (64 + 16 + 4 + 1 + 1)
    assert anchors.shape == (1, a, 4) and cls_preds.shape == (2, a, 3) and bbox_preds.shape == (2, a * 4)


def test_short_training_lowers_the_loss_and_predict_draws_boxes(tmp_path, tiny_shapes):
    cfg = detect.DetectConfig(epochs=3, batch_size=16, image_size=64, out=str(tmp_path / "run"),
                              quiet=True, threads=1, pictures=2)
    result = detect.train(cfg, data=tiny_shapes)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert 0 <= result.final["val_map50"] <= 1
    assert (result.run_dir / "pictures" / "val-epoch-0003.png").is_file()
    image = tmp_path / "scene.png"
    Image.fromarray((tiny_shapes.val_images[0].permute(1, 2, 0) * 255).byte().numpy()).save(image)
    out = detect.predict(result.run_dir, [image], threshold=0.0, output=tmp_path / "out", device="cpu")
    assert Path(out[0]["picture"]).is_file()
    assert all(name in tiny_shapes.classes for name, _, _ in out[0]["detections"])
    with pytest.raises(DivekitError, match="no image files"):
        detect.predict(result.run_dir, [], device="cpu")


def test_labels_with_a_class_outside_the_model_are_refused(tiny_shapes):
    bad = tiny_shapes.train_labels.clone()
    bad[5, 0, 0] = 7
    data = DetectionData(tiny_shapes.train_images, bad, tiny_shapes.val_images, tiny_shapes.val_labels,
                         tiny_shapes.classes, "shapes")
    with pytest.raises(DivekitError, match=r"train labels\[5, 0\] has class 7"):
        detect.DetectionTask(detect.DetectConfig(image_size=64), data)


@pytest.mark.parametrize("row, message", [
    ([0, 0.5, 0.1, 0.2, 0.3], r"train labels\[3, 1\] is \[0, 0.5, 0.1, 0.2, 0.3\]: a box needs x1 < x2"),
    ([0, 0.1, float("nan"), 0.2, 0.3], r"train labels\[3, 1\] is \[0, 0.1, nan, 0.2, 0.3\]: coordinates must be finite"),
    ([1, 0.1, 0.1, 1.5, 0.3], r"train labels\[3, 1\] is .*: corners are fractions"),
    ([2.5, 0.1, 0.1, 0.2, 0.3], r"train labels\[3, 1\] has class 2.5"),
])
def test_bad_boxes_are_refused_naming_the_entry(tiny_shapes, row, message):
    bad = tiny_shapes.train_labels.clone()
    bad[3, 1] = torch.tensor(row)
    data = DetectionData(tiny_shapes.train_images, bad, tiny_shapes.val_images, tiny_shapes.val_labels,
                         tiny_shapes.classes, "shapes")
    with pytest.raises(DivekitError, match=message):
        detect.DetectionTask(detect.DetectConfig(image_size=64), data)


def test_cli_refuses_a_banana_file_with_an_inverted_box(tmp_path, capsys):
    from divekit.cli import main

    _write_banana_split(tmp_path / "bananas_train", [("0.png", 0, 10, 20, 74, 84), ("1.png", 0, 90, 0, 60, 64)])
    _write_banana_split(tmp_path / "bananas_val", [("0.png", 0, 0, 0, 32, 32)])
    code = main(["train", "tiny_ssd", "--data", "banana", "--data-dir", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "train labels[1, 0]" in err and "x1 < x2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
