"""The book's boxes, anchors and NMS (``divekit.compat.d2l``) against torchvision, brute-force
loops written here from the book's description, and the values the book prints."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from divekit.compat import d2l


def random_boxes(n: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """``n`` random corner boxes with positive sizes inside about ``[0, scale]``."""
    xy = torch.rand(n, 2, generator=g) * 0.7 * scale
    wh = (torch.rand(n, 2, generator=g) * 0.5 + 0.05) * scale
    return torch.cat((xy, xy + wh), dim=1)


def random_labels(batch: int, objects: int, g: torch.Generator, classes: int = 3) -> torch.Tensor:
    cls = torch.randint(0, classes, (batch, objects, 1), generator=g).float()
    boxes = torch.stack([random_boxes(objects, g) for _ in range(batch)])
    return torch.cat((cls, boxes), dim=-1)


def center(box: list[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def iou_scalar(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def book_offsets(anchor: list[float], box: list[float], eps: float = 1e-6) -> list[float]:
    """The book's formula: centre offsets x10 in anchor units, log size ratios x5."""
    ax, ay, aw, ah = center(anchor)
    bx, by, bw, bh = center(box)
    return [10 * (bx - ax) / aw, 10 * (by - ay) / ah,
            5 * math.log(eps + bw / aw), 5 * math.log(eps + bh / ah)]


# ------------------------------------------------------------------------------- boxes


def test_box_conversions_round_trip_and_match_the_book():
    # bounding-box section: the dog and the cat, in pixels
    boxes = d2l.tensor(([60.0, 45.0, 378.0, 516.0], [400.0, 112.0, 655.0, 493.0]))
    centre = d2l.box_corner_to_center(boxes)
    assert torch.allclose(centre[0], torch.tensor([219.0, 280.5, 318.0, 471.0]))
    assert torch.equal(d2l.box_center_to_corner(centre), boxes)
    g = torch.Generator().manual_seed(0)
    rand = random_boxes(20, g)
    assert torch.allclose(d2l.box_center_to_corner(d2l.box_corner_to_center(rand)), rand,
                          atol=1e-6)
    cb = torch.rand(20, 4, generator=g) + 0.1
    assert torch.allclose(d2l.box_corner_to_center(d2l.box_center_to_corner(cb)), cb, atol=1e-6)


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_boxes(7, g), random_boxes(5, g)
    got = d2l.box_iou(a, b)
    assert got.shape == (7, 5)
    assert torch.allclose(got, torchvision.ops.box_iou(a, b), atol=1e-6)
    assert abs(float(got[2, 3]) - iou_scalar(a[2].tolist(), b[3].tolist())) < 1e-6


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
def test_nms_matches_torchvision(threshold):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        boxes, scores = random_boxes(40, g), torch.rand(40, generator=g)
        keep = d2l.nms(boxes, scores, threshold)
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, threshold))
        assert keep.dtype == torch.int64
        assert bool((scores[keep][1:] <= scores[keep][:-1]).all())  # sorted by score


# ------------------------------------------------------------------------------ anchors


def brute_prior(h: int, w: int, sizes: list[float], ratios: list[float]) -> torch.Tensor:
    shapes = [(s, ratios[0]) for s in sizes] + [(sizes[0], r) for r in ratios[1:]]
    out = []
    for i in range(h):
        for j in range(w):
            cx, cy = (j + 0.5) / w, (i + 0.5) / h
            for s, r in shapes:
                bw, bh = s * math.sqrt(r) * h / w, s / math.sqrt(r)
                out.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
    return torch.tensor(out)[None]


def test_multibox_prior_matches_a_loop():
    sizes, ratios = [0.4, 0.2], [1, 2, 0.5]
    anchors = d2l.multibox_prior(d2l.zeros((1, 10, 3, 5)), sizes=sizes, ratios=ratios)
    assert anchors.shape == (1, 3 * 5 * (2 + 3 - 1), 4)
    assert torch.allclose(anchors, brute_prior(3, 5, sizes, ratios), atol=1e-6)
    centres = d2l.box_corner_to_center(anchors[0])[:, :2].reshape(3, 5, 4, 2)
    assert torch.allclose(centres[1, 2, 3], torch.tensor([2.5 / 5, 1.5 / 3]))


