"""Training throughput: divekit's Trainer against the d2l package's ``train_ch6``.

Both train the same architecture (divekit's registered model, fresh weights) with plain SGD,
the same batch size, learning rate, thread count, samples and epochs, and both evaluate on the
same validation samples after every epoch. Throughput is end-to-end: training samples per
wall-clock second of the whole call, data preparation included.

The d2l side runs in two ways:

* ``d2l pipeline``: what the course does, ``torchvision.datasets.MNIST`` (the class
  ``d2l.load_data_fashion_mnist`` uses) with ``Resize`` + ``ToTensor`` per sample and
  ``d2l.get_dataloader_workers()`` loader processes;
* ``d2l loop``: ``train_ch6`` fed a ``DataLoader`` over the very tensors divekit trains on
  (decoded and resized once inside the timed call, as divekit's are), which isolates the loop.

divekit runs with its defaults (channels_last for convolutional models) and once more with
``--no-channels-last``.

Data: the real MNIST from ``../shared/data/MNIST/raw`` when present, else random tensors of
the same shape (said in the output).

    python benchmarks/train_throughput.py                # both models, prints the ratios
    python benchmarks/train_throughput.py --models lenet --epochs 2
    python benchmarks/train_throughput.py --smoke        # tiny sizes: checks that it runs

Without the d2l package the d2l rows are skipped (said in the output) and divekit runs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from _common import (
    PeakRSS,
    Report,
    Spread,
    add_markdown_arg,
    goal_cell,
    interleave,
    paired_ratio,
    verdict,
)
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "MNIST" / "raw"

CASES = {  # model: (image size, batch size, lr, train samples, val samples)
    "lenet": (28, 256, 0.9, 12000, 2000),
    "resnet18": (96, 128, 0.05, 768, 256),
}
SMOKE_CASES = {  # --smoke: the same models and image sizes, 5 small batches (train_ch6's least)
    "lenet": (28, 32, 0.9, 160, 64),
    "resnet18": (96, 4, 0.05, 20, 8),
}


def load_mnist(n_train: int, n_val: int) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if SHARED_MNIST.is_dir():
        from divekit.data.idx import read_idx

        def read(stem: str) -> torch.Tensor:
            return torch.from_numpy(read_idx(SHARED_MNIST / f"{stem}.gz").copy())

        xtr, ytr = read("train-images-idx3-ubyte")[:n_train], read("train-labels-idx1-ubyte")[:n_train]
        xva, yva = read("t10k-images-idx3-ubyte")[:n_val], read("t10k-labels-idx1-ubyte")[:n_val]
        return "real MNIST (../shared/data)", xtr, ytr.long(), xva, yva.long()
    g = torch.Generator().manual_seed(0)
    xtr = torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8)
    xva = torch.randint(0, 256, (n_val, 28, 28), generator=g, dtype=torch.uint8)
    ytr = torch.randint(0, 10, (n_train,), generator=g)
    yva = torch.randint(0, 10, (n_val,), generator=g)
    return "random tensors (../shared/data absent)", xtr, ytr, xva, yva


def write_torchvision_layout(root: Path, xtr, ytr, xva, yva) -> None:
    """IDX files where ``torchvision.datasets.MNIST(root)`` looks for them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(path: Path, arr: torch.Tensor, magic: int) -> None:
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        path.write_bytes(header + arr.to(torch.uint8).numpy().tobytes())

    idx(raw / "train-images-idx3-ubyte", xtr, 2051)
    idx(raw / "train-labels-idx1-ubyte", ytr, 2049)
    idx(raw / "t10k-images-idx3-ubyte", xva, 2051)
    idx(raw / "t10k-labels-idx1-ubyte", yva, 2049)


