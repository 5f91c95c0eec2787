"""Mean average precision: hand-computed cases, a brute-force check, torchmetrics and pycocotools parity."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from divekit.errors import DivekitError
from divekit.ops.map import (
    COCO_IOU_THRESHOLDS,
    COCO_RECALL_THRESHOLDS,
    average_precision,
    coco_mean_average_precision,
    match_detections,
    mean_average_precision,
)


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



def _hard_scene(g: torch.Generator, num_classes: int = 3) -> tuple[dict, dict]:
    """A scene built to hit pycocotools' corner cases.

    Integer coordinates on a small grid (so IoUs tie exactly and land exactly on thresholds),
    duplicated truths and detections, zero-width boxes, tied scores, empty images, detections
    of a class that has no truth anywhere (class ``num_classes``), and sometimes more than 100
    detections in one image (the per-image cut).
    """
    def ints(n: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=g).float()

    kind = int(torch.randint(0, 6, (1,), generator=g))
    n_true = 0 if kind == 0 else int(torch.randint(0, 7, (1,), generator=g))
    xy = torch.stack([ints(n_true, 20), ints(n_true, 20)], 1)
    wh = torch.stack([ints(n_true, 8), ints(n_true, 8)], 1) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(0, num_classes, (n_true,), generator=g)
    if n_true >= 2:  # a duplicated truth
        boxes, labels = torch.cat([boxes, boxes[:1]]), torch.cat([labels, labels[:1]])
    truths = {"boxes": boxes, "labels": labels}

    n_rand = int(torch.randint(0, 6, (1,), generator=g)) + (110 if kind == 5 else 0)
    jitter = boxes + torch.randint(-2, 3, boxes.shape, generator=g).float()
    rxy = torch.stack([ints(n_rand, 24), ints(n_rand, 24)], 1)
    rand_boxes = torch.cat([rxy, rxy + torch.stack([ints(n_rand, 8), ints(n_rand, 8)], 1) + 1], 1)
    det = torch.cat([jitter, boxes[:2], rand_boxes])  # jittered truths, exact copies, random boxes
    det = torch.cat([torch.minimum(det[:, :2], det[:, 2:]), torch.maximum(det[:, :2], det[:, 2:])], 1)
    if len(det) > 3:
        det[3, 2] = det[3, 0]  # a zero-width box
    det_labels = torch.cat([labels, labels[:2], torch.randint(0, num_classes + 1, (n_rand,), generator=g)])
    if kind == 1 and len(det):  # a duplicated detection
        det, det_labels = torch.cat([det, det[-1:]]), torch.cat([det_labels, det_labels[-1:]])
    if kind in (2, 3):  # heavy score ties
        scores = torch.randint(0, 3, (len(det),), generator=g).float() / 2
    else:
        scores = torch.rand(len(det), generator=g)
    if kind == 4:  # an image with truths and no detections at all
        det, scores, det_labels = det[:0], scores[:0], det_labels[:0]
    return {"boxes": det, "scores": scores, "labels": det_labels}, truths


def _scene_sets(seed: int, count: int, images: int = 8, hard: bool = True):
    g = torch.Generator().manual_seed(seed)
    make = _hard_scene if hard else _random_scene
    for _ in range(count):
        scenes = [make(g) for _ in range(images)]
        yield [p for p, _ in scenes], [t for _, t in scenes]


def _torchmetrics(preds, targets, **kwargs) -> dict:
    detection = pytest.importorskip("torchmetrics.detection")
    pytest.importorskip("pycocotools")
    metric = detection.MeanAveragePrecision(class_metrics=True, **kwargs)
    metric.warn_on_many_detections = False  # the >100 detections per image are on purpose
    metric.update(preds, targets)
    out = metric.compute()
    per_class = {c: ap for c, ap in zip(out["classes"].tolist(), out["map_per_class"].tolist()) if ap >= 0}
    return {"map": float(out["map"]), "map_50": float(out["map_50"]), "map_75": float(out["map_75"]),
            "per_class": per_class}


@pytest.mark.parametrize("hard", [False, True], ids=["random", "corner-cases"])
def test_parity_with_torchmetrics_map50(hard):
    # 12 sets of 8 scenes each way; the earlier version was 2e-3 off on 1 of 5 plain random sets
    # (a recall of exactly 1/5 against torchmetrics' float32 0.2 recall threshold).
    for preds, targets in _scene_sets(1, 12, hard=hard):
        theirs = _torchmetrics(preds, targets, iou_thresholds=[0.5])
        ours = mean_average_precision(preds, targets, 0.5, interpolation="coco")
        if not theirs["per_class"]:
            assert math.isnan(ours["map"]) and ours["per_class"] == {}
            continue
        assert ours["map"] == pytest.approx(theirs["map"], abs=1e-6)
        assert set(ours["per_class"]) == set(theirs["per_class"])
        for c, ap in theirs["per_class"].items():
            assert ours["per_class"][c] == pytest.approx(ap, abs=1e-6)


@pytest.mark.parametrize("hard", [False, True], ids=["random", "corner-cases"])
def test_coco_summary_equals_torchmetrics_default_thresholds(hard):
    for preds, targets in _scene_sets(2, 12, hard=hard):
        theirs = _torchmetrics(preds, targets)
        ours = coco_mean_average_precision(preds, targets)
        if not theirs["per_class"]:
            assert math.isnan(ours["map"])
            continue
        for key in ("map", "map_50", "map_75"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
        assert set(ours["per_class"]) == set(theirs["per_class"])
        for c, ap in theirs["per_class"].items():
            assert ours["per_class"][c] == pytest.approx(ap, abs=1e-6)
        # the one-threshold function agrees with the summary's columns
        single = mean_average_precision(preds, targets, COCO_IOU_THRESHOLDS[5], interpolation="coco")
        assert single["map"] == pytest.approx(ours["per_threshold"][5], abs=1e-12)


def _pycocotools_eval(preds, targets):
    """Plain pycocotools ``COCOeval`` with its own default parameters; precision ``(T, R, K)``."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def coco(items, with_scores):
        anns = []
        for i, item in enumerate(items):
            for k, (box, label) in enumerate(zip(item["boxes"].tolist(), item["labels"].tolist())):
                x1, y1, x2, y2 = box
                ann = {"id": len(anns) + 1, "image_id": i, "category_id": label, "iscrowd": 0,
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                if with_scores:
                    ann["score"] = float(item["scores"][k])
                anns.append(ann)
        classes = sorted({int(c) for t in preds + targets for c in t["labels"].tolist()})
        out = COCO()
        out.dataset = {"images": [{"id": i} for i in range(len(items))], "annotations": anns,
                       "categories": [{"id": c} for c in classes]}
        with contextlib.redirect_stdout(io.StringIO()):
            out.createIndex()
        return out, classes

    truth, classes = coco(targets, False)
    dets, _ = coco(preds, True)
    evaluator = COCOeval(truth, dets, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 2]  # area "all", maxDets 100
    return precision, classes, evaluator.params, np


def test_parity_with_pycocotools_own_default_thresholds():
    # pycocotools' defaults are float64 linspaces (torchmetrics passes float32 ones instead);
    # with those passed in, every class's AP at every IoU threshold matches.
    for preds, targets in _scene_sets(3, 10, hard=True):
        precision, classes, params, np = _pycocotools_eval(preds, targets)
        ours = coco_mean_average_precision(preds, targets, iou_thresholds=params.iouThrs.tolist(),
                                           recall_thresholds=params.recThrs.tolist())
        present = [k for k in range(len(classes)) if precision[0, 0, k] > -1]
        assert sorted(ours["per_class"]) == [classes[k] for k in present]
        for k in present:
            assert ours["per_class"][classes[k]] == pytest.approx(float(precision[:, :, k].mean()), abs=1e-9)
        for t, value in enumerate(ours["per_threshold"]):
            assert value == pytest.approx(float(precision[t][:, present].mean()), abs=1e-9)


def test_recall_reaches_a_float32_threshold_only_when_above_it():
    # 5 truths, ranked TP, TP, TP, FP: recall reaches exactly 3/5 = 0.6 with precision 1, which is
    # below torchmetrics' threshold float32(0.6) = 0.6000000238: only the 60 thresholds 0..0.59
    # sample precision 1. With the exact decimals, 0.6 is reached too: 61 of 101.
    scores, flags = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, True, True, False])
    assert COCO_RECALL_THRESHOLDS[60] > 0.6
    assert average_precision(scores, flags, 5, "coco") == pytest.approx(60 / 101)
    exact = [i / 100 for i in range(101)]
    assert average_precision(scores, flags, 5, "coco", recall_thresholds=exact) == pytest.approx(61 / 101)