def test_multibox_prior_matches_the_book():
    # anchor section: a 561 x 728 image
    Y = d2l.multibox_prior(torch.rand(1, 3, 561, 728), sizes=[0.75, 0.5, 0.25],
                           ratios=[1, 2, 0.5])
    assert Y.shape == (1, 2042040, 4)
    boxes = Y.reshape(561, 728, 5, 4)
    assert torch.allclose(boxes[250, 250, 0, :], torch.tensor([0.06, 0.07, 0.63, 0.82]),
                          atol=0.005)


def brute_target(anchors: torch.Tensor, labels: torch.Tensor):
    """The book's rule, anchor by anchor: each truth in turn greedily takes the anchor of the
    largest remaining IoU (then that anchor and truth are out); every other anchor takes its best
    truth when their IoU is at least 0.5."""
    anc = anchors[0].tolist()
    offsets, masks, classes = [], [], []
    for label in labels.tolist():
        iou = [[iou_scalar(a, t[1:]) for t in label] for a in anc]
        assigned = [-1] * len(anc)
        for i, row in enumerate(iou):
            j = max(range(len(label)), key=lambda k: row[k])
            if row[j] >= 0.5:
                assigned[i] = j
        free_a, free_t = set(range(len(anc))), set(range(len(label)))
        for _ in range(len(label)):
            i, j = max(((i, j) for i in free_a for j in free_t), key=lambda p: iou[p[0]][p[1]])
            assigned[i] = j
            free_a.discard(i)
            free_t.discard(j)
        off, mask, cls = [], [], []
        for i, j in enumerate(assigned):
            if j < 0:
                off += [0.0] * 4
                mask += [0.0] * 4
                cls.append(0)
            else:
                off += book_offsets(anc[i], label[j][1:])
                mask += [1.0] * 4
                cls.append(int(label[j][0]) + 1)
        offsets.append(off)
        masks.append(mask)
        classes.append(cls)
    return torch.tensor(offsets), torch.tensor(masks), torch.tensor(classes)


def test_multibox_target_matches_the_book_rule():
    g = torch.Generator().manual_seed(3)
    anchors = d2l.multibox_prior(torch.zeros(1, 1, 4, 4), sizes=[0.3, 0.5], ratios=[1, 2, 0.5])
    for _ in range(3):
        # truths near some anchors, so that several anchors reach IoU 0.5 with one truth
        picks = torch.randint(0, anchors.shape[1], (2, 3), generator=g)
        near = anchors[0][picks] + (torch.rand(2, 3, 4, generator=g) - 0.5) * 0.06
        labels = torch.cat((random_labels(2, 3, g)[..., :1], near), dim=-1)
        offset, mask, cls = d2l.multibox_target(anchors, labels)
        want_offset, want_mask, want_cls = brute_target(anchors, labels)
        assert offset.shape == mask.shape == (2, anchors.shape[1] * 4)
        assert cls.shape == (2, anchors.shape[1]) and cls.dtype == torch.int64
        assert torch.equal(cls, want_cls)
        assert torch.equal(mask, want_mask)
        assert torch.allclose(offset, want_offset, atol=1e-4)
        assert int((cls > 0).sum()) > 2 * 3  # the threshold step assigned anchors too


def test_multibox_target_matches_the_book_example():
    ground_truth = d2l.tensor([[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]])
    anchors = d2l.tensor([[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98],
                          [0.66, 0.45, 0.8, 0.8], [0.57, 0.3, 0.92, 0.9]])
    labels = d2l.multibox_target(anchors.unsqueeze(dim=0), ground_truth.unsqueeze(dim=0))
    assert labels[2].tolist() == [[0, 1, 2, 0, 2]]
    assert labels[1].tolist() == [[0.0] * 4 + [1.0] * 4 * 2 + [0.0] * 4 + [1.0] * 4]
    assert torch.allclose(labels[0][0, 4:8],
                          torch.tensor(book_offsets(anchors[1].tolist(),
                                                    ground_truth[0, 1:].tolist())), atol=1e-4)


