"""Anchor boxes: generation, the greedy labelling, offsets and prediction (d2l 14.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from divekit.errors import DivekitError
from divekit.ops.anchors import (
    assign_anchor_to_bbox,
    multibox_detection,
    multibox_prior,
    multibox_target,
    offset_boxes,
    offset_inverse,
)


@pytest.fixture(scope="module")
def d2l():
    """The course's package, to compare with; the tests using it skip when it is absent."""
    return pytest.importorskip("d2l.torch", exc_type=ImportError)


def strip(x1: float, x2: float) -> list[float]:
    """A box of height 1 spanning ``[x1, x2]``: IoU of two strips is their 1-D interval IoU."""
    return [x1, 0.0, x2, 1.0]


def random_labels(batch: int, objects: int, g: torch.Generator, classes: int = 3) -> torch.Tensor:
    xy = torch.rand(batch, objects, 2, generator=g) * 0.8
    wh = torch.rand(batch, objects, 2, generator=g) * 0.5 + 0.01
    cls = torch.randint(0, classes, (batch, objects, 1), generator=g).float()
    return torch.cat((cls, xy, xy + wh), dim=-1)


# --------------------------------------------------------------------------- multibox_prior


def test_each_pixel_gets_n_plus_m_minus_1_anchors():
    anchors = multibox_prior(
        torch.zeros(2, 3, 5, 7), sizes=[0.75, 0.5, 0.25], ratios=[1, 2, 0.5, 3]
    )
    assert anchors.shape == (1, 5 * 7 * (3 + 4 - 1), 4)
    # the first anchor of the first pixel: size 0.75, ratio 1, centred at (0.5/7, 0.5/5)
    half_w, half_h = 0.75 * 5 / 7 / 2, 0.75 / 2
    expected = [0.5 / 7 - half_w, 0.1 - half_h, 0.5 / 7 + half_w, 0.1 + half_h]
    assert torch.allclose(anchors[0, 0], torch.tensor(expected))


def test_multibox_prior_matches_the_book():
    # d2l 14.4: a 561 x 728 image, sizes 0.75, 0.5, 0.25 and ratios 1, 2, 0.5
    Y = multibox_prior(torch.zeros(1, 3, 561, 728), sizes=[0.75, 0.5, 0.25], ratios=[1, 2, 0.5])
    assert Y.shape == (1, 2042040, 4)
    boxes = Y.reshape(561, 728, 5, 4)
    assert torch.allclose(boxes[250, 250, 0, :], torch.tensor([0.06, 0.07, 0.63, 0.82]), atol=0.01)


def test_multibox_prior_equals_d2l(d2l):
    for shape, sizes, ratios in [
        ((1, 3, 9, 13), [0.2, 0.4], [1, 2, 0.5]),
        ((2, 1, 4, 4), [0.5], [1]),
        ((1, 2, 16, 6), [0.9, 0.3, 0.1], [0.7, 1.5]),
    ]:
        X = torch.zeros(shape)
        assert torch.equal(multibox_prior(X, sizes, ratios), d2l.multibox_prior(X, sizes, ratios))


def test_multibox_prior_rejects_bad_sizes():
    with pytest.raises(DivekitError, match=r"sizes\[1\]"):
        multibox_prior(torch.zeros(1, 1, 2, 2), sizes=[0.5, -0.1], ratios=[1])
    with pytest.raises(DivekitError, match="ratios"):
        multibox_prior(torch.zeros(1, 1, 2, 2), sizes=[0.5], ratios=[])


# --------------------------------------------------------------------------- the greedy assignment


def test_greedy_assignment_then_threshold_by_hand():
    truths = torch.tensor([strip(0, 4), strip(6, 10)])
    anchors = torch.tensor([strip(0, 4), strip(0, 2), strip(6, 8), strip(7, 10), strip(3, 7)])
    # The IoU matrix (anchors x truths):
    #   a0  1     0        greedy 1: (a0, t0)
    #   a1  0.5   0        threshold: t0
    #   a2  0     0.5      threshold: t1
    #   a3  0     0.75     greedy 2: (a3, t1)
    #   a4  1/7   1/7      below any threshold
    assert torch.allclose(torchvision.ops.box_iou(anchors, truths)[4], torch.tensor([1 / 7, 1 / 7]))
    assert assign_anchor_to_bbox(truths, anchors, "cpu").tolist() == [0, 0, 1, 1, -1]
    # the threshold is honoured: at 0.6 only the greedy pairs remain
    assert assign_anchor_to_bbox(truths, anchors, "cpu", iou_threshold=0.6).tolist() == [
        0,
        -1,
        -1,
        1,
        -1,
    ]


