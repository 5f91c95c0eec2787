"""Augmentation throughput: divekit's ``standard`` pipeline against the course's approach.

* divekit batch (the default of ``divekit train --augment``): images held as one in-memory float
  tensor; minibatches drawn by :class:`~divekit.data.loader.TensorBatchLoader`, then
  ``BatchAugment("standard")`` (flip, random resized crop back to the input size, colour jitter,
  each with per-sample parameters, applied to the whole batch) and normalisation, in the main
  process. It uses no loader workers, so its figure is the same in every row.
* divekit sample (``--augment-mode sample``): ``Augment("standard")`` (transforms.v2 on tensors)
  per sample through ``TensorBatchLoader``'s ``sample_transform`` path (a DataLoader with
  workers), then one batched normalisation.
* d2l: what the course does (``d2l.train_with_data_aug``): a dataset of PIL images, a
  ``torchvision.transforms`` (v1) ``Compose`` of the same three operations plus ``ToTensor`` and
  ``Normalize`` per sample, a ``DataLoader`` with the same workers.

Data: the CIFAR-10 sample PNGs of ``../shared/data/kaggle_cifar10_sample`` when present (32×32
RGB), else random 32×32 RGB images (said in the output). Prints images/s and the ratio.

    python benchmarks/augment.py                 # 1 and 2 workers, 2 epochs each
    python benchmarks/augment.py --workers 2 --epochs 3
    python benchmarks/augment.py --smoke         # 64 images, 1 epoch, 1 worker: checks that it runs

Where a goal is not met (or not settled), the section gets a side-by-side cProfile table of the
course's side and divekit's over one batch's work, done in this process with 0 workers: a
profiler sees only its own process, and a worker does the same per-batch work the main process
does with none, so one table per kind of goal ("batch", "sample") stands for every worker count.
What workers add (starting processes, pickling the batches back) is in the ratios, not in the
tables; the line above each table gives one batch's time in this process on both sides: a gap
between that ratio and the measured one comes from outside the per-batch work (the workers, their
start-up and transfers, each epoch's set-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
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
    wall,
)
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "kaggle_cifar10_sample"


def load_images(n: int) -> tuple[str, np.ndarray]:
    files = sorted(CIFAR.rglob("*.png"))[:n] if CIFAR.is_dir() else []
    if files:
        arr = np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
        return f"{len(arr)} CIFAR-10 sample PNGs (../shared/data)", arr
    rng = np.random.default_rng(0)
    return f"{n} random 32x32 RGB images", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


class PILDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = [Image.fromarray(a) for a in images]
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def d2l_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int) -> DataLoader:
    from torchvision import transforms as T

    size = images.shape[1]
    tf = T.Compose([
        T.RandomHorizontalFlip(), T.RandomResizedCrop(size, scale=(0.3, 1.0)),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), T.ToTensor(),
        T.Normalize([0.5] * 3, [0.25] * 3),
    ])
    return DataLoader(PILDataset(images, labels, tf), batch_size=batch, shuffle=True, num_workers=workers)


def divekit_loader(images: np.ndarray, labels: np.ndarray, batch: int, workers: int):
    from divekit.data.augment import Augment, SampleTransform
    from divekit.data.loader import TensorBatchLoader

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    return TensorBatchLoader(
        x, torch.from_numpy(labels), batch_size=batch, shuffle=True, workers=workers,
        sample_transform=SampleTransform(Augment("standard")),
        batch_transform=lambda b: ((b[0] - mean) / std, b[1]),
    )


def divekit_batch_loader(images: np.ndarray, labels: np.ndarray, batch: int):
    from divekit.data.batch_augment import BatchAugment
    from divekit.data.loader import TensorBatchLoader

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    augment = BatchAugment("standard")
    return TensorBatchLoader(x, torch.from_numpy(labels), batch_size=batch, shuffle=True,
                             batch_transform=lambda b: ((augment(b[0]) - mean) / std, b[1]))


def images_per_second(loader, epochs: int) -> float:
    seen, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - t0)


GOALS = {"batch": 10.0, "sample": 1.0}  # issue 26: over the PIL pipeline, every worker count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="images (default: 1000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds (d2l, batch, sample) per worker count; medians and "
                        "the per-round ratios' min-max")
    p.add_argument("--smoke", action="store_true",
                   help="64 images, batch 16, 1 epoch, 1 worker: checks that it runs (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.n, args.batch_size, args.epochs, args.workers, args.repeats = 64, 16, 1, [1], 1
    torch.set_num_threads(1)
    what, images = load_images(args.n)
    labels = np.zeros(len(images), dtype=np.int64)
    print(f"data: {what}; batch {args.batch_size}; {args.epochs} epochs; 'standard' augmentation; "
          f"medians of {args.repeats} interleaved rounds")
    print(f"{'workers':>7} {'batch img/s':>12} {'sample img/s':>13} {'d2l img/s':>10} "
          f"{'batch/d2l':>10} {'sample/d2l':>11}")
    rows, goal_rows = [], []
    outcomes: dict[str, list[tuple[int, str]]] = {}  # kind: [(workers, verdict)] missed
    for w in args.workers:
        rates: dict[str, list[float]] = {"d2l": [], "batch": [], "sample": []}

        def measure(side: str, make, w=w, rates=rates):
            def run() -> None:  # a fresh loader each round, as a training epoch loop makes
                rates[side].append(images_per_second(make(), args.epochs))
            return run

        interleave({
            "d2l": measure("d2l", lambda w=w: d2l_loader(images, labels, args.batch_size, w)),
            "batch": measure("batch", lambda: divekit_batch_loader(images, labels,
                                                                   args.batch_size)),
            "sample": measure("sample", lambda w=w: divekit_loader(images, labels,
                                                                   args.batch_size, w)),
        }, args.repeats)
        med = {k: Spread.of(v).median for k, v in rates.items()}
        ratio = {k: paired_ratio(rates[k], rates["d2l"]) for k in ("batch", "sample")}
        print(f"{w:>7} {med['batch']:>12.0f} {med['sample']:>13.0f} {med['d2l']:>10.0f} "
              f"{ratio['batch'].median:>10.2f} {ratio['sample'].median:>11.2f}")
        rows.append([w, f"{med['batch']:,.0f}", f"{med['sample']:,.0f}", f"{med['d2l']:,.0f}",
                     ratio["batch"].md(), ratio["sample"].md()])
        for k in ("batch", "sample"):
            outcome = verdict(ratio[k], GOALS[k])
            goal_rows.append([f"{k} / d2l, {w} worker(s)", ratio[k].md(), goal_cell(GOALS[k]),
                              outcome])
            if outcome != "met":  # not met or not settled: profiled once per kind below
                outcomes.setdefault(k, []).append((w, outcome))
    for row in goal_rows:
        print(f"  goal {row[0]}: {row[1].replace('**', '').replace('×', 'x')} "
              f"{row[2].replace('≥', '>=').replace('×', 'x')}: {row[3]}")
    report = Report("Augmentation pipeline against the course's PIL approach", threads=1)
    report.table(["workers", "batch img/s", "sample img/s", "d2l img/s", "batch / d2l",
                  "sample / d2l"], rows, align="rrrrrr",
                 caption=f"{what}, batch {args.batch_size}, {args.epochs} epochs a round, one "
                         f"thread per process; medians of {args.repeats} interleaved rounds "
                         "(d2l, batch, sample), ratios: median and min–max of the per-round "
                         "ratios.")
    report.table(["ratio", "× (min–max)", "goal", "verdict"], goal_rows, align="lrll")
    missed = [k for k in ("batch", "sample") if k in outcomes]
    for kind in missed[:1] if args.smoke else missed:  # where the time goes; smoke: one case
        profile_kind(report, kind, outcomes[kind], images, labels, args.batch_size)
    report.write(args.markdown)


def one_batch(loader) -> object:
    """The first batch of a fresh pass over ``loader`` (0 workers: all of it in this process)."""
    return next(iter(loader))


def profile_kind(report: Report, kind: str, outcomes: list[tuple[int, str]], images: np.ndarray,
                 labels: np.ndarray, batch: int) -> None:
    """The analysis a ``kind`` ("batch" or "sample") goal not met owes: one batch of the
    course's PIL pipeline and one of divekit's ``kind`` pipeline, both with 0 workers (a worker
    process is invisible to the profiler; the per-batch work is the one a worker does), timed
    once each and then profiled side by side (:func:`_common.profile_report`)."""
    course = d2l_loader(images, labels, batch, 0)
    ours = (divekit_batch_loader(images, labels, batch) if kind == "batch"
            else divekit_loader(images, labels, batch, 0))
    sides = {"course (PIL, v1 transforms)": lambda: one_batch(course),
             f"divekit {kind}": lambda: one_batch(ours)}
    for fn in sides.values():  # warm-up: lazy imports, first touch
        fn()
    t_course, t_ours = (min(wall(fn) for _ in range(3)) for fn in sides.values())
    verdicts = sorted({o for _, o in outcomes})
    where = "; ".join(f"{o} at {', '.join(str(w) for w, x in outcomes if x == o)} worker(s)"
                      for o in verdicts)
    note = (f"Goal {kind} / d2l {where}. Profiled: one batch of {batch} images in this "
            f"process with 0 workers (a profiler sees no worker process; a worker does this "
            f"same per-batch work, so one table stands for every worker count"
            f"{'; divekit batch uses no workers in any row' if kind == 'batch' else ''}). "
            f"One batch, "
            f"best of 3: course {t_course * 1e3:.1f} ms, divekit {kind} "
            f"{t_ours * 1e3:.1f} ms, {t_course / t_ours:.2f}× against the goal's "
            f"{GOALS[kind]:g}×; the measured ratio also carries the workers' start-up and "
            f"transfers and each epoch's set-up.")
    print(note)
    report.text(note)
    profile_report(report, f"one batch of {kind} augmentation with 0 workers",
                   ", ".join(verdicts), sides, k=10)


if __name__ == "__main__":
    main()