def test_equal_iou_goes_to_the_later_truth_as_in_pycocotools():
    # Detection 0 overlaps truths 0 and 1 equally (IoU 1/3 each); pycocotools gives it truth 1,
    # which leaves truth 0 for detection 1: two TPs. Taking the first truth would leave one.
    truths = torch.tensor([_box(0, 0, 2, 2), _box(2, 0, 4, 2)])
    dets = torch.tensor([_box(1, 0, 3, 2), _box(0, 0, 2, 2)])
    flags = match_detections(dets, torch.tensor([0.9, 0.8]), truths, 0.3)
    assert flags.tolist() == [True, True]
    assert match_detections(dets, torch.tensor([0.9, 0.8]), truths, 0.5).tolist() == [False, True]
    # IoU exactly at the threshold counts (≥), and a threshold of 1 needs a perfect overlap
    assert match_detections(dets[:1], torch.tensor([0.9]), truths[:1], 1 / 3).tolist() == [True]
    assert match_detections(truths[:1], torch.tensor([0.9]), truths[:1], 1.0).tolist() == [True]


def test_per_image_cut_to_max_detections_happens_before_matching():
    # 101 detections in one image: the lowest-scoring one is the only TP and it is cut at 100.
    truth = {"boxes": torch.tensor([_box(0, 0, 10, 10)]), "labels": torch.tensor([0])}
    boxes = torch.cat([torch.tensor([_box(50, 50, 60, 60)]).repeat(100, 1), truth["boxes"]])
    scores = torch.cat([torch.linspace(1.0, 0.5, 100), torch.tensor([0.1])])
    preds = {"boxes": boxes, "scores": scores, "labels": torch.zeros(101, dtype=torch.long)}
    assert mean_average_precision([preds], [truth], interpolation="coco")["map"] == 0.0
    assert mean_average_precision([preds], [truth], interpolation="coco", max_detections=101)["map"] > 0
    assert mean_average_precision([preds], [truth])["map"] == pytest.approx(1 / 101)  # VOC: no cut