def test_every_truth_gets_an_anchor_even_below_the_threshold():
    truths = torch.tensor([strip(0, 10), strip(1, 10)])
    anchors = torch.tensor([strip(0, 10), strip(5, 12)])
    #   a0  1      0.9       greedy 1: (a0, t0), deleting row a0 and column t0
    #   a1  5/12   5/11      greedy 2: (a1, t1) although 5/11 < 0.5
    assert assign_anchor_to_bbox(truths, anchors, "cpu").tolist() == [0, 1]


def test_more_truths_than_anchors():
    truths = torch.tensor([strip(6, 10), strip(0, 4), strip(0, 3)])
    anchors = torch.tensor([strip(0, 4), strip(6, 10)])
    #       t0  t1  t2
    #   a0  0   1   0.75   greedy 1: (a0, t1) (ties go to the earlier anchor, then truth)
    #   a1  1   0   0      greedy 2: (a1, t0); no anchors left, t2 goes unassigned
    # (d2l keeps looping over the deleted matrix and pairs anchor 0 with truth 0: [0, 0].)
    assert assign_anchor_to_bbox(truths, anchors, "cpu").tolist() == [1, 0]


def test_no_truths_means_all_background():
    anchors = torch.tensor([strip(0, 4), strip(6, 10)])
    assert assign_anchor_to_bbox(torch.zeros(0, 4), anchors, "cpu").tolist() == [-1, -1]
    offsets, mask, classes = multibox_target(anchors, torch.zeros(3, 0, 5))
    assert classes.tolist() == [[0, 0]] * 3 and not mask.any() and not offsets.any()
    padding_only = torch.full((2, 4, 5), -1.0)
    offsets, mask, classes = multibox_target(anchors, padding_only)
    assert classes.tolist() == [[0, 0]] * 2 and not mask.any() and not offsets.any()


def test_assignment_equals_d2l_on_random_boxes(d2l):
    g = torch.Generator().manual_seed(0)
    anchors = multibox_prior(torch.zeros(1, 1, 6, 6), [0.6, 0.3], [1, 2, 0.5])[0]
    for _ in range(20):
        truths = random_labels(1, int(torch.randint(1, 6, (), generator=g)), g)[0, :, 1:]
        assert torch.equal(
            assign_anchor_to_bbox(truths, anchors, "cpu"),
            d2l.assign_anchor_to_bbox(truths, anchors, "cpu"),
        )


# --------------------------------------------------------------------------- offsets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 50))
def test_offset_inverse_recovers_the_boxes(seed, n):
    g = torch.Generator().manual_seed(seed)
    labels = random_labels(2, n, g)
    anchors, boxes = labels[0, :, 1:].double(), labels[1, :, 1:].double()
    offsets = offset_boxes(anchors, boxes)
    assert torch.allclose(offset_inverse(anchors, offsets), boxes, atol=1e-5)


def test_offsets_use_the_course_scaling():
    anchor = torch.tensor([[0.0, 0.0, 0.2, 0.4]])  # centre (0.1, 0.2), size 0.2 x 0.4
    box = torch.tensor([[0.1, 0.0, 0.3, 0.8]])  # centre (0.2, 0.4), size 0.2 x 0.8
    expected = [10 * 0.1 / 0.2, 10 * 0.2 / 0.4, 5 * math.log(1e-6 + 1.0), 5 * math.log(1e-6 + 2.0)]
    assert torch.allclose(offset_boxes(anchor, box)[0], torch.tensor(expected), atol=1e-6)


# --------------------------------------------------------------------------- multibox_target


def test_multibox_target_on_the_course_example():
    ground_truth = torch.tensor([[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]])
    anchors = torch.tensor(
        [
            [0, 0.1, 0.2, 0.3],
            [0.15, 0.2, 0.4, 0.4],
            [0.63, 0.05, 0.88, 0.98],
            [0.66, 0.45, 0.8, 0.8],
            [0.57, 0.3, 0.92, 0.9],
        ]
    )
    offsets, mask, classes = multibox_target(anchors.unsqueeze(0), ground_truth.unsqueeze(0))
    assert classes.tolist() == [[0, 1, 2, 0, 2]]
    assert mask.tolist() == [[0.0] * 4 + [1.0] * 8 + [0.0] * 4 + [1.0] * 4]
    book = [
        0,
        0,
        0,
        0,
        1.40,
        10.0,
        2.59,
        7.18,
        -1.20,
        0.269,
        1.68,
        -1.57,
        0,
        0,
        0,
        0,
        -0.571,
        -1.00,
        4.17e-06,
        0.626,
    ]
    assert torch.allclose(offsets[0], torch.tensor(book), atol=0.01)


