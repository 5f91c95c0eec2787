"""Detection ops: divekit.ops against the d2l package's functions on the same inputs.

Cases (issue 26's goals in brackets, at 1 thread):

* ``multibox_target``: a batch of 32 images, 5,120 anchors (a 32x32 map, 5 per pixel), 2
  objects each [>= 15x d2l; issue 5 asked 10x];
* ``nms``: 5,000 boxes with distinct scores, IoU threshold 0.5 [>= 50x d2l], twice: uniformly
  random boxes (most are kept) and boxes jittered around 20 objects (most are suppressed);
* ``multibox_prior``: a 64x64 feature map, sizes (0.2, 0.272), ratios (1, 2, 0.5);
* ``multibox_detection``: a batch of 4, 5,120 anchors, 3 classes (extra; no goal);
* ``tiny_ssd`` training step: forward, multibox loss, backward and an SGD step on a batch of
  32 images 128x128 from ``make_shapes`` (3 classes), reported as images per second too. The
  d2l side is the course's ``TinySSD`` and ``calc_loss`` (d2l 14.7, written out below: the
  package has no ``TinySSD``) with ``d2l.multibox_prior`` and ``d2l.multibox_target``; both
  nets start from the same weights, and "same result" means they give the same anchors and
  predictions. divekit runs in channels_last, its Trainer's default. (The losses differ:
  d2l's ``multibox_target`` takes the padding rows, class -1, for objects; divekit's skips
  them.)

Each side's time is a timeit-style loop (the loop count chosen so one loop takes at least
~0.2 s), after one warm-up call; ``--repeats`` rounds interleave the sides (d2l's loop, then
divekit's). The table gives wall-clock medians, the median and min–max of the per-round ratios
(the goal's verdict uses the whole spread), then the median per-round ratio of CPU times
(steadier on a shared machine). Before timing, each case checks that both sides give the same
result.

    python benchmarks/detection_ops.py                # default: 5 repeats, 1 thread
    python benchmarks/detection_ops.py --repeats 9 --threads 2
    python benchmarks/detection_ops.py --only tiny_ssd     # one case
    python benchmarks/detection_ops.py --smoke        # small inputs, one call a side (seconds)

Without the d2l package the d2l column is skipped (said in the output) and divekit runs alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    Report,
    Spread,
    add_markdown_arg,
    goal_cell,
    interleave,
    paired_ratio,
    profile_report,
    verdict,
)
from torch import nn

from divekit.data.detection import make_shapes
from divekit.engine.device import configure_allocator
from divekit.models.ssd import tiny_ssd
from divekit.ops import anchors as dk_anchors
from divekit.ops import boxes as dk_boxes

# the inputs' sizes: images (and anchor map side) of multibox_target, boxes of nms, the prior's
# map side, images of multibox_detection, the tiny_ssd training batch and image side
FULL = {"batch": 32, "map": 32, "boxes": 5000, "prior_map": 64, "det_batch": 4,
        "train_batch": 32, "train_size": 128}
SMOKE = {"batch": 4, "map": 8, "boxes": 200, "prior_map": 16, "det_batch": 2,
         "train_batch": 2, "train_size": 64}
S = dict(FULL)  # --smoke swaps in SMOKE


def interleaved_seconds(sides: dict[str, Callable[[], Any]], repeats: int,
                        number: int | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and CPU seconds per call of every side, ``repeats`` interleaved rounds (the
    sides in the order given), each an auto-sized loop (``number`` calls, if given), after one
    warm-up call: ``{side: (wall per round, CPU per round)}``."""
    loops, cpu = {}, {name: [] for name in sides}
    for name, fn in sides.items():
        fn()  # warm-up
        loops[name] = number or timeit.Timer(fn).autorange()[0]

    def loop(name: str) -> Callable[[], None]:
        fn, count = sides[name], loops[name]

        def run() -> None:
            c0 = time.process_time()
            for _ in range(count):
                fn()
            cpu[name].append((time.process_time() - c0) / count)
        return run

    walls = interleave({name: loop(name) for name in sides}, repeats)
    return {name: ([w / loops[name] for w in walls[name]], cpu[name]) for name in sides}


