"""Boxes: formats, IoU and non-maximum suppression, checked against torchvision and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from divekit.errors import DivekitError
from divekit.ops.boxes import (
    batched_nms,
    box_area,
    box_center_to_corner,
    box_corner_to_center,
    box_iou,
    nms,
    validate_boxes,
)


def random_boxes(
    n: int, generator: torch.Generator, scale: float = 100.0, offset: float = 0.0
) -> torch.Tensor:
    """``n`` corner boxes with upper-left corners in ``[offset, offset + scale)``."""
    xy = torch.rand(n, 2, generator=generator) * scale + offset
    wh = torch.rand(n, 2, generator=generator) * scale / 4
    return torch.cat((xy, xy + wh), dim=1)


# --------------------------------------------------------------------------- formats and IoU


def test_corner_center_round_trip_on_the_course_dog_and_cat():
    dog, cat = [60.0, 45.0, 378.0, 516.0], [400.0, 112.0, 655.0, 493.0]
    boxes = torch.tensor([dog, cat])
    center = box_corner_to_center(boxes)
    assert center[0].tolist() == [219.0, 280.5, 318.0, 471.0]
    assert torch.equal(box_center_to_corner(center), boxes)


def test_conversions_keep_leading_dimensions():
    boxes = random_boxes(12, torch.Generator().manual_seed(0)).reshape(3, 4, 4)
    assert box_corner_to_center(boxes).shape == (3, 4, 4)
    assert torch.allclose(box_center_to_corner(box_corner_to_center(boxes)), boxes, atol=1e-5)


def test_box_area_and_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    assert box_area(b).tolist() == [4.0, 4.0, 4.0]
    # overlap 1, union 4 + 4 - 1 = 7; touching corners share no area; identical boxes give 1
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 30), m=st.integers(0, 30))
def test_box_iou_equals_torchvision(seed, n, m):
    g = torch.Generator().manual_seed(seed)
    boxes1, boxes2 = random_boxes(n, g), random_boxes(m, g)
    assert torch.equal(box_iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2))


def test_box_iou_broadcasts_over_a_batch():
    g = torch.Generator().manual_seed(1)
    anchors, truths = random_boxes(7, g), random_boxes(6, g).reshape(2, 3, 4)
    iou = box_iou(anchors, truths)  # (2, 7, 3)
    assert iou.shape == (2, 7, 3)
    for b in range(2):
        assert torch.equal(iou[b], torchvision.ops.box_iou(anchors, truths[b]))


# --------------------------------------------------------------------------- NMS


def test_nms_keeps_the_best_and_drops_its_overlaps():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    for method in ("fast", "reference"):
        # box 3 wins; 0 overlaps it (IoU 0.9) and goes, 1 overlaps 3 by 0.6 and goes, 2 stays
        assert nms(boxes, scores, 0.5, method=method).tolist() == [3, 2]
        assert nms(boxes, scores, 0.95, method=method).tolist() == [3, 0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 120),
    levels=st.sampled_from([2, 3, 5, None]),  # None: continuous scores, else many ties
    threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]),
)
def test_nms_both_paths_equal_torchvision_including_ties(seed, n, levels, threshold):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, g)
    if levels is None:
        scores = torch.rand(n, generator=g)
    else:
        scores = torch.randint(0, levels, (n,), generator=g).float()
    expected = torchvision.ops.nms(boxes, scores, threshold)
    assert torch.equal(nms(boxes, scores, threshold, method="fast"), expected)
    assert torch.equal(nms(boxes, scores, threshold, method="reference"), expected)


def test_torchvision_visits_tied_scores_in_index_order():
    # The tie order we document: among equal scores the smaller index comes first. Many
    # disjoint boxes with one score keep all, in index order; heavily tied random sets keep
    # the order a stable descending sort gives.
    boxes = torch.stack([torch.tensor([3.0 * i, 0, 3.0 * i + 2, 2]) for i in range(50)])
    scores = torch.ones(50)
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == list(range(50))
    assert nms(boxes, scores, 0.5, method="reference").tolist() == list(range(50))
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        boxes = random_boxes(2000, g, scale=1000.0)
        scores = torch.randint(0, 4, (2000,), generator=g).float()
        keep = torchvision.ops.nms(boxes, scores, 0.3)
        rank = torch.empty(2000, dtype=torch.long)
        rank[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(2000)
        assert bool((rank[keep].diff() > 0).all())


def test_threshold_is_compared_in_double_precision_like_torchvision():
    # IoU is float32(0.3) = 0.30000001..., which is above the double 0.3: suppressed.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.3]])
    scores = torch.tensor([1.0, 0.5])
    assert torchvision.ops.nms(boxes, scores, 0.3).tolist() == [0]
    assert nms(boxes, scores, 0.3, method="reference").tolist() == [0]
    assert nms(boxes, scores, 0.3).tolist() == [0]  # the grid kernel's float test agrees
    # at the threshold equal to the float32 IoU itself it is not above: both kept, every path
    exact = float(box_iou(boxes[:1], boxes[1:])[0, 0])
    assert torchvision.ops.nms(boxes, scores, exact).tolist() == [0, 1]
    for method in ("fast", "reference"):
        assert nms(boxes, scores, exact, method=method).tolist() == [0, 1]
    # and just below it (a double no float32 equals) the IoU is above: suppressed
    below = math.nextafter(exact, 0.0)
    assert torchvision.ops.nms(boxes, scores, below).tolist() == [0]
    assert nms(boxes, scores, below).tolist() == [0]


def test_nms_of_nothing_is_empty():
    for method in ("fast", "reference"):
        keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5, method=method)
        assert keep.dtype == torch.long and keep.numel() == 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 150),
    classes=st.integers(1, 4),
    threshold=st.sampled_from([0.2, 0.5, 0.8]),
)
def test_batched_nms_equals_torchvision(seed, n, classes, threshold):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, g)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, classes, (n,), generator=g)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, threshold)
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold), expected)
    assert torch.equal(batched_nms(boxes, scores, idxs, threshold, method="reference"), expected)


@pytest.mark.parametrize("n", [300, 1500])
def test_batched_nms_with_tied_scores_orders_ties_by_index(n):
    # Above 1,000 boxes torchvision merges per-class results with an unstable sort, so tied
    # scores come out in any order; ours keeps the same indices with ties by index, both paths.
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(n, g, scale=300.0)
    scores = torch.randint(0, 3, (n,), generator=g).float()
    idxs = torch.randint(0, 3, (n,), generator=g)
    theirs = torchvision.ops.batched_nms(boxes, scores, idxs, 0.4)
    expected = theirs.sort().values
    expected = expected[torch.sort(scores[expected], descending=True, stable=True).indices]
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.4), expected)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.4, method="reference"), expected)
    if n < 1000:  # one stable NMS call inside torchvision: already in this order
        assert torch.equal(theirs, expected)


def test_batched_nms_never_mixes_classes_even_with_negative_coordinates():
    # torchvision's coordinate trick shifts class k by k * (max + 1): with coordinates below -1
    # the shifted classes can overlap. Ours falls back to NMS per class there.
    boxes = torch.tensor([[-10.0, -10.0, 0.0, 0.0], [-9.0, -9.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    idxs = torch.tensor([0, 1])
    assert sorted(batched_nms(boxes, scores, idxs, 0.5).tolist()) == [0, 1]
    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(200, g, scale=10.0, offset=-8.0)
    scores, idxs = torch.rand(200, generator=g), torch.randint(0, 3, (200,), generator=g)
    per_class = torch.cat(
        [
            torch.where(idxs == c)[0][torchvision.ops.nms(boxes[idxs == c], scores[idxs == c], 0.5)]
            for c in range(3)
        ]
    )
    expected = per_class[torch.sort(scores[per_class], descending=True).indices]
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), expected)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5, method="reference"), expected)


# --------------------------------------------------------------------------- bad input


def test_validate_boxes_names_the_offending_row():
    ok = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    assert validate_boxes(ok) is ok
    with pytest.raises(DivekitError, match=r"boxes\[2\] .*x2 < x1"):
        validate_boxes(torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [3, 0, 1, 1]]))
    with pytest.raises(DivekitError, match=r"preds\[1\] .*y2 < y1"):
        validate_boxes(torch.tensor([[0.0, 0, 1, 1], [0, 2, 1, 1]]), "preds")
    with pytest.raises(DivekitError, match=r"boxes\[0, 1\] .*NaN"):
        validate_boxes(torch.tensor([[[0.0, 0, 1, 1], [0, float("nan"), 1, 1]]]))
    with pytest.raises(DivekitError, match="shape"):
        validate_boxes(torch.zeros(3, 5))


def test_nms_rejects_bad_input():
    boxes = torch.tensor([[0.0, 0, 1, 1], [2, 0, 1, 1]])
    with pytest.raises(DivekitError, match=r"boxes\[1\]"):
        nms(boxes, torch.ones(2), 0.5)
    good = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(DivekitError, match="scores"):
        nms(good, torch.ones(3), 0.5)
    with pytest.raises(DivekitError, match="'slow'"):
        nms(good, torch.ones(2), 0.5, method="slow")
    with pytest.raises(DivekitError, match="iou_threshold"):
        nms(good, torch.ones(2), float("nan"))
    with pytest.raises(DivekitError, match="idxs"):
        batched_nms(good, torch.ones(2), torch.tensor([0.0, 1.0]), 0.5)


def test_integer_boxes_and_gradients():
    a, b = torch.tensor([[0, 0, 4, 4], [1, 1, 5, 5]]), torch.tensor([[2, 2, 6, 6]])
    assert torch.equal(box_iou(a, b), torchvision.ops.box_iou(a, b))
    # with gradients on, the out-of-place arithmetic runs and IoU can be a loss
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    iou = box_iou(boxes, torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    iou.sum().backward()
    assert torch.allclose(iou.detach(), torch.tensor([[1 / 7]])) and boxes.grad is not None


# ------------------------------------------------------------------ the compiled grid kernel
native = pytest.importorskip("divekit.ops._native_nms")
needs_native = pytest.mark.skipif(native.load() is None, reason="no C compiler: NMS runs on torchvision")


def _scene(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "uniform":  # sides 0.02-0.3 of a unit image
        c, half = torch.rand(n, 2, generator=g), (torch.rand(n, 2, generator=g) * 0.28 + 0.02) / 2
        return torch.cat([c - half, c + half], 1)
    if kind == "clustered":  # detector-like: jittered copies of a few objects
        obj = torch.rand(6, 4, generator=g)
        pick = torch.randint(0, 6, (n,), generator=g)
        c = obj[pick, :2] + torch.randn(n, 2, generator=g) * 0.02
        size = (obj[pick, 2:] * 0.3 + 0.05) * (1 + 0.1 * torch.randn(n, 2, generator=g)).abs()
        return torch.cat([c - size / 2, c + size / 2], 1)
    if kind == "integer":  # exact IoU ties, zero-width and zero-height boxes
        xy = torch.randint(-10, 20, (n, 2), generator=g).float()
        return torch.cat([xy, xy + torch.randint(0, 8, (n, 2), generator=g).float()], 1)
    if kind == "scales":  # tiny to huge boxes, far from the origin
        c = torch.rand(n, 2, generator=g) * 1e4 - 5e3
        half = torch.exp(torch.rand(n, 2, generator=g) * 12 - 4)
        return torch.cat([c - half, c + half], 1)
    raise ValueError(kind)


@needs_native
@pytest.mark.parametrize("kind", ["uniform", "clustered", "integer", "scales"])
@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_grid_kernel_keeps_exactly_what_torchvision_keeps(kind, threshold):
    g = torch.Generator().manual_seed(hash((kind, threshold)) % 2**31)
    for trial in range(12):
        n = int(torch.randint(1, 600, (1,), generator=g))
        boxes = _scene(kind, n, g)
        scores = (torch.randint(0, 4, (n,), generator=g).float() if trial % 2  # many ties
                  else torch.rand(n, generator=g))
        if trial % 5 == 4:
            scores[torch.randint(0, n, (max(n // 10, 1),), generator=g)] = float("nan")
        expected = torchvision.ops.nms(boxes, scores, threshold)
        assert torch.equal(native.grid_nms(boxes, scores, threshold), expected), (kind, trial, n)
        assert torch.equal(nms(boxes, scores, threshold), expected)


@needs_native
def test_grid_kernel_on_the_benchmark_sizes_and_its_error_for_bad_boxes():
    g = torch.Generator().manual_seed(5)
    for kind in ("uniform", "clustered"):
        boxes, scores = _scene(kind, 5000, g), torch.rand(5000, generator=g)
        assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    boxes[7, 2] = float("inf")
    with pytest.raises(DivekitError, match=r"boxes\[7\] .*NaN or infinite"):
        nms(boxes, scores, 0.5)
    assert native.usable(boxes, 0.5) and not native.usable(boxes.double(), 0.5)
    assert not native.usable(boxes, 0.99) and not native.usable(boxes, 0.0)


def test_nms_falls_back_to_torchvision_without_the_kernel(monkeypatch):
    monkeypatch.setenv("DIVEKIT_NATIVE", "0")
    native.load.cache_clear()
    try:
        assert native.load() is None
        g = torch.Generator().manual_seed(6)
        boxes, scores = _scene("uniform", 300, g), torch.rand(300, generator=g)
        assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    finally:
        monkeypatch.undo()
        native.load.cache_clear()