def test_multibox_target_equals_d2l_on_random_batches(d2l):
    g = torch.Generator().manual_seed(1)
    anchors = multibox_prior(torch.zeros(1, 1, 8, 8), [0.75, 0.5, 0.25], [1, 2, 0.5])
    for _ in range(10):
        labels = random_labels(4, int(torch.randint(1, 6, (), generator=g)), g)
        ours, theirs = multibox_target(anchors, labels), d2l.multibox_target(anchors, labels)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_the_batch_is_labelled_like_each_image_alone():
    g = torch.Generator().manual_seed(2)
    anchors = multibox_prior(torch.zeros(1, 1, 5, 5), [0.5, 0.2], [1, 2])[0]
    labels = random_labels(6, 4, g)
    labels[1, 2:] = -1  # padding rows: image 1 has two objects, image 3 none
    labels[3] = -1
    offsets, mask, classes = multibox_target(anchors, labels)
    for b in range(6):
        real = labels[b][labels[b, :, 0] >= 0]
        assigned = assign_anchor_to_bbox(real[:, 1:], anchors, "cpu")
        if real.shape[0]:
            expected_cls = torch.where(assigned >= 0, real[assigned.clamp(min=0), 0].long() + 1, 0)
        else:
            expected_cls = torch.zeros_like(assigned)
        assert torch.equal(classes[b], expected_cls)
        alone = multibox_target(anchors, real[None])
        assert torch.equal(offsets[b], alone[0][0]) and torch.equal(mask[b], alone[1][0])


def test_multibox_target_honours_the_threshold():
    anchors = torch.tensor([strip(0, 4), strip(0, 2), strip(6, 8), strip(7, 10), strip(3, 7)]) / 10
    labels = torch.tensor([[[0] + strip(0, 4), [2] + strip(6, 10)]]) / torch.tensor(
        [1.0, 10, 10, 10, 10]
    )
    assert multibox_target(anchors, labels)[2].tolist() == [[1, 1, 3, 3, 0]]
    assert multibox_target(anchors, labels, iou_threshold=0.6)[2].tolist() == [[1, 0, 0, 3, 0]]


def test_multibox_target_rejects_bad_labels():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    good = [0.0, 0.1, 0.1, 0.4, 0.4]
    with pytest.raises(DivekitError, match=r"labels\[0, 1\] has class 3; expected 0..2"):
        multibox_target(anchors, torch.tensor([[good, [3.0, 0.1, 0.1, 0.4, 0.4]]]), num_classes=3)
    with pytest.raises(DivekitError, match=r"labels\[1, 0\] has class 0.5"):
        multibox_target(anchors, torch.tensor([[good], [[0.5, 0.1, 0.1, 0.4, 0.4]]]))
    with pytest.raises(DivekitError, match=r"labels\[0, 1\] .*NaN"):
        multibox_target(anchors, torch.tensor([[good, [1.0, 0.1, float("nan"), 0.4, 0.4]]]))
    with pytest.raises(DivekitError, match=r"labels\[0, 0\] .*x2 < x1"):
        multibox_target(anchors, torch.tensor([[[1.0, 0.5, 0.1, 0.4, 0.4]]]))
    with pytest.raises(DivekitError, match="shape"):
        multibox_target(anchors, torch.zeros(2, 5))
    with pytest.raises(DivekitError, match=r"anchors\[0\]"):
        multibox_target(torch.tensor([[0.5, 0.0, 0.1, 0.5]]), torch.tensor([[good]]))
    # padding rows may hold anything
    multibox_target(anchors, torch.tensor([[good, [-1.0, 9, 9, 0, float("nan")]]]))


# --------------------------------------------------------------------------- multibox_detection


