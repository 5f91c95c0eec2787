"""Two-stage detectors (torchvision's Faster and Mask R-CNN behind divekit's Detector) and the
instance masks of the shapes dataset."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from divekit.data import load_dataset
from divekit.data.detection import SHAPE_CLASSES, SHAPE_COLOURS, DetectionData, make_shapes
from divekit.engine.run import load_run, make_config, train
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.models.rcnn import (
    detections_to_rows,
    labels_to_targets,
    load_state_file,
    targets_to_labels,
)
from divekit.tasks.detect import DetectConfig, DetectionTask


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 64 px scenes with masks; the second has its objects removed (an empty image)."""
    x, y, m = make_shapes(2, 64, seed=11, with_masks=True)
    y[1], m[1] = -1, 0
    assert bool((y[0, :, 0] >= 0).any())
    return x, y, m


# ----------------------------------------------------------------------------- shapes masks


def test_shape_masks_are_the_painted_pixels_with_the_label_box_as_extent():
    images, labels, masks = make_shapes(40, 64, seed=5, with_masks=True)
    assert masks.shape == (40, 3, 64, 64) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 1}
    checked = 0
    for img, rows, ms in zip(images, labels, masks):
        for (c, *box), mask in zip(rows.tolist(), ms):
            if c < 0:
                assert not bool(mask.any())
                continue
            ys, xs = mask.nonzero(as_tuple=True)
            extent = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert extent == [round(v * 64) for v in box]
            colour = torch.from_numpy(SHAPE_COLOURS[int(c)])[:, None]
            assert torch.equal(img[:, ys, xs], colour.expand(3, len(ys)))
            checked += 1
    assert checked > 20
    # objects never overlap, so every pixel belongs to at most one mask
    assert int(masks.sum(dim=1).max()) <= 1


