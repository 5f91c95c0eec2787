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
    MEMORY_HEADERS,
    SUMMARY_NOTE,
    Report,
    Spread,
    add_markdown_arg,
    add_memory_args,
    endless,
    goal_cell,
    interleave,
    memory_cells,
    memory_note,
    memory_runs,
    memory_verdict,
    paired_ratio,
    print_peak_rss,
    profile_table,
    sides_peak_rss,
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


def run_divekit(model_name, size, batch, lr, epochs, xtr, ytr, xva, yva, channels_last=None,
                compile=False) -> list[dict]:
    """divekit's Trainer on the tensors; its history (one row per epoch)."""
    return divekit_trainer(model_name, size, batch, lr, epochs, xtr, ytr, xva, yva,
                           channels_last, compile).fit()


def divekit_trainer(model_name, size, batch, lr, epochs, xtr, ytr, xva, yva, channels_last=None,
                    compile=False):
    """The Trainer :func:`run_divekit` fits (the data prepared, the model built)."""
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
                         channels_last=channels_last, compile=compile)
    task = ClassificationTask(cfg)
    task.data = data  # the tensors above, instead of loading cfg.data (a lazy cached property)
    return Trainer(task, cfg)


COMPILE_GOAL = 1.2  # --compile becomes a family's default where it wins this much (issue 26)