def test_assign_and_offsets_follow_the_book():
    g = torch.Generator().manual_seed(4)
    anchors, truth = random_boxes(12, g), random_boxes(3, g)
    labels = torch.cat((torch.zeros(3, 1), truth), dim=1)[None]
    _, _, cls = d2l.multibox_target(anchors[None], labels)
    assigned = d2l.assign_anchor_to_bbox(truth, anchors, torch.device("cpu"))
    assert torch.equal(assigned >= 0, cls[0] > 0)
    which = assigned.clamp(min=0)
    off = d2l.offset_boxes(anchors, truth[which])
    want = [book_offsets(a, truth[int(j)].tolist()) for a, j in zip(anchors.tolist(), which)]
    assert torch.allclose(off, torch.tensor(want), atol=1e-4)
    # the inverse gives the boxes back
    assert torch.allclose(d2l.offset_inverse(anchors, off), truth[which],
                          atol=1e-4)


# --------------------------------------------------------------------------- detection


def brute_detection(cls_probs, offset_preds, anchors, nms_threshold, pos_threshold):
    """Decode every anchor's box from its offsets, NMS by confidence (background excluded), then
    the kept rows by confidence and the suppressed ones (class -1) by anchor index."""
    anc = anchors[0].tolist()
    out = []
    for probs, offs in zip(cls_probs.tolist(), offset_preds.reshape(len(cls_probs), -1, 4).tolist()):
        boxes, confs, classes = [], [], []
        for a, (ax, ay, aw, ah) in enumerate(map(center, anc)):
            p = [probs[c][a] for c in range(1, len(probs))]
            c = max(range(len(p)), key=lambda k: p[k])
            confs.append(p[c])
            classes.append(c)
            dx, dy, dw, dh = offs[a]
            x, y = dx * aw / 10 + ax, dy * ah / 10 + ay
            w, h = math.exp(dw / 5) * aw, math.exp(dh / 5) * ah
            boxes.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
        order = sorted(range(len(anc)), key=lambda k: -confs[k])
        keep = []
        while order:
            best, order = order[0], order[1:]
            keep.append(best)
            order = [k for k in order if iou_scalar(boxes[best], boxes[k]) <= nms_threshold]
        rows = []
        for k in keep + sorted(set(range(len(anc))) - set(keep)):
            cls, conf = (classes[k] if k in keep else -1), confs[k]
            if conf < pos_threshold:
                cls, conf = -1, 1 - conf
            rows.append([cls, conf] + boxes[k])
        out.append(rows)
    return torch.tensor(out)


@pytest.mark.parametrize("nms_threshold,pos_threshold", [(0.5, 0.009999999), (0.3, 0.4)])
def test_multibox_detection_matches_decode_and_nms(nms_threshold, pos_threshold):
    g = torch.Generator().manual_seed(5)
    anchors = d2l.multibox_prior(torch.zeros(1, 1, 3, 3), sizes=[0.4, 0.6], ratios=[1, 2])
    num_anchors = anchors.shape[1]
    cls_probs = torch.softmax(torch.randn(2, 4, num_anchors, generator=g) * 2, dim=1)
    offset_preds = torch.randn(2, num_anchors * 4, generator=g) * 0.5
    if pos_threshold > 0.1:
        got = d2l.multibox_detection(cls_probs, offset_preds, anchors, nms_threshold,
                                     pos_threshold)
    else:
        got = d2l.multibox_detection(cls_probs, offset_preds, anchors)
    want = brute_detection(cls_probs, offset_preds, anchors, nms_threshold, pos_threshold)
    assert got.shape == (2, num_anchors, 6)
    assert torch.equal(got[..., 0], want[..., 0])
    assert torch.allclose(got, want, atol=1e-5)
    assert bool((got[..., 0] == -1).any()) and bool((got[..., 0] >= 0).any())


def test_multibox_detection_matches_the_book_example():
    anchors = d2l.tensor([[0.1, 0.08, 0.52, 0.92], [0.08, 0.2, 0.56, 0.95],
                          [0.15, 0.3, 0.62, 0.91], [0.55, 0.2, 0.9, 0.88]])
    offset_preds = d2l.tensor([0] * d2l.size(anchors))
    cls_probs = d2l.tensor([[0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    output = d2l.multibox_detection(cls_probs.unsqueeze(dim=0), offset_preds.unsqueeze(dim=0),
                                    anchors.unsqueeze(dim=0), nms_threshold=0.5)
    want = torch.tensor([[0, 0.9, 0.1, 0.08, 0.52, 0.92], [1, 0.9, 0.55, 0.2, 0.9, 0.88],
                         [-1, 0.8, 0.08, 0.2, 0.56, 0.95], [-1, 0.7, 0.15, 0.3, 0.62, 0.91]])
    assert torch.allclose(output[0], want, atol=1e-6)