def run_d2l(model_name, lr, epochs, loaders) -> None:
    import d2l.torch as d2l
    import matplotlib.pyplot as plt

    from divekit.models import create_model

    torch.manual_seed(0)
    net = create_model(model_name, num_classes=10, in_channels=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the Animator "displays" figures as text
        d2l.train_ch6(net, loaders[0], loaders[1], epochs, lr, torch.device("cpu"))
    plt.close("all")


def run_d2l_loop(model_name, lr, epochs, xtr, ytr, xva, yva, size, batch) -> None:
    """``train_ch6`` on DataLoaders over tensors decoded and resized once, as divekit's are; the
    preparation is timed on both sides."""
    tx, ty, vx, vy = prepared_tensors(xtr, ytr, xva, yva, size)
    loaders = (DataLoader(TensorDataset(tx, ty), batch, shuffle=True),
               DataLoader(TensorDataset(vx, vy), batch))
    run_d2l(model_name, lr, epochs, loaders)


def d2l_pipeline_loaders(tmp: Path, size: int, batch: int, n_train: int, n_val: int):
    """The course's ``load_data_fashion_mnist(batch, resize)``, on MNIST files."""
    import d2l.torch as d2l
    import torchvision
    from torchvision import transforms

    trans = [transforms.ToTensor()]
    if size != 28:
        trans.insert(0, transforms.Resize(size))
    trans = transforms.Compose(trans)
    train = torchvision.datasets.MNIST(root=str(tmp), train=True, transform=trans, download=False)
    val = torchvision.datasets.MNIST(root=str(tmp), train=False, transform=trans, download=False)
    workers = d2l.get_dataloader_workers()
    return (
        DataLoader(Subset(train, range(n_train)), batch, shuffle=True, num_workers=workers),
        DataLoader(Subset(val, range(n_val)), batch, shuffle=False, num_workers=workers),
    )


def prepared_tensors(xtr, ytr, xva, yva, size):
    from divekit.data.vision import resize_images

    def prep(x):
        x = x.float().div_(255).unsqueeze(1)
        return resize_images(x, size) if size != 28 else x

    return prep(xtr), ytr, prep(xva), yva


def run_divekit(model_name, size, batch, lr, epochs, xtr, ytr, xva, yva, channels_last=None) -> None:
    from divekit.data.vision import ImageClassificationData
    from divekit.engine import Trainer
    from divekit.tasks.classify import ClassificationTask, ClassifyConfig

    tx, ty, vx, vy = prepared_tensors(xtr, ytr, xva, yva, size)  # decode + resize once
    data = ImageClassificationData(
        train_images=tx, train_labels=ty, val_images=vx, val_labels=vy,
        classes=[str(i) for i in range(10)], name="mnist", mean=(0.0,), std=(1.0,),
    )
    cfg = ClassifyConfig(model=model_name, data="mnist", epochs=epochs, batch_size=batch, lr=lr,
                         momentum=0.0, normalize=False, quiet=True, device="cpu",
                         channels_last=channels_last)
    task = ClassificationTask(cfg)
    task.data = data  # the tensors above, instead of loading cfg.data (a lazy cached property)
    Trainer(task, cfg).fit()


GOALS = {"lenet": 1.3, "resnet18": 1.5}  # divekit (its defaults) over each d2l side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lenet,resnet18", help="comma-separated (lenet,resnet18)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved rounds (every side once per round); medians and the "
                             "min-max of the per-round ratios are reported")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the sample counts")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sample counts and batches, 1 repeat, 1 thread: checks that "
                             "it runs (seconds)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (each side once more in a fresh process)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # side_memory's
    add_markdown_arg(parser)
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.epochs, args.repeats, args.scale, args.threads = 1, 1, 1.0, 1
    try:
        import d2l.torch  # noqa: F401
        have_d2l = True
    except ImportError:
        have_d2l = False
        print("d2l is not installed: the d2l rows are skipped (pip install --no-deps d2l==1.0.3 "
              "&& pip install requests ipython matplotlib-inline pandas)")
    torch.set_num_threads(args.threads)
    import divekit.tasks.classify  # noqa: F401  import costs stay out of the timings
    from divekit.engine.device import configure_allocator

    configure_allocator()  # as the divekit command does; d2l's side runs in this process too
    print(f"torch {torch.__version__}, {args.threads} threads, {args.epochs} epoch(s), "
          f"median of {args.repeats} interleaved rounds")
    report = Report("Training throughput: divekit's Trainer vs d2l's `train_ch6`",
                    threads=args.threads)
    rows, memory_rows = [], []
    for name in args.models.split(","):
        size, batch, lr, n_train, n_val = cases[name]
        n_train, n_val = int(n_train * args.scale), int(n_val * args.scale)
        with model_sides(name, cases, args, have_d2l) as (source, sides):
            if args.memory_of:
                peak_rss_of(sides[args.memory_of])
                return 0
            peers = tuple(k for k in sides if not k.startswith("divekit"))
            times = interleave(sides, args.repeats)
        if not args.no_memory and (not args.smoke or name == "lenet"):
            # --smoke: divekit's side of one model, to check the path (fresh processes cost
            # seconds each)
            measured = ["divekit"] if args.smoke else list(sides)
            memory = {k: side_memory(k, name, args) for k in measured}
            for k, (own, workers, before) in memory.items():
                print(f"  peak RSS {name} {k}: {own:,.0f} MB ({own - before:+,.0f} MB in the "
                      "call)")
                memory_rows.append([name, k, f"{own:,.0f}", f"{own - before:+,.0f}",
                                    f"{workers:,.0f}" if workers else "—"])
            for k in peers if not args.smoke else ():
                ok = memory["divekit"][0] <= memory[k][0]
                print(f"  peak RSS {name}: divekit {memory['divekit'][0]:,.0f} MB, {k} "
                      f"{memory[k][0]:,.0f} MB (goal divekit <= {k}: {'met' if ok else 'not met'})")
        rates = {k: [n_train * args.epochs / t for t in v] for k, v in times.items()}
        print(f"\n{name} at {size}x{size}, batch {batch}, {n_train} train + {n_val} val "
              f"samples, {source}")
        side_rows = []
        for k, r in rates.items():
            s = Spread.of(r)
            print(f"  {k:<26} {s.median:8.1f} samples/s ({s.lo:.1f}-{s.hi:.1f})")
            side_rows.append([k, f"{s.median:.1f}", f"{s.lo:.1f}–{s.hi:.1f}"])
        report.table(["side", "samples/s (median)", "min–max"], side_rows,
                     caption=f"**{name}** at {size}×{size}, batch {batch}, {n_train:,} train + "
                             f"{n_val:,} val samples, {args.epochs} epoch(s), {source}:")
        for ours in ("divekit", "divekit --no-channels-last"):
            for k in peers:
                goal = GOALS[name] if ours == "divekit" else None
                rows.append((name, ours, k, paired_ratio(rates[ours], rates[k]), goal))
    print(f"\nsummary (goals: {', '.join(f'{m} >= {g}x' for m, g in GOALS.items())}):"
          if have_d2l else "\nsummary: d2l peer skipped (not installed)")
    for name, ours, k, ratio, goal in rows:
        print(f"  {name:<9} {ours:<26} / {k:<13} {ratio.median:5.2f}x "
              f"({ratio.lo:.2f}-{ratio.hi:.2f})  {verdict(ratio, goal)}")
    if rows:
        report.table(["model", "ratio", "× (min–max)", "goal", "verdict"],
                     [[n, f"{o} / {k}", r.md(), goal_cell(g), verdict(r, g)]
                      for n, o, k, r, g in rows], align="llrll",
                     caption=f"Ratios of samples/s, per interleaved round ({args.repeats} "
                             "rounds), median and min–max:")
    else:
        report.text("d2l is not installed: no ratios.")
    if memory_rows:
        report.table(["model", "side", "peak RSS, MB", "of which the call", "largest child "
                      "process, MB"], memory_rows, align="llrrr",
                     caption="Peak resident memory of each side, each run once more in a fresh "
                             "process of its own (the same imports and data; `ru_maxrss`; "
                             "\"of which the call\": above the RSS just before it). Goal: "
                             "divekit ≤ the course.")
    report.write(args.markdown)
    return 0