def test_shape_masks_are_deterministic_and_leave_images_and_labels_unchanged():
    a = make_shapes(12, 48, seed=3, with_masks=True)
    b = make_shapes(12, 48, seed=3, with_masks=True)
    plain = make_shapes(12, 48, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(plain) == 2 and torch.equal(plain[0], a[0]) and torch.equal(plain[1], a[1])


def test_load_shapes_fills_masks_and_resizing_keeps_them_aligned():
    data = load_dataset("shapes", size=64, num_train=6, num_val=3)
    assert data.train_masks is not None and data.val_masks is not None
    assert data.train_masks.shape == (6, 3, 64, 64) and data.val_masks.shape == (3, 3, 64, 64)
    real = data.train_labels[..., 0] >= 0
    assert torch.equal(data.train_masks.flatten(2).any(-1), real)
    small = data.resized(32)
    assert small.train_masks.shape == (6, 3, 32, 32)


# ----------------------------------------------------------------------------- conversions


def test_labels_to_targets_and_back_on_random_labels_with_an_empty_image():
    g = torch.Generator().manual_seed(0)
    n, rows, h, w = 5, 4, 48, 80
    corners = torch.rand(n, rows, 2, 2, generator=g).sort(dim=2).values  # x1 < x2, y1 < y2
    labels = torch.cat([torch.randint(0, 3, (n, rows, 1), generator=g).float(),
                        corners[..., 0, 0:1], corners[..., 0, 1:2], corners[..., 1, 0:1], corners[..., 1, 1:2]],
                       dim=-1)
    counts = [0, 4, 2, 1, 3]  # image 0 has no objects
    for i, k in enumerate(counts):
        labels[i, k:] = -1
    masks = torch.randint(0, 2, (n, rows, h, w), generator=g, dtype=torch.uint8)
    targets = labels_to_targets(labels, (h, w), masks)
    assert len(targets) == n
    assert targets[0]["boxes"].shape == (0, 4) and targets[0]["labels"].shape == (0,)
    assert targets[0]["masks"].shape == (0, h, w)
    for i, (t, k) in enumerate(zip(targets, counts)):
        assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
        for j in range(k):  # brute force, row by row
            c, x1, y1, x2, y2 = labels[i, j].tolist()
            assert int(t["labels"][j]) == int(c) + 1
            assert torch.allclose(t["boxes"][j], torch.tensor([x1 * w, y1 * h, x2 * w, y2 * h]))
            assert torch.equal(t["masks"][j], masks[i, j])
    back = targets_to_labels(targets, (h, w), rows)
    assert torch.allclose(back, labels, atol=1e-6)
    assert bool((back[labels[..., 0] < 0] == -1).all())


def test_detections_become_sorted_normalised_rows_with_padding():
    found = [
        {"boxes": torch.tensor([[10.0, 0.0, 30.0, 20.0], [0.0, 5.0, 70.0, 45.0]]),
         "labels": torch.tensor([3, 1]), "scores": torch.tensor([0.2, 0.9])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    rows = detections_to_rows(found, (40, 64), k=3)
    assert rows.shape == (2, 3, 6)
    assert torch.allclose(rows[0, 0], torch.tensor([0, 0.9, 0, 5 / 40, 1.0, 1.0]))  # x2 70/64 clamped
    assert torch.allclose(rows[0, 1], torch.tensor([2, 0.2, 10 / 64, 0, 30 / 64, 20 / 40]))
    assert torch.equal(rows[0, 2], torch.tensor([-1.0, 0, 0, 0, 0, 0]))
    assert bool((rows[1, :, 0] == -1).all())


# ----------------------------------------------------------------------------- the models


def _check_rows(rows: torch.Tensor, n: int, num_classes: int) -> None:
    assert rows.dim() == 3 and rows.shape[0] == n and rows.shape[2] == 6
    assert torch.isfinite(rows).all()
    assert bool(((rows[..., 0] >= -1) & (rows[..., 0] <= num_classes - 1)).all())
    assert bool((rows[..., 0] == rows[..., 0].round()).all())
    assert bool(((rows[..., 1:] >= 0) & (rows[..., 1:] <= 1)).all())


def test_fasterrcnn_trains_detects_and_keeps_small_images_small(scenes):
    x, y, _ = scenes
    assert model_info("fasterrcnn_mobilenet").task == "detect"
    torch.manual_seed(0)
    model = create_model("fasterrcnn_mobilenet", num_classes=3, in_channels=3, image_size=64)
    assert not model.needs_masks
    images, _ = model.net.transform(list(x))
    assert images.image_sizes == [(64, 64), (64, 64)]  # no upscaling to torchvision's 800 px
    sizes = [s for level in model.net.rpn.anchor_generator.sizes for s in level]
    assert max(sizes) == 64 and min(sizes) == 4
    model.train()
    loss, metrics = model(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    parts = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(metrics) == {"loss"} | parts
    assert torch.allclose(sum(metrics[k] for k in parts), metrics["loss"])
    assert all(not v.requires_grad for v in metrics.values())
    loss.backward()
    assert model.net.backbone.body["0"][0].weight.grad is not None
    rows = model.detect(x, nms_iou=0.3)
    _check_rows(rows, 2, 3)
    assert model.training and model.net.roi_heads.nms_thresh == 0.5  # restored
    with pytest.raises(DivekitError, match="needs labels"):
        model(x)


def test_eval_loss_leaves_batchnorm_modes_and_the_rng_alone(scenes):
    x, y, _ = scenes
    torch.manual_seed(1)
    model = create_model("fasterrcnn_mobilenet", num_classes=3, image_size=64)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    backbone = set(model.net.backbone.modules())
    assert norms and all(m in backbone for m in norms)  # why the eval loss is sound
    model.train()
    model(x, y)[0].backward()  # running statistics away from their initial values
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    rng = torch.get_rng_state()
    with torch.no_grad():
        loss1, metrics = model(x, y)
        loss2, _ = model(x, y)
    assert torch.isfinite(loss1) and torch.equal(loss1, loss2)  # deterministic
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert not any(m.training for m in model.modules())
    assert set(metrics) >= {"loss", "loss_classifier", "loss_objectness"}
    _check_rows(model.detect(x), 2, 3)
    outputs = model(x)  # eval, no labels: torchvision's own detections
    assert isinstance(outputs, list) and set(outputs[0]) == {"boxes", "labels", "scores"}


def test_maskrcnn_learns_masks_and_segments(scenes):
    x, y, m = scenes
    torch.manual_seed(0)
    model = create_model("maskrcnn", num_classes=3, image_size=64, box_detections_per_img=8)
    assert model.needs_masks and model.num_classes == 3
    model.train()
    loss, metrics = model(x, y, m)
    assert torch.isfinite(loss) and "loss_mask" in metrics
    assert 0.5 < float(metrics["loss_mask"]) < 1.0  # ≈ ln 2: the logits layer starts near zero
    with pytest.raises(DivekitError, match="needs masks of shape"):
        model(x, y)
    model.eval()
    rows = model.detect(x)
    _check_rows(rows, 2, 3)
    rows2, masks = model.segment(x)
    assert torch.equal(rows, rows2)
    assert masks.shape == (2, rows.shape[1], 64, 64) and masks.dtype == torch.bool
    assert not bool(masks[rows[..., 0] < 0].any())


def test_bad_arguments_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DivekitError, match="in_channels=3"):
        create_model("fasterrcnn_mobilenet", num_classes=2, in_channels=1)
    with pytest.raises(DivekitError, match="num_classes >= 1"):
        create_model("maskrcnn", num_classes=0)
    with pytest.raises(DivekitError, match="unknown weights 'IMAGENET_V9'"):
        create_model("fasterrcnn_mobilenet", num_classes=2, weights="IMAGENET_V9")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(DivekitError, match="does not download"):
        create_model("fasterrcnn_mobilenet", num_classes=2, weights="DEFAULT")
    with pytest.raises(DivekitError, match="does not exist"):
        create_model("fasterrcnn_mobilenet", num_classes=2, weights=str(tmp_path / "none.pth"))
    model = create_model("fasterrcnn_mobilenet", num_classes=2, image_size=64)
    with pytest.raises(DivekitError, match=r"\(N, 3, H, W\)"):
        model.detect(torch.rand(3, 64, 64))
    with pytest.raises(DivekitError, match="has no mask branch"):
        model.segment(torch.rand(1, 3, 64, 64))


def test_weights_file_loads_all_but_the_class_layers(tmp_path):
    torch.manual_seed(2)
    source = create_model("fasterrcnn_mobilenet", num_classes=5, image_size=64)
    path = tmp_path / "coco-like.pth"
    torch.save(source.net.state_dict(), path)
    torch.manual_seed(3)
    model = create_model("fasterrcnn_mobilenet", num_classes=2, image_size=64, weights=str(path))
    got, want = model.net.state_dict(), source.net.state_dict()
    assert torch.equal(got["backbone.body.0.0.weight"], want["backbone.body.0.0.weight"])
    assert torch.equal(got["rpn.head.conv.0.0.weight"], want["rpn.head.conv.0.0.weight"])
    assert got["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # fresh, 2 classes + background
    bad = {k: v for k, v in want.items() if not k.startswith("rpn.")}
    torch.save(bad, tmp_path / "partial.pth")
    with pytest.raises(DivekitError, match=r"rpn\.head.* is missing"):
        load_state_file(model.net, tmp_path / "partial.pth")


# ----------------------------------------------------------------------------- through the task


def _tiny_data(num_train: int, num_val: int, size: int) -> DetectionData:
    tx, ty, tm = make_shapes(num_train, size, seed=21, with_masks=True)
    vx, vy, vm = make_shapes(num_val, size, seed=22, with_masks=True)
    return DetectionData(tx, ty, vx, vy, list(SHAPE_CLASSES), "shapes", tm, vm)


def test_a_few_steps_lower_the_fasterrcnn_loss(scenes):
    x, y, _ = scenes
    torch.manual_seed(0)
    model = create_model("fasterrcnn_mobilenet", num_classes=3, image_size=64).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def _through_the_task(tmp_path, data: DetectionData, **values):
    """Train through the detection task, the model's recipe (Adam) filling in the optimizer."""
    cfg = make_config(DetectConfig, {"image_size": 64, "out": str(tmp_path / "run"), "quiet": True,
                                     "threads": 1, "pictures": 0, "device": "cpu", **values})
    assert cfg.optimizer == "adam" and cfg.weight_decay == 0.0
    return train(DetectionTask(cfg, data=data))


def test_fasterrcnn_runs_through_the_task(tmp_path):
    result = _through_the_task(tmp_path, _tiny_data(8, 2, 64), model="fasterrcnn_mobilenet", epochs=1,
                               batch_size=8)
    final = result.final
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["val_loss"])
    assert 0 <= final["val_map50"] <= 1 and "val_loss_objectness" in final
    model = load_run(result.run_dir).model
    _check_rows(model.detect(_tiny_data(1, 1, 64).val_images), 1, 3)


@pytest.mark.slow
def test_fasterrcnn_training_through_the_task_lowers_the_loss(tmp_path):
    result = _through_the_task(tmp_path, _tiny_data(16, 4, 64), model="fasterrcnn_mobilenet", epochs=2,
                               batch_size=8, pictures=1)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert 0 <= result.final["val_map50"] <= 1
    assert (result.run_dir / "pictures" / "val-epoch-0002.png").is_file()


@pytest.mark.slow
def test_maskrcnn_training_through_the_task_lowers_the_loss(tmp_path):
    result = _through_the_task(tmp_path, _tiny_data(8, 2, 64), model="maskrcnn", epochs=3, batch_size=2)
    assert result.history[0]["lr"] <= 1e-4  # Mask R-CNN's recipe: the smaller step
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert "val_loss_mask" in result.final and 0 <= result.final["val_map50"] <= 1


def test_maskrcnn_needs_a_dataset_with_masks():
    tx, ty = make_shapes(4, 64, seed=1)
    data = DetectionData(tx, ty, tx, ty, list(SHAPE_CLASSES), "banana-like")
    with pytest.raises(DivekitError, match="maskrcnn' learns instance masks.*has none"):
        DetectionTask(make_config(DetectConfig, {"model": "maskrcnn", "image_size": 64}), data=data)
