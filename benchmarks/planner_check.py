"""Does ``divekit dist plan`` predict real runs? The planner against 2-process training here.

Each round measures the planner's five inputs on this machine and, in the same minute, the
runs they should predict; the rounds are interleaved so that whatever else runs on the machine
weighs on the inputs and on the runs alike:

1. the network: all-reduces of several sizes between 2 local processes (divekit's ring of gloo
   send/recv, the strategies' own transport; gloo's own all-reduce beside it), fitted to
   ``t = 2(W-1) alpha + 2(W-1)/W bytes / B`` (:func:`~divekit.engine.planner.fit_alpha_beta`).
   The *median* of each size's repeats is fitted: a training step meets the typical message,
   not the luckiest one, and on a loaded machine the two differ by 10x (a message waits until
   the process that receives it gets a core again);
2. one process trains with the global batch G and with G/2: the line through the two step
   times gives the fixed cost of a step ``t0`` (its intercept: optimizer step, batch fetch,
   Python) and the model's own rate (its slope: small convolutions run far below a GEMM);
3. 2 independent processes train side by side with G/2 each, with no exchange: their step gives
   the rate of a device while the other computes too, and the spread of their per-step times
   gives ``sigma`` (Gini's mean difference of the step times, times sqrt(pi)/2: the standard
   deviation of a normal with the same mean difference), which prices the wait for the slower
   process in a synchronous step;
4. 2 processes train with G/2 each under ``allreduce`` and ``ps`` (divekit's Trainer, gloo).

The planner then predicts each run from the medians of the rounds' inputs, with three device
rates: a float32 GEMM's (what a user would give), the model's 1-process rate and the rate of 2
busy processes; the check's goal is within 30% of the measured median, per strategy.

    python benchmarks/planner_check.py                      # lenet 28x28, G = 128
    python benchmarks/planner_check.py --global-batch 32    # communication matters more
    python benchmarks/planner_check.py --smoke              # tiny sizes: checks that it runs
    python benchmarks/planner_check.py --markdown check.md  # the section for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed import SyntheticTask  # the random-image task benchmarks/distributed.py times

from divekit.engine import TrainConfig, Trainer, planner
from divekit.engine.callbacks import Callback
from divekit.engine.launch import free_port
from divekit.errors import DivekitError

GOAL = 0.3


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class _StepClock(Callback):
    """The wall-clock time at the end of every training step of the last epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.ends: list[float] = []

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch == self.epochs:
            self.ends = [time.perf_counter()]

    def on_train_batch_end(self, trainer, index: int, logs) -> None:
        if trainer.epoch == self.epochs:
            self.ends.append(time.perf_counter())


