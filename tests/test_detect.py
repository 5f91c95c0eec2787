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
from divekit.engine import Trainer
from divekit.engine.run import evaluate, load_run, make_config, predict, train
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.tasks.detect import DetectConfig, DetectionTask, picture_paths


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


def _config(**values) -> DetectConfig:
    """As ``divekit train`` builds it: the model's recipe (Adam 1e-3) under the values given."""
    return make_config(DetectConfig, {"model": "tiny_ssd", "image_size": 64, "quiet": True,
                                      "threads": 1, "device": "cpu", **values})


def _save(image: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(path)
    return path


def test_the_models_recipe_fills_what_the_user_left_out():
    cfg = _config()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("adam", 1e-3, 0.0, 32)
    assert _config(optimizer="sgd", lr=0.2).optimizer == "sgd"
    assert make_config(DetectConfig, {"model": "maskrcnn"}).lr == 1e-4


def test_short_training_lowers_the_loss_and_predict_draws_boxes(tmp_path, tiny_shapes):
    cfg = _config(epochs=3, batch_size=16, out=str(tmp_path / "run"), pictures=2)
    result = train(DetectionTask(cfg, data=tiny_shapes))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert 0 <= result.final["val_map50"] <= 1
    assert (result.run_dir / "pictures" / "val-epoch-0003.png").is_file()
    image = _save(tiny_shapes.val_images[0], tmp_path / "scene.png")
    out = predict(result.run_dir, [image], threshold=0.0, output=tmp_path / "out", device="cpu")
    assert Path(out[0]["picture"]).is_file()
    assert all(name in tiny_shapes.classes for name, _, _ in out[0]["detections"])
    with pytest.raises(DivekitError, match="no image files"):
        predict(result.run_dir, [], device="cpu")


def test_pictures_never_replace_an_input_or_each_other(tmp_path):
    a, b = tmp_path / "one" / "a.png", tmp_path / "two" / "a.jpg"
    clash = tmp_path / "one" / "a.pred.png"  # an input named like a.png's picture
    assert picture_paths([a, b, clash], tmp_path / "one") == [
        tmp_path / "one" / "a-2.pred.png", tmp_path / "one" / "a-3.pred.png",
        tmp_path / "one" / "a.pred.pred.png"]
    assert picture_paths([a], tmp_path / "out") == [tmp_path / "out" / "a.pred.png"]


def test_evaluate_and_predict_open_the_run_without_its_training_data(tmp_path, tiny_shapes):
    run = tmp_path / "run"
    result = train(DetectionTask(_config(epochs=1, batch_size=16, limit=32, out=str(run), pictures=0)))
    # evaluate reruns the validation loop on the newest checkpoint: the last epoch's numbers
    metrics = evaluate(run, device="cpu")
    assert metrics["map50"] == pytest.approx(result.final["val_map50"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(result.final["val_loss"], rel=1e-5)
    shown = DetectionTask(_config()).format_metrics(metrics)  # what `divekit evaluate` prints
    assert shown.startswith("loss ") and ", map50 " in shown
    images = [_save(tiny_shapes.val_images[i], tmp_path / d / "scene.png") for i, d in ((0, "a"), (1, "b"))]
    before = [p.read_bytes() for p in images]
    out = predict(run, images, threshold=0.0, output=tmp_path / "a", device="cpu")
    pictures = [Path(item["picture"]) for item in out]
    assert pictures == [tmp_path / "a" / "scene.pred.png", tmp_path / "a" / "scene-2.pred.png"]
    assert all(p.is_file() for p in pictures) and [p.read_bytes() for p in images] == before
    plain = predict(run, images[:1], threshold=0.0, device="cpu")[0]
    assert plain["picture"] is None and len(plain["detections"]) == len(out[0]["detections"])
    for (c1, s1, b1), (c2, s2, b2) in zip(plain["detections"], out[0]["detections"]):  # batch of 1 vs 2
        assert c1 == c2 and s1 == pytest.approx(s2, abs=1e-5) and b1 == pytest.approx(b2, abs=0.11)
    opened = load_run(run)
    assert opened.task.classes == tiny_shapes.classes and opened.record["image_size"] == 64
    assert "data" not in vars(opened.task)  # predicting loaded no data


def test_a_detection_prints_as_before():
    task = DetectionTask(_config())
    format_metrics, format_prediction = task.format_metrics, task.format_prediction
    item = {"image": "street.jpg", "detections": [("disc", 0.9123, [1.0, 2.5, 30.0, 40.0]),
                                                  ("square", 0.5, [0.0, 0.0, 8.0, 8.0])],
            "picture": "out/street.pred.png"}
    assert format_prediction(item) == ("street.jpg: disc 0.912 at [1.0, 2.5, 30.0, 40.0]; "
                                       "square 0.500 at [0.0, 0.0, 8.0, 8.0] -> out/street.pred.png")
    assert format_prediction({"image": "x.png", "detections": [], "picture": None}) == "x.png: no objects"
    assert format_metrics({"loss": 0.5, "map50": 0.25, "detections": [torch.zeros(0, 6)]}) == \
        "loss 0.5000, map50 0.2500"


def test_validation_detections_come_back_in_image_order_whatever_the_batch_order(tiny_shapes):
    task = DetectionTask(_config(batch_size=4), data=tiny_shapes)
    torch.manual_seed(0)
    model = task.build_model().eval()
    batches = list(task.val_data())
    with torch.inference_mode():
        outs = [task.validation_step(model, b) for b in batches]

    def total(parts):
        sums = {}
        for out in parts:
            for k, v in out.items():
                sums[k] = sums.get(k, [] if isinstance(v, list) else 0) + v
        return sums

    forward, backward = task.validation_end(total(outs)), task.validation_end(total(outs[::-1]))
    assert len(forward["detections"]) == len(tiny_shapes.val_images)
    assert all(torch.equal(a, b) for a, b in zip(forward["detections"], backward["detections"]))
    assert forward["map"] == backward["map"] and forward["loss"] == pytest.approx(backward["loss"])


def test_detect_options_are_checked_where_they_enter():
    for bad, message in [({"image_size": 16}, "--image-size must be at least 32, got 16"),
                         ({"nms_iou": float("nan")}, r"--nms-iou must be in \(0, 1\], got nan"),
                         ({"nms_iou": 0.0}, "--nms-iou"), ({"pictures": -1}, "--pictures")]:
        with pytest.raises(DivekitError, match=message):
            _config(**bad)
    with pytest.raises(DivekitError, match="--grid-size must be an integer of at least 2, got 1"):
        make_config(DetectConfig, {"model": "yolo_grid", "grid_size": 1})
    with pytest.raises(DivekitError, match="resnet18.*not a detector"):
        DetectionTask(DetectConfig(model="resnet18"))


def test_labels_with_a_class_outside_the_model_are_refused(tiny_shapes):
    bad = tiny_shapes.train_labels.clone()
    bad[5, 0, 0] = 7
    data = DetectionData(tiny_shapes.train_images, bad, tiny_shapes.val_images, tiny_shapes.val_labels,
                         tiny_shapes.classes, "shapes")
    with pytest.raises(DivekitError, match=r"train labels\[5, 0\] has class 7"):
        DetectionTask(_config(), data=data)


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
        DetectionTask(_config(), data=data)


def test_cli_refuses_a_banana_file_with_an_inverted_box(tmp_path, capsys):
    from divekit.cli import main

    _write_banana_split(tmp_path / "bananas_train", [("0.png", 0, 10, 20, 74, 84), ("1.png", 0, 90, 0, 60, 64)])
    _write_banana_split(tmp_path / "bananas_val", [("0.png", 0, 0, 0, 32, 32)])
    code = main(["train", "tiny_ssd", "--data", "banana", "--data-dir", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "train labels[1, 0]" in err and "x1 < x2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_resuming_a_detector_gives_the_weights_of_a_straight_run(tmp_path):
    tx, ty = make_shapes(16, 64, seed=5)
    vx, vy = make_shapes(4, 64, seed=6)
    data = DetectionData(tx, ty, vx, vy, ["square", "disc", "triangle"], "shapes")
    common = {"batch_size": 8, "pictures": 0}
    straight = Trainer(DetectionTask(_config(epochs=2, **common), data=data))  # no run directory
    straight.fit()
    train(DetectionTask(_config(epochs=1, out=str(tmp_path / "b"), **common), data=data))
    resumed = train(DetectionTask(_config(epochs=2, out=str(tmp_path / "b"), resume=True, **common),
                                  data=data))
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.final["val_map"] == straight.history[-1]["val_map"]