def test_truths_outside_coco_area_range_are_ignored_like_torchmetrics():
    # A truth of side 2e5 has area 4e10 > 1e10: ignored, and the detection on it counts neither way.
    big = _box(0, 0, 2e5, 2e5)
    targets = [{"boxes": torch.tensor([big, _box(0, 0, 10, 10)]), "labels": torch.tensor([0, 0])},
               {"boxes": torch.tensor([big]), "labels": torch.tensor([1])}]
    preds = [{"boxes": torch.tensor([big, _box(0, 0, 10, 10), _box(1e5, 0, 3e5, 2e5)]),
              "scores": torch.tensor([0.9, 0.5, 0.95]), "labels": torch.tensor([0, 0, 0])},
             {"boxes": torch.tensor([big]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    ours = coco_mean_average_precision(preds, targets)
    assert ours["per_class"] == {0: pytest.approx(1.0)}  # class 1 has only an ignored truth
    theirs = _torchmetrics(preds, targets)
    assert ours["map"] == pytest.approx(theirs["map"], abs=1e-6)
    assert theirs["per_class"] == {0: pytest.approx(1.0)}


def test_coco_summary_by_hand():
    # One truth, one detection with IoU 0.72: a TP at thresholds 0.50..0.70 (5 of 10), AP 1 there.
    truth = {"boxes": torch.tensor([_box(0, 0, 10, 10)]), "labels": torch.tensor([3])}
    pred = {"boxes": torch.tensor([_box(0, 0, 10, 7.2)]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([3])}
    out = coco_mean_average_precision([pred], [truth])
    assert out["per_threshold"] == pytest.approx([1.0] * 5 + [0.0] * 5)  # precision 1 / (1 + eps)
    assert (out["map"], out["map_50"], out["map_75"]) == pytest.approx((0.5, 1.0, 0.0))
    assert out["per_class"] == {3: pytest.approx(0.5)}
    assert math.isnan(coco_mean_average_precision([pred], [truth], iou_thresholds=[0.6])["map_50"])


def test_backwards_compatible_call_and_bad_input():
    preds, targets = next(_scene_sets(4, 1, hard=False))
    assert mean_average_precision(preds, targets, 0.5)["map"] == mean_average_precision(
        preds, targets, iou_threshold=0.5, interpolation="all")["map"]
    with pytest.raises(DivekitError, match=r"preds\[0\]\['boxes'\]\[1\] .*x2 < x1"):
        mean_average_precision([{"boxes": torch.tensor([_box(0, 0, 1, 1), _box(2, 0, 1, 1)]),
                                 "scores": torch.ones(2), "labels": torch.zeros(2, dtype=torch.long)}],
                               [targets[0]])
    with pytest.raises(DivekitError, match=r"targets\[0\]\['labels'\] must be integer"):
        mean_average_precision([preds[0]], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(DivekitError, match=r"preds\[0\]\['scores'\]\[0\] = nan"):
        mean_average_precision([{"boxes": torch.tensor([_box(0, 0, 1, 1)]), "scores": torch.tensor([math.nan]),
                                 "labels": torch.tensor([0])}], [targets[0]])
    with pytest.raises(DivekitError, match=r"iou_thresholds\[1\] = 1.5"):
        coco_mean_average_precision(preds, targets, iou_thresholds=[0.5, 1.5])
    with pytest.raises(DivekitError, match="max_detections"):
        coco_mean_average_precision(preds, targets, max_detections=0)
    with pytest.raises(DivekitError, match="interpolation"):
        mean_average_precision(preds, targets, interpolation="voc")
    with pytest.raises(DivekitError, match="increasing"):
        mean_average_precision(preds, targets, interpolation="coco", recall_thresholds=[0.5, 0.1])


def test_thresholds_are_torchmetrics_own():
    detection = pytest.importorskip("torchmetrics.detection")
    metric = detection.MeanAveragePrecision()
    assert list(COCO_IOU_THRESHOLDS) == metric.iou_thresholds
    assert list(COCO_RECALL_THRESHOLDS) == metric.rec_thresholds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inputs_on_the_gpu_give_the_same_numbers():
    preds, targets = next(_scene_sets(5, 1, hard=True))
    cuda = [{k: v.cuda() for k, v in p.items()} for p in preds]
    cuda_t = [{k: v.cuda() for k, v in t.items()} for t in targets]
    assert coco_mean_average_precision(cuda, cuda_t) == coco_mean_average_precision(preds, targets)
