"""The single-stage family beyond SSD: the YOLO v1 grid detector and CenterNet (objects as points).

Targets are checked by hand on tiny examples, the losses against loops written here from the
papers' formulas, decoding against torchvision's NMS image by image, and both models learn:
they over-fit a fixed batch and train through the detection task.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import Tensor

from divekit.data.detection import DetectionData, make_shapes
from divekit.engine.run import make_config, train
from divekit.errors import DivekitError
from divekit.models import create_model, model_info
from divekit.models.centernet import centernet_targets, focal_loss
from divekit.models.yolo import YoloGrid, pack_detections, responsible_boxes, yolo_targets
from divekit.tasks.detect import DetectConfig, DetectionTask

MODELS = ["yolo_grid", "centernet_tiny"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_shapes() -> DetectionData:
    tx, ty = make_shapes(48, 64, seed=1)
    vx, vy = make_shapes(12, 64, seed=2)
    return DetectionData(tx, ty, vx, vy, ["square", "disc", "triangle"], "shapes")


def _labels(rows: list[list[list[float]]], g: int) -> Tensor:
    """Pad per-image rows ``[class, x1, y1, x2, y2]`` to ``(N, g, 5)`` with -1 rows."""
    out = torch.full((len(rows), g, 5), -1.0)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out


def _build(name: str, num_classes: int, size: int):
    """As the task builds a detector: ``image_size`` only for builders that take it (YOLO's grid)."""
    extra = {"image_size": size} if name == "yolo_grid" else {}
    return create_model(name, num_classes=num_classes, in_channels=3, **extra)


def _random_labels(n: int, g: int, num_classes: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, g, 2, generator=gen) * 0.7
    wh = torch.rand(n, g, 2, generator=gen) * 0.28 + 0.02
    cls = torch.randint(0, num_classes, (n, g, 1), generator=gen).float()
    labels = torch.cat((cls, xy, xy + wh), dim=-1)
    labels[torch.rand(n, g, generator=gen) < 0.3] = -1  # some padding rows
    return labels


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [64, 96, 128])
def test_output_and_detection_shapes(size):
    assert all(model_info(m).task == "detect" for m in MODELS)
    x = torch.rand(2, 3, size, size)
    yolo = create_model("yolo_grid", num_classes=3, in_channels=3, image_size=size).eval()
    s = size // 16
    assert yolo(x).shape == (2, s, s, 2 * 5 + 3)
    centernet = create_model("centernet_tiny", num_classes=3, in_channels=3).eval()
    heat, wh, offset = centernet(x)
    assert heat.shape == (2, 3, size // 4, size // 4)
    assert wh.shape == offset.shape == (2, 2, size // 4, size // 4)
    with torch.no_grad():
        for model in (yolo, centernet):
            assert model.detect(x).shape == (2, 100, 6)


def test_grid_and_boxes_are_constructor_parameters():
    model = create_model("yolo_grid", num_classes=2, image_size=96, grid_size=4, boxes_per_cell=3)
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 4, 4, 3 * 5 + 2)
    assert create_model("yolo_grid", num_classes=1, image_size=32).grid_size == 2


# ----------------------------------------------------------------------------- YOLO targets and loss


def test_yolo_targets_pick_the_cell_of_the_centre_and_the_first_object_keeps_a_shared_cell():
    # 4×4 grid (cells 0.25 wide). Image 0: centre (0.375, 0.725) → column 1, row 2.
    # Image 1: two centres in cell (row 0, col 3); the first listed keeps it. Image 2: nothing.
    labels = _labels([[[2, 0.30, 0.55, 0.45, 0.90]],
                      [[1, 0.80, 0.05, 0.90, 0.15], [0, 0.76, 0.01, 0.99, 0.24]],
                      []], g=2)
    has_object, boxes, classes = yolo_targets(labels, 4)
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, 2, 1] = expected[1, 0, 3] = True
    assert torch.equal(has_object, expected)
    assert torch.allclose(boxes[0, 2, 1], torch.tensor([0.30, 0.55, 0.45, 0.90]))
    assert torch.allclose(boxes[1, 0, 3], torch.tensor([0.80, 0.05, 0.90, 0.15]))
    assert classes[0, 2, 1] == 2 and classes[1, 0, 3] == 1
    assert int((classes >= 0).sum()) == 2

    # of the cell's two predictions, the second overlaps the truth better: it is responsible
    preds = torch.zeros(3, 4, 4, 2, 4)
    preds[0, 2, 1, 0] = torch.tensor([0.0, 0.0, 0.1, 0.1])
    preds[0, 2, 1, 1] = torch.tensor([0.31, 0.56, 0.44, 0.88])
    best, ious = responsible_boxes(preds, boxes)
    assert best[0, 2, 1] == 1 and ious[0, 2, 1, 0] == 0
    assert float(ious[0, 2, 1, 1]) == pytest.approx((0.13 * 0.32) / (0.15 * 0.35))  # inside the truth


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _yolo_loss_by_hand(out: Tensor, labels: Tensor, b: int, c: int) -> float:
    """The YOLO v1 loss (cross-entropy class term, IoU confidence target), one cell at a time."""
    n, s = out.shape[0], out.shape[1]
    total = 0.0
    for i in range(n):
        owner: dict[tuple[int, int], list[float]] = {}
        for row in labels[i].tolist():
            if row[0] < 0:
                continue
            cx, cy = (row[1] + row[3]) / 2, (row[2] + row[4]) / 2
            cell = (min(int(cy * s), s - 1), min(int(cx * s), s - 1))
            owner.setdefault(cell, row)  # the first listed object keeps the cell
        for r in range(s):
            for col in range(s):
                v = out[i, r, col].tolist()
                preds = []
                for k in range(b):
                    x, y, sw, sh, conf = (_sig(t) for t in v[5 * k: 5 * k + 5])
                    cx, cy, w, h = (col + x) / s, (r + y) / s, sw * sw, sh * sh
                    preds.append((x, y, sw, sh, conf, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
                truth = owner.get((r, col))
                best = -1
                if truth is not None:
                    ious = [_iou(p[5], truth[1:]) for p in preds]
                    best = max(range(b), key=lambda k: (ious[k], -k))
                    x, y, sw, sh, conf, _ = preds[best]
                    tcx, tcy = (truth[1] + truth[3]) / 2 * s - col, (truth[2] + truth[4]) / 2 * s - r
                    tw, th = truth[3] - truth[1], truth[4] - truth[2]
                    total += 5 * ((x - tcx) ** 2 + (y - tcy) ** 2 + (sw - math.sqrt(tw)) ** 2
                                  + (sh - math.sqrt(th)) ** 2)
                    total += (conf - ious[best]) ** 2
                    logits = v[5 * b:]
                    log_z = math.log(sum(math.exp(t) for t in logits))
                    total += log_z - logits[int(truth[0])]
                for k in range(b):
                    if k != best:
                        total += 0.5 * preds[k][4] ** 2
    return total / n


def test_yolo_loss_equals_the_papers_sum_cell_by_cell():
    model = YoloGrid(num_classes=3, grid_size=3, boxes_per_cell=2)
    gen = torch.Generator().manual_seed(0)
    for seed in range(3):
        out = torch.randn(3, 3, 3, 2 * 5 + 3, generator=gen)
        labels = _random_labels(3, 4, 3, seed)
        loss, metrics = model.compute_loss(out, labels)
        assert loss.item() == pytest.approx(_yolo_loss_by_hand(out, labels, 2, 3), rel=1e-5)
        parts = sum(float(metrics[k]) for k in ("coord", "obj", "noobj", "cls"))
        assert parts == pytest.approx(float(metrics["loss"]), rel=1e-6)


# ----------------------------------------------------------------------------- CenterNet targets and loss


def test_centernet_gaussian_peaks_at_the_centre_pixel():
    # 16×16 output map (a 64-pixel image at stride 4). The box [0.25, 0.25, 0.5, 0.5] is 4×4
    # output pixels centred on (6, 6) exactly. CornerNet's radius for 4×4 at IoU 0.7 is
    # min(7.63, 14.69, 1.09) → r = 1, σ = (2r + 1) / 6 = 0.5: neighbours exp(-1 / (2σ²)) = e⁻²,
    # diagonal e⁻⁴, and nothing two pixels away. The second box's centre (11.2, 3.6) is
    # rounded down to (11, 3) with offset (0.2, 0.6); its size is 3.2 × 2.4 output pixels.
    labels = _labels([[[1, 0.25, 0.25, 0.5, 0.5], [0, 0.6, 0.15, 0.8, 0.3]], []], g=2)
    heat, index, size, offset, mask = centernet_targets(labels, 2, 16, 16)
    assert heat.shape == (2, 2, 16, 16) and bool(mask[0].all()) and not bool(mask[1].any())
    h = heat[0, 1]
    assert h[6, 6] == 1 and int((h == 1).sum()) == 1
    assert float(h[6, 7]) == pytest.approx(math.exp(-2)) and float(h[5, 6]) == pytest.approx(math.exp(-2))
    assert float(h[7, 7]) == pytest.approx(math.exp(-4))
    assert float(h[6, 8]) == 0 and float(h[4, 6]) == 0
    assert int((h > 0).sum()) == 9
    assert heat[0, 0, 3, 11] == 1 and int((heat[0, 0] == 1).sum()) == 1
    assert index[0].tolist() == [6 * 16 + 6, 3 * 16 + 11]
    assert torch.allclose(size[0], torch.tensor([[4.0, 4.0], [3.2, 2.4]]), atol=1e-5)
    assert torch.allclose(offset[0], torch.tensor([[0.0, 0.0], [0.2, 0.6]]), atol=1e-5)
    assert heat[1].sum() == 0 and size[1].abs().sum() == 0


def test_overlapping_gaussians_of_a_class_take_the_maximum():
    labels = _labels([[[0, 0.2, 0.2, 0.6, 0.6], [0, 0.3, 0.3, 0.7, 0.7]]], g=2)
    heat, *_ = centernet_targets(labels, 1, 16, 16)
    one = [centernet_targets(labels[:, j:j + 1], 1, 16, 16)[0] for j in range(2)]
    assert torch.equal(heat, torch.maximum(*one))


def _focal_by_hand(logits: Tensor, heat: Tensor) -> float:
    total, num_pos = 0.0, 0
    for z, y in zip(logits.flatten().tolist(), heat.flatten().tolist()):
        p = 1 / (1 + math.exp(-z))
        if y == 1:
            total += (1 - p) ** 2 * math.log(p)
            num_pos += 1
        else:
            total += (1 - y) ** 4 * p ** 2 * math.log(1 - p)
    return -total / max(num_pos, 1)


def test_focal_loss_equals_a_loop_over_pixels():
    gen = torch.Generator().manual_seed(3)
    for trial in range(3):
        logits = torch.randn(2, 3, 6, 5, generator=gen) * 2
        heat = torch.rand(2, 3, 6, 5, generator=gen) ** 3
        if trial < 2:  # some peaks; the last trial has none (the loss is then the negative part)
            heat.view(-1)[torch.randperm(heat.numel(), generator=gen)[:4]] = 1
        assert focal_loss(logits, heat).item() == pytest.approx(_focal_by_hand(logits, heat), rel=1e-5)


# ----------------------------------------------------------------------------- decoding


def _check_rows(rows: Tensor, num_classes: int, k: int) -> None:
    assert rows.shape[1:] == (k, 6) and bool(torch.isfinite(rows).all())
    real = rows[..., 0] >= 0
    assert bool((rows[..., 0][real] < num_classes).all())
    assert bool((rows[..., 0] == rows[..., 0].round()).all())
    assert bool((rows[..., 0][~real] == -1).all()) and bool((rows[..., 1:][~real] == 0).all())
    kept = rows[real]
    assert bool(((kept[:, 1:] >= 0) & (kept[:, 1:] <= 1)).all())
    assert bool((kept[:, 4] >= kept[:, 2]).all() and (kept[:, 5] >= kept[:, 3]).all())
    for r in rows:  # by decreasing score
        assert bool((r[:-1, 1] >= r[1:, 1]).all())


@pytest.mark.parametrize("name", MODELS)
def test_decode_gives_rows_in_the_image_with_valid_classes_and_padding(name):
    torch.manual_seed(0)
    model = _build(name, 3, 64).eval()
    with torch.no_grad():
        outputs = model(torch.rand(3, 3, 64, 64))
        rows = model.decode(outputs, nms_iou=0.5)
        all_rows = model.decode(outputs, nms_iou=1.0)
    for r in (rows, all_rows):
        _check_rows(r, 3, 100)
    assert bool(((rows[..., 0] >= 0).sum(1) <= (all_rows[..., 0] >= 0).sum(1)).all())
    for r in rows:  # after NMS no two kept boxes of one class overlap by more than 0.5
        kept = r[r[:, 0] >= 0]
        same = kept[:, 0, None] == kept[None, :, 0]
        iou = torchvision.ops.box_iou(kept[:, 2:], kept[:, 2:])
        assert not bool((same & (iou > 0.5 + 1e-6)).fill_diagonal_(False).any())


def test_pack_detections_matches_per_image_batched_nms():
    gen = torch.Generator().manual_seed(5)
    n, m, c, k = 3, 60, 4, 25
    xy = torch.rand(n, m, 2, generator=gen) * 1.1 - 0.05
    boxes = torch.cat((xy, xy + torch.rand(n, m, 2, generator=gen) * 0.3), -1)
    scores = torch.rand(n, m, generator=gen)
    classes = torch.randint(0, c, (n, m), generator=gen)
    rows = pack_detections(boxes, scores, classes, c, 0.4, k, min_score=0.1)
    _check_rows(rows, c, k)
    for i in range(n):
        ok = scores[i] > 0.1
        clipped = boxes[i][ok].clamp(0, 1)
        kept = torchvision.ops.batched_nms(clipped, scores[i][ok], classes[i][ok], 0.4)[:k]
        expected = torch.cat((classes[i][ok][kept, None].float(), scores[i][ok][kept, None], clipped[kept]), 1)
        assert torch.allclose(rows[i, : len(kept)], expected)
        assert bool((rows[i, len(kept):, 0] == -1).all())


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", MODELS)
def test_images_without_objects_train_without_nan(name):
    torch.manual_seed(0)
    model = _build(name, 2, 64)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, labels = torch.rand(2, 3, 64, 64), torch.full((2, 3, 5), -1.0)
    for _ in range(2):
        loss, metrics = model(x, labels)
        opt.zero_grad()
        loss.backward()
        assert bool(torch.isfinite(loss)) and all(bool(torch.isfinite(v)) for v in metrics.values())
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_overfits_a_fixed_batch(name):
    torch.manual_seed(0)
    x, labels = make_shapes(4, 64, seed=7)
    model = _build(name, 3, 64)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    losses = []
    for _ in range(40):
        loss, _ = model(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_short_training_through_the_task_lowers_the_loss(tmp_path, tiny_shapes, name):
    cfg = make_config(DetectConfig, {"model": name, "epochs": 3, "batch_size": 16, "image_size": 64,
                                     "optimizer": "adam", "lr": 2e-3, "out": str(tmp_path / "run"),
                                     "quiet": True, "threads": 1, "pictures": 1})
    result = train(DetectionTask(cfg, data=tiny_shapes))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert 0 <= result.final["val_map50"] <= 1
    assert (result.run_dir / "pictures" / "val-epoch-0003.png").is_file()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    with pytest.raises(DivekitError, match="grid_size 1"):
        create_model("yolo_grid", num_classes=2, grid_size=1)
    with pytest.raises(DivekitError, match="num_classes >= 1"):
        create_model("centernet_tiny", num_classes=0)
    for name in MODELS:
        model = _build(name, 2, 64)
        with pytest.raises(DivekitError, match=r"\(N, 3, H, W\)"):
            model(torch.rand(1, 1, 64, 64))
        bad = _labels([[[0, 0.1, 0.1, 0.3, 0.3]], [[0, 0.1, 0.1, 0.3, 0.3], [5, 0.5, 0.5, 0.7, 0.7]]], g=2)
        with pytest.raises(DivekitError, match=r"labels\[1, 1\] has class 5"):
            model(torch.rand(2, 3, 64, 64), bad)
        with pytest.raises(DivekitError, match="labels must be"):
            model(torch.rand(2, 3, 64, 64), torch.zeros(2, 4))