def median_seconds(fn: Callable[[], Any], repeats: int,
                   number: int | None = None) -> tuple[float, float]:
    """Median wall-clock and CPU seconds per call over ``repeats`` repeats of an auto-sized loop
    (``number`` calls a repeat, if given).

    The CPU time (this process's user + system time) is the steadier number on a shared machine:
    it does not count the time spent waiting for a core.
    """
    fn()  # warm-up
    if number is None:
        number, _ = timeit.Timer(fn).autorange()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(number):
            fn()
        wall.append((time.perf_counter() - w0) / number)
        cpu.append((time.process_time() - c0) / number)
    return statistics.median(wall), statistics.median(cpu)


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` normalised corner boxes, centres uniform, sides 0.02-0.3."""
    center = torch.rand(n, 2, generator=g)
    half = (torch.rand(n, 2, generator=g) * 0.28 + 0.02) / 2
    return torch.cat((center - half, center + half), dim=1)


# Each case returns (name, divekit's call, d2l's call, same result, goal); with d2l None (not
# installed) d2l's call and "same result" are None.
def case_multibox_target(d2l, g: torch.Generator):
    batch, side = S["batch"], S["map"]
    anchors = dk_anchors.multibox_prior(torch.zeros(1, 1, side, side), [0.75, 0.5, 0.25],
                                        [1, 2, 0.5])
    assert anchors.shape[1] == side * side * 5
    boxes = random_boxes(batch * 2, g).clamp(0, 1).reshape(batch, 2, 4)
    classes = torch.randint(0, 3, (batch, 2, 1), generator=g).float()
    labels = torch.cat((classes, boxes), dim=-1)  # (batch, 2, 5)
    same = None
    if d2l is not None:
        ours = dk_anchors.multibox_target(anchors, labels)
        theirs = d2l.multibox_target(anchors, labels)
        same = all(torch.equal(a, b) for a, b in zip(ours, theirs))
    return (
        f"multibox_target ({batch} x {anchors.shape[1]:,} anchors, 2 objects)",
        lambda: dk_anchors.multibox_target(anchors, labels),
        d2l and (lambda: d2l.multibox_target(anchors, labels)),
        same,
        15,
    )


def case_nms(d2l, g: torch.Generator):
    n = S["boxes"]
    boxes = random_boxes(n, g)
    scores = torch.rand(n, generator=g)
    same = d2l and torch.equal(dk_boxes.nms(boxes, scores, 0.5), d2l.nms(boxes, scores, 0.5))
    kept = dk_boxes.nms(boxes, scores, 0.5).numel()
    return (
        f"nms ({n:,} random boxes, {kept:,} kept)",
        lambda: dk_boxes.nms(boxes, scores, 0.5),
        d2l and (lambda: d2l.nms(boxes, scores, 0.5)),
        same,
        50,
    )


def case_nms_clustered(d2l, g: torch.Generator):
    """Detector-like: 5,000 boxes jittered around 20 objects, most of them suppressed."""
    n = S["boxes"]
    objects = torch.rand(20, 4, generator=g)
    pick = torch.randint(0, 20, (n,), generator=g)
    center = objects[pick, :2] + torch.randn(n, 2, generator=g) * 0.03
    size = (objects[pick, 2:] * 0.3 + 0.05) * (1 + torch.randn(n, 2, generator=g) * 0.1).abs()
    boxes = torch.cat((center - size / 2, center + size / 2), dim=1)
    scores = torch.rand(n, generator=g)
    same = d2l and torch.equal(dk_boxes.nms(boxes, scores, 0.5), d2l.nms(boxes, scores, 0.5))
    kept = dk_boxes.nms(boxes, scores, 0.5).numel()
    return (
        f"nms ({n:,} boxes around 20 objects, {kept} kept)",
        lambda: dk_boxes.nms(boxes, scores, 0.5),
        d2l and (lambda: d2l.nms(boxes, scores, 0.5)),
        same,
        50,
    )


def case_multibox_prior(d2l, g: torch.Generator):
    side = S["prior_map"]
    data = torch.zeros(1, 16, side, side)
    sizes, ratios = [0.2, 0.272], [1, 2, 0.5]
    same = d2l and torch.equal(
        dk_anchors.multibox_prior(data, sizes, ratios), d2l.multibox_prior(data, sizes, ratios)
    )
    return (
        f"multibox_prior ({side} x {side} map)",
        lambda: dk_anchors.multibox_prior(data, sizes, ratios),
        d2l and (lambda: d2l.multibox_prior(data, sizes, ratios)),
        same,
        None,
    )


def case_multibox_detection(d2l, g: torch.Generator):
    batch, side = S["det_batch"], S["map"]
    anchors = dk_anchors.multibox_prior(torch.zeros(1, 1, side, side), [0.75, 0.5, 0.25],
                                        [1, 2, 0.5])
    num_anchors = anchors.shape[1]
    cls_probs = torch.softmax(torch.randn(batch, 4, num_anchors, generator=g) * 2, dim=1)
    offset_preds = torch.randn(batch, num_anchors * 4, generator=g) * 0.5
    same = None
    if d2l is not None:
        ours = dk_anchors.multibox_detection(cls_probs, offset_preds, anchors, 0.5, 0.009999999)
        theirs = d2l.multibox_detection(cls_probs, offset_preds, anchors, 0.5)
        # d2l orders tied confidences arbitrarily (an unstable argsort): compare rows as sets
        same = all(
            torch.equal(torch.unique(ours[b], dim=0), torch.unique(theirs[b], dim=0))
            for b in range(batch)
        )
    return (
        f"multibox_detection ({batch} x {num_anchors:,} anchors, 3 classes)",
        lambda: dk_anchors.multibox_detection(cls_probs, offset_preds, anchors, 0.5, 0.009999999),
        d2l and (lambda: d2l.multibox_detection(cls_probs, offset_preds, anchors, 0.5)),
        same,
        None,
    )


def course_tiny_ssd(d2l, num_classes: int) -> nn.Module:
    """The course's ``TinySSD`` (d2l 14.7), as the book writes it, on ``d2l.multibox_prior``."""

    def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
        blk: list[nn.Module] = []
        for _ in range(2):
            blk.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            blk.append(nn.BatchNorm2d(out_channels))
            blk.append(nn.ReLU())
            in_channels = out_channels
        blk.append(nn.MaxPool2d(2))
        return nn.Sequential(*blk)

    def get_blk(i: int) -> nn.Module:
        if i == 0:
            filters = [3, 16, 32, 64]
            return nn.Sequential(*[down_sample_blk(a, b) for a, b in zip(filters, filters[1:])])
        if i == 1:
            return down_sample_blk(64, 128)
        if i == 4:
            return nn.AdaptiveMaxPool2d((1, 1))
        return down_sample_blk(128, 128)

    def concat_preds(preds: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.flatten(p.permute(0, 2, 3, 1), start_dim=1) for p in preds], dim=1)

    sizes = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
    ratios = [[1, 2, 0.5]] * 5
    num_anchors = len(sizes[0]) + len(ratios[0]) - 1

    class TinySSD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = num_classes
            for i, channels in enumerate([64, 128, 128, 128, 128]):
                setattr(self, f"blk_{i}", get_blk(i))
                setattr(self, f"cls_{i}", nn.Conv2d(channels, num_anchors * (num_classes + 1), 3, padding=1))
                setattr(self, f"bbox_{i}", nn.Conv2d(channels, num_anchors * 4, 3, padding=1))

        def forward(self, X: torch.Tensor):
            anchors, cls_preds, bbox_preds = [], [], []
            for i in range(5):
                X = getattr(self, f"blk_{i}")(X)
                anchors.append(d2l.multibox_prior(X, sizes=sizes[i], ratios=ratios[i]))
                cls_preds.append(getattr(self, f"cls_{i}")(X))
                bbox_preds.append(getattr(self, f"bbox_{i}")(X))
            cls = concat_preds(cls_preds)
            cls = cls.reshape(cls.shape[0], -1, self.num_classes + 1)
            return torch.cat(anchors, dim=1), cls, concat_preds(bbox_preds)

    return TinySSD()


def course_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):
    """The course's SSD loss (d2l 14.7): per-image mean cross-entropy plus mean masked L1."""
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = nn.functional.cross_entropy(cls_preds.reshape(-1, num_classes), cls_labels.reshape(-1),
                                      reduction="none").reshape(batch_size, -1).mean(dim=1)
    bbox = nn.functional.l1_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks,
                                 reduction="none").mean(dim=1)
    return cls + bbox


def case_tiny_ssd_training(d2l, g: torch.Generator):
    batch, side = S["train_batch"], S["train_size"]
    images, labels = make_shapes(batch, side, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    ours = tiny_ssd(num_classes=3)
    if d2l is None:
        ours = ours.to(memory_format=torch.channels_last)
        images_ours = images.contiguous(memory_format=torch.channels_last)
        sgd_ours = torch.optim.SGD(ours.parameters(), lr=0.2, weight_decay=5e-4)

        def step_alone() -> None:
            sgd_ours.zero_grad()
            loss, _ = ours(images_ours, labels)
            loss.backward()
            sgd_ours.step()

        return f"tiny_ssd train step ({batch} x {side}x{side} shapes)", step_alone, None, None, None
    theirs = course_tiny_ssd(d2l, 3)
    # the same starting weights: the course names modules blk_i / cls_i / bbox_i
    state = {}
    for key, value in ours.state_dict().items():
        kind, index, rest = key.split(".", 2)
        prefix = {"blocks": "blk", "cls_predictors": "cls", "bbox_predictors": "bbox"}[kind]
        state[f"{prefix}_{index}.{rest}"] = value.clone()
    theirs.load_state_dict(state)
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(ours(images), theirs(images)))
    # divekit's Trainer runs convolutional models in channels_last by default: so does this side
    ours = ours.to(memory_format=torch.channels_last)
    images_ours = images.contiguous(memory_format=torch.channels_last)
    sgd_ours = torch.optim.SGD(ours.parameters(), lr=0.2, weight_decay=5e-4)
    sgd_theirs = torch.optim.SGD(theirs.parameters(), lr=0.2, weight_decay=5e-4)

    def step_ours() -> None:
        sgd_ours.zero_grad()
        loss, _ = ours(images_ours, labels)
        loss.backward()
        sgd_ours.step()

    def step_theirs() -> None:  # the course's training loop body
        sgd_theirs.zero_grad()
        anchors, cls_preds, bbox_preds = theirs(images)
        bbox_labels, bbox_masks, cls_labels = d2l.multibox_target(anchors, labels)
        loss = course_calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks)
        loss.mean().backward()
        sgd_theirs.step()

    return (
        f"tiny_ssd train step ({batch} x {side}x{side} shapes)",
        step_ours,
        step_theirs,
        same,
        None,
    )


CASES = [
    case_multibox_target,
    case_nms,
    case_nms_clustered,
    case_multibox_prior,
    case_multibox_detection,
    case_tiny_ssd_training,
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="interleaved rounds (d2l, divekit); medians and the per-round ratios' min-max"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run the cases whose name contains this, e.g. nms")
    parser.add_argument("--smoke", action="store_true",
                        help="small inputs, one call a side after the warm-up: checks that every "
                             "case runs (seconds)")
    add_markdown_arg(parser)
    args = parser.parse_args()
    number = None
    if args.smoke:
        S.update(SMOKE)
        args.repeats, number = 1, 1
    try:
        import d2l
        import d2l.torch as d2l_torch
        version = d2l.__version__
    except ImportError:
        d2l_torch, version = None, "not installed: its column is skipped"
        print(
            "d2l is not installed: divekit runs alone (pip install --no-deps d2l==1.0.3 && "
            "pip install requests ipython matplotlib-inline pandas)"
        )
    torch.set_num_threads(args.threads)
    # as the divekit command does; both sides run in this process, so both get it
    allocator = configure_allocator()
    print(
        f"torch {torch.__version__}, d2l {version}, {platform.processor() or platform.machine()}, "
        f"torch.set_num_threads({torch.get_num_threads()}), median of {args.repeats} repeats, "
        f"allocator {'tuned' if allocator else 'default'}"
    )
    print(
        f"{'case':<52} {'divekit':>10} {'d2l':>10} {'speed-up':>8} {'(CPU time)':>10} {'goal':>6}  same result"
    )
    rows = []
    missed: list[tuple[str, str, dict[str, Callable[[], Any]]]] = []  # goals not met: profiled
    for index, make_case in enumerate(CASES):
        if args.only not in make_case.__name__:
            continue
        # each case draws from its own generator, so --only gives the very inputs of a full run
        g = torch.Generator().manual_seed(args.seed * 1000 + index)
        name, ours, theirs, same, goal = make_case(d2l_torch, g)
        goal_text = f">={goal}x" if goal else "-"
        train_batch = S["train_batch"]
        if theirs is None:
            wall_ours, _ = median_seconds(ours, args.repeats, number)
            print(f"{name:<52} {wall_ours * 1e3:8.2f}ms {'skipped':>10} {'-':>8} {'-':>10} "
                  f"{goal_text:>6}  -")
            rows.append([name, f"{wall_ours * 1e3:.2f} ms", "—", "—", "—", goal_cell(goal),
                         "d2l not installed", "—"])
            if make_case is case_tiny_ssd_training:
                print(f"{'  = training images/s':<52} {train_batch / wall_ours:10.1f}")
            continue
        t = interleaved_seconds({"d2l": theirs, "divekit": ours}, args.repeats, number)
        wall = paired_ratio(t["d2l"][0], t["divekit"][0])
        cpu = paired_ratio(t["d2l"][1], t["divekit"][1])
        wall_ours, wall_theirs = Spread.of(t["divekit"][0]).median, Spread.of(t["d2l"][0]).median
        print(
            f"{name:<52} {wall_ours * 1e3:8.2f}ms {wall_theirs * 1e3:8.2f}ms "
            f"{wall.median:7.1f}x {cpu.median:9.1f}x {goal_text:>6}  "
            f"{'yes' if same else 'NO'}"
        )
        print(f"{'':<4}rounds' speed-up {wall.lo:.1f}-{wall.hi:.1f}x: {verdict(wall, goal)}")
        if goal is not None and verdict(wall, goal) != "met":
            missed.append((name, verdict(wall, goal), {"d2l": theirs, "divekit": ours}))
        rows.append([name, f"{wall_ours * 1e3:.2f} ms", f"{wall_theirs * 1e3:.2f} ms", wall.md(1),
                     f"{cpu.median:.1f}×", goal_cell(goal), verdict(wall, goal),
                     "yes" if same else "NO"])
        if make_case is case_tiny_ssd_training:
            print(
                f"{'  = training images/s':<52} {train_batch / wall_ours:10.1f} "
                f"{train_batch / wall_theirs:10.1f}"
            )
            rows.append(["= `tiny_ssd` training images/s", f"{train_batch / wall_ours:.1f}",
                         f"{train_batch / wall_theirs:.1f}", "", "", "", "", ""])
    report = Report("Detection ops against d2l", threads=args.threads)
    report.table(["case", "divekit", "d2l", "speed-up (min–max)", "CPU-time speed-up", "goal",
                  "verdict", "same result"], rows, align="lrrrrlll",
                 caption=f"d2l {version}; allocator {'tuned' if allocator else 'default'} "
                         f"(`configure_allocator()`, both sides); per-call medians of "
                         f"{args.repeats} interleaved rounds (d2l, divekit), each an auto-sized "
                         "loop; speed-up: median and min–max of the per-round ratios.")
    for name, outcome, sides in missed[:1] if args.smoke else missed:  # where the time goes
        profile_report(report, name, outcome, sides)
    report.write(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
