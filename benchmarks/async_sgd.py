"""Asynchronous SGD against stragglers: throughput and accuracy for ``--staleness K``.

Two processes (gloo, one thread each) train LeNet on digits with ``--strategy async`` for a
fixed number of epochs, for K in {0, 1, 4, ∞} (K = 0 is the synchronous parameter server),
once on a quiet machine and once with a *straggler*: at every step one of the two workers,
drawn at random (the same draw on both), sleeps ``--delay`` seconds after its step, as a
worker hit by a page fault, a busy core or a slow read would. Synchronous training pays
every delay, since each step waits for the slowest worker; with K ≥ 1 the worker that did not
sleep runs ahead and the delays of the two workers overlap, at the price of gradients computed
on weights up to K updates old. The table gives training samples per second (over the whole
run's wall time, each epoch's validation included: an epoch ends only when its slowest worker
is done), the validation accuracy at the end, and how far ahead of the slowest worker rank 0
ran at most and on average (the server's record of its pulls).

Plain SGD (momentum 0) by default: staleness itself acts as momentum (Mitliagkas et al.,
"Asynchrony begets momentum", 2016), and on top of divekit's default momentum of 0.9 it made
LeNet diverge here already at K = 1 (lr 0.1: chance accuracy after 4 epochs, against 0.93 at
K = 0); ``--momentum 0.9`` shows it.

    python benchmarks/async_sgd.py                      # 6 epochs of digits, delay 50 ms
    python benchmarks/async_sgd.py --smoke              # tiny sizes: checks that it runs
    python benchmarks/async_sgd.py --markdown async.md  # also writes the BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from divekit.engine.callbacks import Callback
from divekit.engine.launch import spawn_local
from divekit.engine.trainer import Trainer
from divekit.tasks.classify import ClassificationTask, ClassifyConfig

STALENESS: tuple[int | None, ...] = (0, 1, 4, None)


class RandomStraggler(Callback):
    """After each step one worker, drawn from ``(seed, global step)`` (so every rank draws the
    same one), sleeps ``seconds``: transient slowness that moves from worker to worker."""

    def __init__(self, seconds: float, seed: int = 0):
        self.seconds, self.seed = seconds, seed

    def on_train_batch_end(self, trainer, index, logs) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        if int(torch.randint(trainer.env.world_size, (1,), generator=g)) == trainer.env.rank:
            time.sleep(self.seconds)


def _label(k: int | None) -> str:
    return "∞" if k is None else str(k)


def _config(args: argparse.Namespace, k: int | None, epochs: int) -> ClassifyConfig:
    return ClassifyConfig(model="lenet", data="digits", epochs=epochs,
                          batch_size=args.batch_size, lr=args.lr, limit=args.limit,
                          momentum=args.momentum, strategy="async", staleness=k, quiet=True,
                          device="cpu", seed=0, threads=1)


def _worker(rank: int, args: argparse.Namespace, out: str) -> None:
    # warm-up (untimed): the first run in a process pays for lazy imports and the data's load
    Trainer(ClassificationTask(_config(args, 0, 1)), _config(args, 0, 1)).fit()
    results = []
    for repeat in range(args.repeats):  # interleaved: a busy minute hits every setting alike
        for delay in (0.0, args.delay):
            for k in STALENESS:
                cfg = _config(args, k, args.epochs)
                callbacks = [RandomStraggler(delay, seed=repeat)] if delay else []
                trainer = Trainer(ClassificationTask(cfg), cfg, callbacks=callbacks)
                t0 = time.perf_counter()
                history = trainer.fit()
                wall = time.perf_counter() - t0
                if rank != 0:
                    continue
                leads = {lead: n for (r, lead), n in trainer.strategy.leads.items() if r == 0}
                pulls = max(sum(leads.values()), 1)
                # the whole fit's wall time: an epoch ends when the slowest worker is done (the
                # sync before validation), which the Trainer's own per-rank timing does not see
                samples = trainer.train_loader.num_samples * args.epochs
                results.append({
                    "delay": delay, "k": k, "samples_per_s": samples / wall,
                    "val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"],
                    "max_lead": max(leads, default=0),
                    "mean_lead": sum(lead * n for lead, n in leads.items()) / pulls,
                })
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def medians(results: list[dict]) -> list[dict]:
    """One row per (delay, K): the median of each measure over the repeats (max lead: the
    largest)."""
    rows = []
    for delay in dict.fromkeys(r["delay"] for r in results):
        for k in STALENESS:
            runs = [r for r in results if r["delay"] == delay and r["k"] == k]
            row = {key: statistics.median(r[key] for r in runs)
                   for key in ("samples_per_s", "val_acc", "val_loss", "mean_lead")}
            rows.append({**row, "delay": delay, "k": k,
                         "max_lead": max(r["max_lead"] for r in runs)})
    return rows


def table(results: list[dict], base: dict[float, float]) -> list[list[str]]:
    rows = []
    for r in results:
        speed = r["samples_per_s"] / base[r["delay"]]
        rows.append([f"{r['delay'] * 1000:.0f} ms" if r["delay"] else "none", _label(r["k"]),
                     f"{r['samples_per_s']:.0f}", f"{speed:.2f}x", f"{r['val_acc']:.3f}",
                     f"{r['val_loss']:.3f}", str(r["max_lead"]), f"{r['mean_lead']:.2f}"])
    return rows


HEADERS = ["straggler", "K", "samples/s", "vs K=0", "val acc", "val loss", "max lead",
           "mean lead"]


def markdown(args: argparse.Namespace, rows: list[list[str]]) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = ["## Asynchronous SGD: --staleness K against a straggler", "", "```", command, "```",
             "", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
             f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}: 2 gloo "
             f"processes, 1 thread each, lenet on digits, {args.epochs} epoch(s), batch "
             f"{args.batch_size} per worker, SGD with lr {args.lr} and momentum {args.momentum}. "
             f"Medians of {args.repeats} interleaved run(s). `straggler`: one worker drawn at "
             "random sleeps that long after every step. `vs K=0`: throughput against the "
             "synchronous run with the same straggler setting (samples/s over the whole run's "
             "wall time, validation included). `lead`: how many steps rank 0 was ahead of the "
             "slowest worker when it pulled (max: over all runs).", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="per worker (default: 32)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (default: 0; see the module's docstring)")
    p.add_argument("--delay", type=float, default=0.05,
                   help="seconds the straggler sleeps after a step (default: 0.05)")
    p.add_argument("--limit", type=int, default=None, help="use only N images of digits")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each setting, interleaved; the table shows medians")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--markdown", metavar="PATH", help="also write the BENCHMARKS.md section")
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.limit, args.delay, args.repeats = 1, 256, 0.005, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.json")
        spawn_local(_worker, 2, args, out)
        results = medians(json.loads(Path(out).read_text()))
    base = {r["delay"]: r["samples_per_s"] for r in results if r["k"] == 0}
    rows = table(results, base)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    print("  ".join(h.rjust(w) for h, w in zip(HEADERS, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if args.markdown:
        Path(args.markdown).write_text(markdown(args, rows), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