def compile_rows(name: str, cases: dict, args: argparse.Namespace) -> list[list[str]]:
    """divekit with and without ``--compile``, interleaved, each a fresh Trainer training two
    epochs (``--no-compile`` explicitly: the eager side whatever the family's default). The
    speed after compilation is the second epoch's training samples/s (history's
    ``samples_per_s``: the steps alone, no validation); the compile time is what the compiled
    side's first epoch (training and validation) took beyond its second, less the same
    difference of the eager side (its own warm-up). Before every run the in-process compile
    caches are cleared (``torch._dynamo.reset()``), so each round compiles again; Inductor's
    cache on disk starts empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so round 1's compile
    time is a first run's and the later rounds' that of a run after it on the same machine.
    Returns the table rows and prints them."""
    import torch._dynamo

    size, batch, lr, n_train, n_val = cases[name]
    n_train, n_val = int(n_train * args.scale), int(n_val * args.scale)
    source, xtr, ytr, xva, yva = load_mnist(n_train, n_val)
    train = (xtr, ytr, xva, yva)
    rates: dict[bool, list[float]] = {False: [], True: []}
    extra: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for compiled in (False, True):
            torch._dynamo.reset()
            rows = run_divekit(name, size, batch, lr, 2, *train, compile=compiled)
            rates[compiled].append(rows[1]["samples_per_s"])
            extra[compiled].append(rows[0]["seconds"] - rows[1]["seconds"])
    compile_s = [c - e for c, e in zip(extra[True], extra[False])]
    ratio = Spread.of([c / e for c, e in zip(rates[True], rates[False])])
    eager, comp = Spread.of(rates[False]), Spread.of(rates[True])
    later = Spread.of(compile_s[1:]) if len(compile_s) > 1 else None
    decision = "on" if ratio.median >= COMPILE_GOAL else "off"
    print(f"\n{name} --compile ({n_train} train samples, batch {batch}, 2 epochs, {source}):"
          f"\n  eager {eager.median:.1f} samples/s ({eager.lo:.1f}-{eager.hi:.1f}), compiled "
          f"{comp.median:.1f} ({comp.lo:.1f}-{comp.hi:.1f}): {ratio} after compilation; "
          f"compile time {compile_s[0]:.1f} s first run"
          + (f", {later.median:.1f} s ({later.lo:.1f}-{later.hi:.1f}) later runs" if later
             else "") + f"; default {decision} (goal >= {COMPILE_GOAL}x: "
          f"{verdict(ratio, COMPILE_GOAL)})")
    return [[name, f"{eager.median:.1f} ({eager.lo:.1f}–{eager.hi:.1f})",
             f"{comp.median:.1f} ({comp.lo:.1f}–{comp.hi:.1f})", ratio.md(),
             f"{compile_s[0]:.1f}",
             f"{later.median:.1f} ({later.lo:.1f}–{later.hi:.1f})" if later else "—",
             verdict(ratio, COMPILE_GOAL), decision]]


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
    add_memory_args(parser)
    parser.add_argument("--compile", choices=["on", "off", "only"], default="on",
                        help="the --compile rows (divekit eager vs compiled, 2 epochs a run, "
                             "compile time apart): on (default; skipped by --smoke, whose "
                             "compile would take a minute), off, or only them")
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
    rows, memory_rows, compiled_rows = [], [], []
    if args.compile != "off" and not args.smoke and not args.memory_of:
        import os

        # Inductor's on-disk cache, empty: round 1 pays a first run's compile time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dk-inductor-")
        for name in args.models.split(","):
            compiled_rows += compile_rows(name, cases, args)
        shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    elif args.smoke:
        print("--smoke: no --compile rows (compiling takes a minute; tests/test_compile.py "
              "checks the compiled path)")
    for name in args.models.split(",") if args.compile != "only" else ():
        size, batch, lr, n_train, n_val = cases[name]
        n_train, n_val = int(n_train * args.scale), int(n_val * args.scale)
        with model_sides(name, cases, args, have_d2l) as (source, sides):
            if args.memory_of:
                print_peak_rss(sides[args.memory_of])
                return 0
            peers = tuple(k for k in sides if not k.startswith("divekit"))
            times = interleave(sides, args.repeats)
        if not args.no_memory and (not args.smoke or name == "lenet"):
            # --smoke: divekit's side of one model, to check the path (fresh processes cost
            # seconds each)
            measured = ["divekit"] if args.smoke else list(sides)
            # one fresh process at a time (two trainings would share the 2 cores), the sides'
            # runs interleaved
            memory = sides_peak_rss(__file__, measured, memory_argv(name, args), parallel=1,
                                    runs=memory_runs(args))
            measured_peers = [k for k in peers if k in memory]
            for k, peak in memory.items():
                own, _workers, before = peak
                print(f"  peak RSS {name} {k}: {own:,.0f} MB ({own - before:+,.0f} MB in the "
                      "call)")
                goal = "; ".join(f"vs {p}: {memory_verdict(peak, memory[p])}"
                                 for p in measured_peers) if k.startswith("divekit") else ""
                memory_rows.append([name, k, *memory_cells(peak), goal or "—"])
            for k in measured_peers:
                print(f"  peak RSS {name}: divekit {memory['divekit'][0]:,.0f} MB, {k} "
                      f"{memory[k][0]:,.0f} MB (goal divekit <= {k}: "
                      f"{memory_verdict(memory['divekit'], memory[k])})")
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
    if args.compile != "only":
        print(f"\nsummary (goals: {', '.join(f'{m} >= {g}x' for m, g in GOALS.items())}):"
              if have_d2l else "\nsummary: d2l peer skipped (not installed)")
    for name, ours, k, ratio, goal in rows:
        print(f"  {name:<9} {ours:<26} / {k:<13} {ratio.median:5.2f}x "
              f"({ratio.lo:.2f}-{ratio.hi:.2f})  {verdict(ratio, goal)}")
    if compiled_rows:
        report.table(["model", "eager samples/s", "compiled samples/s", "compiled / eager",
                      "compile s, first run", "compile s, later runs", f"≥ {COMPILE_GOAL}×",
                      "--compile default"], compiled_rows, align="lrrrrrll",
                     caption="`--compile` (torch.compile): divekit's Trainer eager "
                             "(`--no-compile`) and compiled, interleaved, each run training 2 "
                             "epochs from scratch. Samples/s of the second epoch's steps (after "
                             "compilation); the compile time apart: the compiled run's first "
                             "epoch beyond its second, less the eager run's warm-up. First run: "
                             "Inductor's disk cache empty; later runs: the cache of the runs "
                             "before (in-process caches cleared every run). A family whose "
                             f"median reaches {COMPILE_GOAL}× gets --compile by default.")
    if rows:
        report.table(["model", "ratio", "× (min–max)", "goal", "verdict"],
                     [[n, f"{o} / {k}", r.md(), goal_cell(g), verdict(r, g)]
                      for n, o, k, r, g in rows], align="llrll",
                     caption=f"Ratios of samples/s, per interleaved round ({args.repeats} "
                             "rounds), median and min–max:")
        if have_d2l:
            profile_goals(rows, cases, args, report)
    elif args.compile != "only":
        report.text("d2l is not installed: no ratios.")
    if memory_rows:
        report.table(["model", *MEMORY_HEADERS, "divekit ≤ the course"], memory_rows,
                     align="llrrrl",
                     caption="Peak resident memory of each side, each run once more in a fresh "
                             "process of its own (the same imports and data; `VmHWM`; "
                             "\"of which the call\": above the RSS just before it). Goal: "
                             f"divekit ≤ the course. {memory_note(memory_runs(args))}")
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


def memory_argv(model: str, args: argparse.Namespace) -> list[str]:
    """The arguments of a ``--memory-of SIDE`` child (:func:`_common.sides_peak_rss`): this
    model at this run's sizes, without --compile."""
    argv = ["--models", model, "--epochs", str(args.epochs), "--threads", str(args.threads),
            "--scale", str(args.scale), "--compile", "off"]
    return argv + (["--smoke"] if args.smoke else [])


# ----------------------------------------------------------------------------- profiles
PROFILE_STEPS = 3  # training steps of each side under torch.profiler, where a goal is not met