def test_multibox_detection_on_the_course_example():
    anchors = torch.tensor(
        [
            [0.1, 0.08, 0.52, 0.92],
            [0.08, 0.2, 0.56, 0.95],
            [0.15, 0.3, 0.62, 0.91],
            [0.55, 0.2, 0.9, 0.88],
        ]
    )
    offset_preds = torch.zeros(anchors.numel())
    cls_probs = torch.tensor([[0.0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    out = multibox_detection(cls_probs[None], offset_preds[None], anchors[None], nms_threshold=0.5)
    assert out.shape == (1, 4, 6)
    assert torch.allclose(
        out[0],
        torch.tensor(
            [
                [0, 0.9, 0.1, 0.08, 0.52, 0.92],
                [1, 0.9, 0.55, 0.2, 0.9, 0.88],
                [-1, 0.8, 0.08, 0.2, 0.56, 0.95],
                [-1, 0.7, 0.15, 0.3, 0.62, 0.91],
            ]
        ),
    )


def distinct_probs(batch: int, classes: int, anchors: int, g: torch.Generator) -> torch.Tensor:
    """Class probabilities whose per-anchor maxima are all different (d2l orders ties arbitrarily)."""
    conf = (torch.stack([torch.randperm(anchors, generator=g) for _ in range(batch)]) + 1.0) / (
        anchors + 1
    )
    probs = torch.rand(batch, classes + 1, anchors, generator=g) * 0.99 * conf[:, None]
    winner = torch.randint(1, classes + 1, (batch, 1, anchors), generator=g)
    return probs.scatter(1, winner, conf[:, None])


def test_multibox_detection_equals_d2l_on_random_predictions(d2l):
    g = torch.Generator().manual_seed(5)
    anchors = multibox_prior(torch.zeros(1, 1, 6, 6), [0.75, 0.5, 0.25], [1, 2, 0.5])
    num_anchors = anchors.shape[1]
    for threshold in (0.3, 0.5, 0.7):
        cls_probs = distinct_probs(3, 4, num_anchors, g)
        offset_preds = torch.randn(3, num_anchors * 4, generator=g) * 0.5
        ours = multibox_detection(cls_probs, offset_preds, anchors, threshold, 0.009999999)
        theirs = d2l.multibox_detection(cls_probs, offset_preds, anchors, threshold)
        assert torch.equal(ours, theirs)


def test_per_class_nms_suppresses_only_within_a_class():
    g = torch.Generator().manual_seed(6)
    anchors = multibox_prior(torch.zeros(1, 1, 6, 6), [0.75, 0.5, 0.25], [1, 2, 0.5])[0]
    num_anchors = anchors.shape[0]
    cls_probs = distinct_probs(2, 3, num_anchors, g)
    offset_preds = torch.randn(2, num_anchors * 4, generator=g) * 0.3
    out = multibox_detection(cls_probs, offset_preds, anchors, 0.5, 0.0, class_agnostic=False)
    for b in range(2):
        conf, cls = cls_probs[b, 1:].max(dim=0)
        boxes = offset_inverse(anchors, offset_preds[b].reshape(-1, 4))
        keep = torchvision.ops.batched_nms(boxes, conf, cls, 0.5)
        kept_rows = out[b, : keep.numel()]
        assert torch.equal(kept_rows[:, 0], cls[keep].float())
        assert torch.equal(kept_rows[:, 1], conf[keep])
        assert torch.equal(kept_rows[:, 2:], boxes[keep])
        assert (out[b, keep.numel() :, 0] == -1).all()
    agnostic = multibox_detection(cls_probs, offset_preds, anchors, 0.5, 0.0)
    assert (agnostic[..., 0] >= 0).sum() < (out[..., 0] >= 0).sum()


def test_multibox_detection_rejects_mismatched_shapes():
    anchors = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]])
    with pytest.raises(DivekitError, match="cls_probs has 3 anchors but anchors has 2"):
        multibox_detection(torch.rand(1, 2, 3), torch.zeros(1, 12), anchors)
    with pytest.raises(DivekitError, match="offset_preds"):
        multibox_detection(torch.rand(1, 2, 2), torch.zeros(1, 7), anchors)
    with pytest.raises(DivekitError, match="background"):
        multibox_detection(torch.rand(1, 1, 2), torch.zeros(1, 8), anchors)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0, 1.0])
def test_native_labelling_equals_the_torch_path(threshold, monkeypatch):
    """The C kernel (float32 on the CPU) and the torch path give identical targets: random
    boxes with padding rows, truths that tie (duplicates, boxes equal to anchors, boxes that
    overlap nothing), and more truths than anchors."""
    from divekit.ops import _native_anchors

    if _native_anchors.load() is None:
        pytest.skip("no C compiler: only the torch path exists")
    g = torch.Generator().manual_seed(int(threshold * 10))
    anchors = multibox_prior(torch.zeros(1, 1, 6, 5), [0.6, 0.3], [1, 2, 0.5])  # (1, 120, 4)
    labels = random_labels(6, 7, g)
    labels[0, 3:, 0] = -1  # padding rows
    labels[1, 1] = labels[1, 0]  # duplicate truths: equal IoUs everywhere
    labels[2, :, 1:] = anchors[0, torch.randint(0, 120, (7,), generator=g)]  # IoU 1 ties
    labels[3, 2, 1:] = torch.tensor([2.0, 2.0, 2.5, 2.5])  # overlaps no anchor: IoU 0 ties
    labels[4, :, 0] = -1  # an image with padding only
    cases = [(anchors, labels),
             (anchors[:, :3], random_labels(2, 5, g))]  # more truths than anchors
    for anc, lab in cases:
        native = multibox_target(anc, lab, iou_threshold=threshold)
        with monkeypatch.context() as m:
            m.setattr(_native_anchors, "usable", lambda anchors: False)
            reference = multibox_target(anc, lab, iou_threshold=threshold)
        for ours, theirs in zip(native, reference, strict=True):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