@contextlib.contextmanager
def model_sides(name: str, cases: dict, args: argparse.Namespace, have_d2l: bool):
    """The data of one model and every side's call on it (``(source, {side: fn})``), with the
    course's MNIST files written where torchvision looks for them while the block runs."""
    size, batch, lr, n_train, n_val = cases[name]
    n_train, n_val = int(n_train * args.scale), int(n_val * args.scale)
    source, xtr, ytr, xva, yva = load_mnist(n_train, n_val)
    tmp = Path(tempfile.mkdtemp(prefix="dk-bench-"))
    try:
        write_torchvision_layout(tmp, xtr, ytr, xva, yva)
        train = (xtr, ytr, xva, yva)
        course = (tmp, size, batch, n_train, n_val)  # its loaders are built inside the call

        def pipeline():
            run_d2l(name, lr, args.epochs, d2l_pipeline_loaders(*course))

        sides = {  # interleaved in this order, peer then divekit, every round
            "d2l loop": partial(run_d2l_loop, name, lr, args.epochs, *train, size, batch),
            "divekit": partial(run_divekit, name, size, batch, lr, args.epochs, *train),
            "d2l pipeline": pipeline,
            "divekit --no-channels-last": partial(run_divekit, name, size, batch, lr,
                                                  args.epochs, *train, False),
        }
        if not have_d2l:
            sides = {k: v for k, v in sides.items() if k.startswith("divekit")}
        yield source, sides
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_of(fn) -> None:
    """Run one side once and print this process's peak RSS and its largest child's (loader
    workers), in MB: what :func:`side_memory` reads."""
    import resource

    before = PeakRSS.rss_mb()  # imports and data loaded: what the call adds comes on top
    fn()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak_rss_mb {own:.1f} {workers:.1f} {before:.1f}")


def side_memory(side: str, model: str,
                args: argparse.Namespace) -> tuple[float, float, float]:
    """Peak RSS (MB) of ``side`` run once in a fresh process, of its largest child, and the
    RSS just before the call (imports and data loaded)."""
    import subprocess

    cmd = [sys.executable, __file__, "--memory-of", side, "--models", model, "--epochs",
           str(args.epochs), "--threads", str(args.threads), "--scale", str(args.scale)]
    proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True,
                          text=True, check=True)
    own, workers, before = proc.stdout.strip().splitlines()[-1].split()[1:]
    return float(own), float(workers), float(before)


if __name__ == "__main__":
    sys.exit(main())