def course_steps(net: torch.nn.Module, loader: DataLoader, lr: float):
    """``run(k)``: the next ``k`` steps of ``train_ch6``'s inner loop as it runs them (its
    weight init, SGD and ``CrossEntropyLoss`` built once, as it builds them): zero_grad, the
    batch to the device, forward, loss, backward, step, then its ``Accumulator``'s loss and
    accuracy sums under ``no_grad`` and the running loss and accuracy it reads."""
    import d2l.torch as d2l

    def init_weights(m: torch.nn.Module) -> None:
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d):
            torch.nn.init.xavier_uniform_(m.weight)

    net.apply(init_weights)
    device = torch.device("cpu")
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = torch.nn.CrossEntropyLoss()
    metric = d2l.Accumulator(3)
    net.train()
    batches = endless(loader)

    def run(k: int) -> None:
        for _ in range(k):
            X, y = next(batches)
            optimizer.zero_grad()
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            loss_ = loss(y_hat, y)
            loss_.backward()
            optimizer.step()
            with torch.no_grad():
                metric.add(loss_ * X.shape[0], d2l.accuracy(y_hat, y), X.shape[0])
            _ = (metric[0] / metric[2], metric[1] / metric[2])  # train_l, train_acc

    return run


def divekit_steps(trainer):
    """``run(k)``: the next ``k`` steps of the Trainer's epoch as ``Trainer._train_epoch`` runs
    them: ``Trainer._step`` (the batch to the device in channels_last, zero_grad, the
    strategy's forward and backward, the finite-loss check, the optimizer and schedule steps)
    and the epoch's running metric sums."""
    import itertools

    trainer.strategy.train_model.train()
    trainer.task.on_epoch_start(trainer.model, 0)
    batches, index = endless(trainer.train_loader), itertools.count()

    def run(k: int) -> None:
        for _ in range(k):
            n, logs = trainer._step(next(batches), next(index))
            trainer.seen += n
            for key, v in logs.items():
                if n:
                    v = v.detach().float() * n
                    trainer.sums[key] = trainer.sums[key] + v if key in trainer.sums else v

    return run


def step_profile(name: str, peer: str, cases: dict, args: argparse.Namespace,
                 steps: int) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of :func:`_common.profile_table` (the top operators by self CPU time)
    over ``steps`` training steps of ``peer``'s ``train_ch6`` (fed as that side is: the
    DataLoader over the prepared tensors, or the course's torchvision pipeline) and of
    divekit's Trainer, on the benchmark's data, after one warm-up step of each."""
    from divekit.models import create_model

    size, batch, lr, n_train, n_val = cases[name]
    n_train, n_val = int(n_train * args.scale), int(n_val * args.scale)
    _, xtr, ytr, xva, yva = load_mnist(n_train, n_val)
    tmp = Path(tempfile.mkdtemp(prefix="dk-prof-"))
    try:
        if peer == "d2l pipeline":
            write_torchvision_layout(tmp, xtr, ytr, xva, yva)
            loader = d2l_pipeline_loaders(tmp, size, batch, n_train, n_val)[0]
        else:
            tx, ty, _, _ = prepared_tensors(xtr, ytr, xva, yva, size)
            loader = DataLoader(TensorDataset(tx, ty), batch, shuffle=True)
        torch.manual_seed(0)
        course = course_steps(create_model(name, num_classes=10, in_channels=1), loader, lr)
        ours = divekit_steps(divekit_trainer(name, size, batch, lr, args.epochs,
                                             xtr, ytr, xva, yva))
        runs = {peer: course, "divekit": ours}
        for run in runs.values():
            run(1)  # warm-up: first-touch allocations and lazy set-up stay out of the profile
        return profile_table({side: partial(run, steps) for side, run in runs.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile_goals(rows: list, cases: dict, args: argparse.Namespace,
                  report: Report) -> None:
    """For every goal row not met (or not settled): print and add to ``report`` the top
    operators of both sides over a few training steps (``--smoke``: the first such row, one
    step, to check the path)."""
    missed = [(n, k, r, g) for n, o, k, r, g in rows if g is not None and verdict(r, g) != "met"]
    steps = 1 if args.smoke else PROFILE_STEPS
    for name, peer, ratio, goal in missed[:1] if args.smoke else missed:
        headers, table = step_profile(name, peer, cases, args, steps)
        caption = (f"{verdict(ratio, goal).capitalize()}: {name} end to end, divekit / {peer} "
                   f"{goal_cell(goal)}, the top operators by self CPU time over {steps} "
                   f"training step{'s' * (steps != 1)} of each side (torch.profiler). The goal's "
                   "ratio is end to end (data preparation and validation included); the table "
                   f"shows where a step's time goes: {peer}'s step as `train_ch6` runs it, "
                   "divekit's as its Trainer runs it (`Trainer._step`), after one warm-up step "
                   f"of each. {SUMMARY_NOTE}")
        print(f"\n{caption}")
        for row in table:
            print("  " + " | ".join(row))
        report.table(headers, table, align="l" * len(headers), caption=caption)


if __name__ == "__main__":
    sys.exit(main())
