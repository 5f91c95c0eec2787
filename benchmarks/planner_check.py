"""Does ``divekit dist plan`` predict real runs? The planner against 2-process training here.

Four measurements on this machine, then the planner's prediction beside the measured step:

1. the device rate: a float32 matrix product (:func:`divekit.engine.planner.measure_flops_per_s`)
   with the same threads per process as the training runs;
2. the network: all-reduces of several sizes between 2 local processes (gloo's own, and
   divekit's ring of gloo send/recv, which the strategies use), timed and each fitted to
   ``t = 2(W-1) alpha + 2(W-1)/W bytes / B`` (:func:`fit_alpha_beta`); the predictions use
   the divekit ring's fit;
3. the model's own rate: one process trains with the global batch G; its step time gives the
   FLOP/s the model actually reaches (small convolutions run far below a large GEMM's rate);
4. 2 processes train with G/2 each under ``allreduce`` and ``ps`` (divekit's Trainer, gloo).

The planner then predicts the 2-process steps twice: with the GEMM rate (the planner's inputs
as a user would give them) and with the model's measured one-process rate (which isolates the
communication model and the split of the work). Each row says how far the prediction is from
the measurement; the goal is within 30%.

    python benchmarks/planner_check.py                      # lenet 28x28, G = 128
    python benchmarks/planner_check.py --global-batch 32    # communication matters more
    python benchmarks/planner_check.py --smoke              # tiny sizes: checks that it runs
    python benchmarks/planner_check.py --markdown check.md  # the section for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed import SyntheticTask  # the random-image task benchmarks/distributed.py times

from divekit.engine import TrainConfig, Trainer, planner
from divekit.engine.launch import free_port


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _train(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str,
           out: str) -> None:
    """One training run; ``strategy`` "alone" runs ``world`` independent 1-process trainings
    side by side, each on its share of the data and the batch (the devices busy at once, with
    no exchange: the compute rate a device has while the others compute too)."""
    torch.set_num_threads(args.threads)
    alone = strategy == "alone"
    if world > 1 and not alone:
        _env(rank, world, port)
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, quiet=True,
                      strategy="allreduce" if alone else strategy)
    samples = args.samples // world if alone else args.samples
    task = SyntheticTask(cfg, args.model, samples, args.size, args.global_batch // world)
    history = Trainer(task, cfg).fit()
    steps = -(-args.samples // args.global_batch)
    row = history[-1]  # the last epoch: start-up excluded
    if rank == 0 or alone:
        Path(f"{out}.{rank}").write_text(
            json.dumps({"step_s": samples / row["samples_per_s"] / steps}))


def _allreduce_times(rank: int, world: int, port: int, args: argparse.Namespace,
                     out: str) -> None:
    torch.set_num_threads(args.threads)
    _env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from divekit.engine.distributed import ring_allreduce

        found = {}
        for name, reduce in (("gloo", dist.all_reduce), ("divekit ring", ring_allreduce)):
            times = []
            for nbytes in args.sizes:
                t = torch.ones(nbytes // 4)
                for _ in range(3):
                    reduce(t)
                samples = []
                for _ in range(args.reps):
                    dist.barrier()
                    start = time.perf_counter()
                    reduce(t)
                    samples.append(time.perf_counter() - start)
                times.append(min(samples))  # the least disturbed: others share the cores
            found[name] = times
        if rank == 0:
            Path(f"{out}.0").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args, fork: bool = False) -> list:
    """Run ``fn(rank, world, port, *args, out)`` on ``world`` processes; what each rank wrote to
    ``out.RANK`` (rank 0 at least), in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(fn, args=(world, free_port(), *args, out), nprocs=world, join=True,
                           start_method="fork" if fork else "spawn")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)
                if Path(f"{out}.{r}").exists()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--size", type=int, default=28, help="image side (default: 28)")
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the three runs; the fastest of each is kept (default: 3)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch (seconds)")
    p.add_argument("--markdown", metavar="PATH", help="write the section for BENCHMARKS.md")
    args = p.parse_args(argv)
    command = "python benchmarks/planner_check.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    args.sizes, args.reps = [4 << 10, 256 << 10, 1 << 20, 4 << 20], 15
    if args.smoke:
        args.samples, args.global_batch, args.epochs, args.repeats = 256, 64, 1, 1
        args.sizes, args.reps = [4 << 10, 2 << 20], 5
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    cost = planner.profile_model(args.model, (1, args.size, args.size), num_classes=10)
    gemm = planner.measure_flops_per_s(256 if args.smoke else 1024,
                                       0.1 if args.smoke else 1.0)
    timed = _spawn(_allreduce_times, 2, args, fork=args.smoke)[0]
    fits = {name: planner.fit_alpha_beta(2, args.sizes, t) for name, t in timed.items()}
    # divekit's allreduce and ps strategies move their bytes with gloo's send/recv, as
    # divekit's own ring does: its fit is the network the predictions use
    alpha, bandwidth = fits["divekit ring"]
    # Rounds of (1 process, 2 x allreduce, 2 x ps), interleaved so that a change in what else
    # runs on the machine touches every configuration alike; the fastest of each is kept (the
    # run least disturbed by other processes).
    runs: dict[str, list[float]] = {"one": [], "alone": [], "allreduce": [], "ps": []}
    for _ in range(args.repeats):
        runs["one"].append(_spawn(_train, 1, args, "allreduce", fork=args.smoke)[0]["step_s"])
        # the slower of two side-by-side processes: a synchronous step waits for it
        runs["alone"].append(max(r["step_s"] for r in _spawn(_train, 2, args, "alone",
                                                              fork=args.smoke)))
        for s in ("allreduce", "ps"):
            runs[s].append(_spawn(_train, 2, args, s, fork=args.smoke)[0]["step_s"])
    one = min(runs["one"])
    model_rate = args.global_batch * cost.train_flops / one
    busy_rate = args.global_batch // 2 * cost.train_flops / min(runs["alone"])
    measured = {s: min(runs[s]) for s in ("allreduce", "ps")}

    load = os.getloadavg()[0]
    lines = [
        f"load average {load0:.1f} at the start, {load:.1f} at the end ({os.cpu_count()} cores"
        "; other processes share them)",
        f"{args.model} {args.size}x{args.size}: {cost.params:,} parameters, "
        f"{cost.train_flops / 1e6:.2f} MFLOP per sample (fwd+bwd); global batch "
        f"{args.global_batch}, {args.samples} samples, {args.epochs} epoch(s) (the last "
        f"timed), fastest of {args.repeats} round(s), {args.threads} thread(s)/process, "
        f"torch {torch.__version__}",
        f"GEMM rate {gemm / 1e9:.2f} GFLOP/s; {args.model}'s own rate in 1 process "
        f"{model_rate / 1e9:.3f} GFLOP/s (step {one * 1e3:.1f} ms), in each of 2 processes "
        f"busy side by side {busy_rate / 1e9:.3f} GFLOP/s",
        *(f"{name} all-reduce, 2 processes: " + ", ".join(
            f"{b >> 10} KiB {t * 1e6:.0f} us" for b, t in zip(args.sizes, timed[name]))
          + f" -> alpha {fits[name][0] * 1e6:.1f} us, B {fits[name][1] / 1e9:.3f} GB/s"
          for name in timed),
        "the predictions use the divekit ring's alpha and B (the strategies' own transport)",
        "",
        "planner ms: the prediction with R = the GEMM rate, the model's 1-process rate, and "
        "the rate of 2 busy processes",
        f"{'run':<14} {'measured ms':>12} {'GEMM R':>9} {'error':>6} {'model R':>9} "
        f"{'error':>6} {'busy R':>9} {'error':>6}",
    ]
    worst = {"model": 0.0, "busy": 0.0}
    rows = [("1 process", 1, "allreduce", one), *(
        (f"2 x {s}", 2, s, t) for s, t in measured.items())]
    for name, n, strategy, real in rows:
        cells = []
        for key, rate in (("gemm", gemm), ("model", model_rate), ("busy", busy_rate)):
            net = planner.Network(rate, bandwidth, alpha)
            step = planner.step_time(strategy, cost, n, args.global_batch, net)
            assert step is not None
            err = step.total / real - 1
            cells.append(f"{step.total * 1e3:>9.2f} {err:>+6.0%}")
            if n > 1 and key in worst:
                worst[key] = max(worst[key], abs(err))
        lines.append(f"{name:<14} {real * 1e3:>12.2f} " + " ".join(cells))
    for key, label in (("model", "the model's 1-process rate"),
                       ("busy", "the rate of 2 busy processes")):
        verdict = "within" if worst[key] <= 0.3 else "NOT within"
        lines.append(f"largest 2-process error with {label}: {worst[key]:.0%} ({verdict} the "
                     "30% goal)")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(
            "## The planner against 2-process training (`divekit dist plan`)\n\n"
            f"```\n{command}\n```\n\n```\n{text}\n```\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