def _train(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str,
           batch: int, out: str) -> None:
    """One training run with global batch ``batch``; ``strategy`` "alone" runs ``world``
    independent 1-process trainings side by side, each on its share of the data and the batch
    (the devices busy at once, with no exchange)."""
    torch.set_num_threads(args.threads)
    # DDP on channels_last BatchNorm weights of shape (1, C, 1, 1): harmless, once per rank
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    alone = strategy == "alone"
    if world > 1 and not alone:
        _env(rank, world, port)
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, quiet=True,
                      strategy="allreduce" if alone else strategy)
    samples = args.samples // world if alone else args.samples
    task = SyntheticTask(cfg, args.model, samples, args.size, batch // world)
    clock = _StepClock(args.epochs)
    history = Trainer(task, cfg, callbacks=[clock]).fit()
    steps = -(-args.samples // batch)
    row = history[-1]  # the last epoch: start-up excluded
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    Path(f"{out}.{rank}").write_text(json.dumps(
        {"step_s": samples / row["samples_per_s"] / steps, "durations": durations}))


def _allreduce_times(rank: int, world: int, port: int, args: argparse.Namespace,
                     out: str) -> None:
    torch.set_num_threads(args.threads)
    _env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from divekit.engine.distributed import ring_allreduce

        found = {}
        for name, reduce in (("divekit ring", ring_allreduce), ("gloo", dist.all_reduce)):
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
                times.append(samples)
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


def normal_sigma(values: list[float]) -> float:
    """The standard deviation of a normal distribution with the same mean absolute difference
    between two draws as ``values`` (Gini's mean difference ``g``: ``sigma = g sqrt(pi) / 2``).
    Less swayed than the sample standard deviation by the few steps a loaded machine stalls."""
    if len(values) < 2:
        return 0.0
    pairs = list(itertools.combinations(values, 2))
    return statistics.fmean(abs(a - b) for a, b in pairs) * math.sqrt(math.pi) / 2


def median(values: list[float]) -> float:
    return statistics.median(values)


def _measure_round(args: argparse.Namespace, models: list[str],
                   nets: list[dict[str, list[list[float]]]],
                   runs: dict[str, dict[str, list]]) -> None:
    """One round: the network, then every model's runs; appended to ``nets`` and ``runs``."""
    g, half = args.global_batch, args.global_batch // 2
    nets.append(_spawn(_allreduce_times, 2, args, fork=args.smoke)[0])
    for model in models:
        args.model = model
        r = runs.setdefault(model, {})
        for key, world, strategy, batch in (("one", 1, "allreduce", g),
                                            ("one half", 1, "allreduce", half),
                                            ("alone", 2, "alone", g),
                                            *((s, 2, s, g) for s in CHECKED)):
            result = _spawn(_train, world, args, strategy, batch, fork=args.smoke)
            # the slower of two side-by-side processes: a synchronous step waits for it
            r.setdefault(key, []).append(max(x["step_s"] for x in result))
            r.setdefault(key + " steps", []).append([d for x in result for d in x["durations"]])


CHECKED = ("allreduce", "ps", "ddp")  # the 2-process runs; ddp is the planner's allreduce on
# gloo's own all-reduce


def _fit(nets: list[dict[str, list[list[float]]]], sizes: list[int], smoke: bool = False
         ) -> dict[str, tuple[float, float]]:
    """``{transport: (alpha, B)}`` fitted to the median time of each size over ``nets``'s
    rounds (every repeat of every round pooled). A smoke's two sizes and five repeats can come
    out flat on a loaded machine; it then takes the larger size's time as all bandwidth (alpha
    0) and says so, since it only checks that the script runs. A full run refuses a flat fit."""
    fitted = {}
    for name in nets[0]:
        times = [median([t for r in nets for t in r[name][i]]) for i in range(len(sizes))]
        try:
            fitted[name] = planner.fit_alpha_beta(2, sizes, times)
        except DivekitError:
            if not smoke:
                raise
            print(f"smoke: {name}'s timed all-reduces did not grow with their size; "
                  "alpha 0 and B from the largest size")
            fitted[name] = (0.0, sizes[-1] / max(times[-1], 1e-9))
    return fitted


def _inputs(cost: planner.ModelCost, g: int, runs: dict[str, list]
            ) -> tuple[dict[str, float], float, float, float, float]:
    """``(median steps, t0, model rate, busy rate, sigma)`` from ``runs``'s rounds.

    t0 and the model's rate come from the typical (median) 1-process step at G and G/2: the
    line through them, robust to the few steps a loaded machine stalls."""
    half = g // 2
    step = {k: median(v) for k, v in runs.items() if not k.endswith(" steps")}
    typical = {k: median([median(d) for d in runs[k + " steps"]]) for k in ("one", "one half")}
    per_sample = max(typical["one"] - typical["one half"], 1e-12) / (g - half)
    overhead = max(typical["one"] - g * per_sample, 0.0)
    model_rate = cost.train_flops / per_sample
    busy_rate = half * cost.train_flops / max(step["alone"] - overhead, 1e-12)
    sigma = median([normal_sigma(d) for d in runs["alone steps"]])
    return step, overhead, model_rate, busy_rate, sigma


def _by_round(cost: planner.ModelCost, args: argparse.Namespace, runs: dict[str, list],
              nets: list[dict[str, list[list[float]]]]) -> dict[str, list[float]]:
    """Each round's inputs predict that round's runs (the rate of 2 busy processes): the error
    of every 2-process strategy, round by round. A round whose all-reduces do not grow with
    their size (noise) takes the pooled fit."""
    pooled = _fit(nets, args.sizes, args.smoke)
    errors: dict[str, list[float]] = {s: [] for s in CHECKED}
    for r in range(len(nets)):
        try:
            fits = _fit(nets[r:r + 1], args.sizes)
        except DivekitError:
            fits = pooled
        one = {k: v[r:r + 1] for k, v in runs.items()}
        step, overhead, _, busy_rate, sigma = _inputs(cost, args.global_batch, one)
        for s in CHECKED:
            alpha, bandwidth = fits["gloo" if s == "ddp" else "divekit ring"]
            net = planner.Network(busy_rate, bandwidth, alpha, overhead, sigma)
            predicted = planner.step_time("allreduce" if s == "ddp" else s, cost, 2,
                                          args.global_batch, net)
            assert predicted is not None
            errors[s].append(predicted.total / step[s] - 1)
    return errors


def _settled(errors: list[float]) -> str:
    """met: every round within the goal; not met: none; not settled: the rounds disagree."""
    inside = [abs(e) <= GOAL for e in errors]
    return "met" if all(inside) else "not met" if not any(inside) else "not settled"


def _check_model(model: str, args: argparse.Namespace, runs: dict[str, list],
                 nets: list[dict[str, list[list[float]]]]
                 ) -> tuple[list[str], dict[str, float], list[str]]:
    """The planner's inputs for ``model`` from the rounds' medians, its predictions beside the
    measured steps: the lines of the report, the largest 2-process error per rate, and the
    verdict of each strategy by round."""
    g, half = args.global_batch, args.global_batch // 2
    cost = planner.profile_model(model, (1, args.size, args.size), num_classes=10)
    fits = _fit(nets, args.sizes, args.smoke)
    step, overhead, model_rate, busy_rate, sigma = _inputs(cost, g, runs)
    typical = {k: median([median(d) for d in runs[k + " steps"]]) for k in ("one", "one half")}
    buffers = f", {cost.buffers} buffer values (BatchNorm)" if cost.buffers else ""
    lines = [
        "",
        f"{model} {args.size}x{args.size}: {cost.params:,} parameters{buffers}, "
        f"{cost.train_flops / 1e6:.2f} MFLOP per sample (fwd+bwd)",
        f"  1 process: typical step {typical['one'] * 1e3:.2f} ms at G = {g}, "
        f"{typical['one half'] * 1e3:.2f} ms at G = {half} -> t0 {overhead * 1e3:.2f} ms a "
        f"step, model rate {model_rate / 1e9:.3f} GFLOP/s",
        f"  2 processes side by side, no exchange: step {step['alone'] * 1e3:.2f} ms at G/2 -> "
        f"busy rate {busy_rate / 1e9:.3f} GFLOP/s; step-time spread sigma "
        f"{sigma * 1e3:.2f} ms (wait for the slower of 2: "
        f"{sigma * planner.expected_max_normal(2) * 1e3:.2f} ms)",
        f"{'run':<14} {'measured ms':>12} {'GEMM R':>9} {'error':>6} {'model R':>9} "
        f"{'error':>6} {'busy R':>9} {'error':>6}",
    ]
    worst = {"model": 0.0, "busy": 0.0}
    rows = [("1 process", 1, "allreduce", step["one"]),
            *((f"2 x {s}", 2, s, step[s]) for s in CHECKED)]
    for name, n, strategy, real in rows:
        alpha, bandwidth = fits["gloo" if strategy == "ddp" else "divekit ring"]
        cells = []
        for key, rate in (("gemm", args.gemm), ("model", model_rate), ("busy", busy_rate)):
            net = planner.Network(rate, bandwidth, alpha, overhead, sigma)
            predicted = planner.step_time("allreduce" if strategy == "ddp" else strategy, cost,
                                          n, g, net)
            assert predicted is not None
            err = predicted.total / real - 1
            cells.append(f"{predicted.total * 1e3:>9.2f} {err:>+6.0%}")
            if n > 1 and key in worst:
                worst[key] = max(worst[key], abs(err))
        lines.append(f"{name:<14} {real * 1e3:>12.2f} " + " ".join(cells))
    verdicts = []
    if len(nets) > 1:
        cells = []
        for s, errs in _by_round(cost, args, runs, nets).items():
            verdicts.append(_settled(errs))
            cells.append(f"{s} {median(errs):+.0%} ({min(errs):+.0%} to {max(errs):+.0%}, "
                         f"{verdicts[-1]})")
        lines.append("each round's inputs against that round's runs (busy R): "
                     + "; ".join(cells))
    return lines, worst, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet,lenet_bn",
                   help="models to check, comma-separated (default: lenet,lenet_bn; --smoke: "
                   "lenet)")
    p.add_argument("--size", type=int, default=28, help="image side (default: 28)")
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the measurements; medians are kept (default: 3)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch (seconds)")
    p.add_argument("--markdown", metavar="PATH", help="write the section for BENCHMARKS.md")
    args = p.parse_args(argv)
    command = "python benchmarks/planner_check.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    args.sizes, args.reps = [4 << 10, 256 << 10, 1 << 20, 4 << 20], 15
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if args.smoke:
        args.samples, args.global_batch, args.epochs, args.repeats = 256, 64, 1, 1
        args.sizes, args.reps = [4 << 10, 8 << 20], 5
        models = ["lenet"] if args.model == p.get_default("model") else models
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    args.gemm = planner.measure_flops_per_s(256 if args.smoke else 1024,
                                            0.1 if args.smoke else 1.0)
    # Rounds of every measurement, interleaved: a change in what else runs on the machine
    # touches the inputs and the runs they predict alike.
    nets: list[dict[str, list[list[float]]]] = []
    runs: dict[str, dict[str, list]] = {}
    for _ in range(args.repeats):
        _measure_round(args, models, nets, runs)
    typical = {name: [median([t for r in nets for t in r[name][i]])
                      for i in range(len(args.sizes))] for name in nets[0]}
    fits = _fit(nets, args.sizes, args.smoke)

    load = os.getloadavg()[0]
    lines = [
        f"load average {load0:.1f} at the start, {load:.1f} at the end ({os.cpu_count()} cores"
        "; other processes share them)",
        f"global batch {args.global_batch}, {args.samples} samples, {args.epochs} epoch(s) (the "
        f"last timed), medians of {args.repeats} round(s), {args.threads} thread(s)/process, "
        f"torch {torch.__version__}; GEMM {args.gemm / 1e9:.2f} GFLOP/s",
        *(f"{name} all-reduce, 2 processes, median: " + ", ".join(
            f"{b >> 10} KiB {t * 1e6:.0f} us" for b, t in zip(args.sizes, typical[name]))
          + f" -> alpha {fits[name][0] * 1e6:.1f} us, B {fits[name][1] / 1e9:.3f} GB/s"
          for name in typical),
        "allreduce and ps are predicted with the divekit ring's alpha and B (their transport), "
        "ddp with gloo's",
        "planner ms: the prediction with R = the GEMM rate, the model's 1-process rate, and "
        "the rate of 2 busy processes (t0, sigma, alpha, B as measured)",
    ]
    worst = {"model": 0.0, "busy": 0.0}
    verdicts: list[str] = []
    for model in models:
        found, errors, settled = _check_model(model, args, runs[model], nets)
        lines.extend(found)
        verdicts.extend(settled)
        worst = {k: max(v, errors[k]) for k, v in worst.items()}
    for key, label in (("busy", "the rate of 2 busy processes"),
                       ("model", "the model's 1-process rate")):
        verdict = "within" if worst[key] <= GOAL else "NOT within"
        lines.append(f"largest 2-process error with {label}: {worst[key]:.0%} ({verdict} the "
                     f"{GOAL:.0%} goal)")
    if verdicts:
        lines.append("round by round, of the {} checks (model x strategy): {}".format(
            len(verdicts), ", ".join(f"{verdicts.count(v)} {v}"
                                     for v in ("met", "not settled", "not met"))))
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
