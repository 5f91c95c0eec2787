"""The pipeline bubble, measured: how long each stage idles during a step, against (S-1)/(M+S-1).

A pipeline of ``S`` stages working on ``M`` microbatches keeps every stage idle while it fills
and drains. With equal stages, a forward taking ``f`` and a backward ``b`` per microbatch, a
step lasts ``(M + S - 1)(f + b)`` of which each stage works ``M (f + b)``: the idle share, the
*bubble*, is ``(S - 1) / (M + S - 1)``, for GPipe and 1F1B alike.

Here ``divekit``'s ``--strategy pipeline`` (``torch.distributed.pipelining``) trains a chain of
equal fully connected layers cut into ``S = 2`` stages on 2 gloo CPU processes (one thread
each). Each stage's *work* is timed inside the schedule: every call of the stage's
``forward_one_chunk`` and ``backward_one_chunk`` (its microbatches' forward, loss and backward
passes; the waits for the neighbour's activations or gradients are outside them). A step's
time is taken between two barriers, so it is the slowest stage's. Measured bubble of a stage =
1 - work / step; the table gives the mean over the stages and each stage's. It exceeds the
formula by what the formula leaves out: sending activations and gradients, the schedule's
bookkeeping, the per-microbatch overhead that grows with ``M``, and unequal stages (the last
one also computes the loss).

    python benchmarks/pipeline_bubble.py                 # M = 1, 2, 4, 8, 16, both schedules
    python benchmarks/pipeline_bubble.py --smoke         # tiny sizes: checks that it runs
    python benchmarks/pipeline_bubble.py --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from divekit.engine.distributed import DistEnv
from divekit.engine.launch import spawn_local
from divekit.engine.pipeline import PipelineStrategy
from divekit.engine.task import Task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, add_markdown_arg  # noqa: E402

STAGES = 2


class ChainTask(Task):
    """Regression through ``layers`` equal ``width × width`` layers on random data."""

    def __init__(self, layers: int, width: int):
        super().__init__(None)
        self.layers, self.width = layers, width

    def build_model(self) -> nn.Module:
        blocks = [m for _ in range(self.layers) for m in (nn.Linear(self.width, self.width),
                                                           nn.Tanh())]
        return nn.Sequential(*blocks)

    def pipeline_split(self, batch):
        x, y = batch
        return (x,), y

    def pipeline_loss(self, output, y):
        loss = F.mse_loss(output, y)
        return loss, {"loss": loss.detach()}


class _Config:
    def __init__(self, microbatches: int, schedule: str):
        self.stages, self.microbatches, self.pipeline_schedule = STAGES, microbatches, schedule


BUSY = [0.0]


def _time_stage_work() -> None:
    """Wrap the stage's per-microbatch forward and backward to add their time to ``BUSY``."""
    from torch.distributed.pipelining import PipelineStage

    for name in ("forward_one_chunk", "backward_one_chunk"):
        original = getattr(PipelineStage, name)

        def timed(self, *args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                BUSY[0] += time.perf_counter() - t0

        setattr(PipelineStage, name, timed)


def _worker(rank: int, args: argparse.Namespace, out: str) -> None:
    _time_stage_work()
    env = DistEnv(rank=rank, world_size=STAGES, local_rank=rank)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randn(args.batch, args.width, generator=g)
    task = ChainTask(args.layers, args.width)
    results = []
    for schedule in ("gpipe", "1f1b"):
        for m in args.microbatches:
            if schedule == "1f1b" and m < STAGES:
                continue  # 1F1B needs M ≥ S
            torch.manual_seed(0)
            model = task.build_model()
            strategy = PipelineStrategy(model, env, None, _Config(m, schedule))
            steps, busy = [], []
            for step in range(args.warmup + args.steps):
                model.zero_grad(set_to_none=True)
                dist.barrier()
                BUSY[0] = 0.0
                t0 = time.perf_counter()
                strategy.forward_backward(task, (x, y), 1.0, contextlib.nullcontext())
                dist.barrier()
                if step >= args.warmup:
                    steps.append(time.perf_counter() - t0)
                    busy.append(BUSY[0])
            mine = {"step": statistics.median(steps),
                    "idle": statistics.median(1 - b / s for b, s in zip(busy, steps))}
            every = [None] * STAGES
            dist.all_gather_object(every, mine)
            results.append({"schedule": schedule, "M": m,
                            "step_ms": 1e3 * max(r["step"] for r in every),
                            "idle": [r["idle"] for r in every]})
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="fully connected layers (default: 8)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=256, help="samples per step (default: 256)")
    p.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (default: 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.layers, args.width, args.batch = 4, 32, 16
        args.microbatches, args.steps, args.warmup = [1, 4], 2, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{STAGES} stages of {args.layers // STAGES} layers {args.width}x{args.width}, batch "
          f"{args.batch}, gloo on {STAGES} CPU processes (1 thread each), torch "
          f"{torch.__version__}, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "bubble.json")
        spawn_local(_worker, STAGES, args, out)
        results = json.loads(Path(out).read_text())
    headers = ["schedule", "M", "formula", "measured", "stage 0", "stage 1", "step ms"]
    rows = []
    for r in results:
        formula = (STAGES - 1) / (r["M"] + STAGES - 1)
        rows.append([r["schedule"], r["M"], f"{formula:.1%}", f"{statistics.mean(r['idle']):.1%}",
                     *(f"{i:.1%}" for i in r["idle"]), f"{r['step_ms']:.1f}"])
    print(f"{headers[0]:<9} {headers[1]:>3} {headers[2]:>8} {headers[3]:>9} {headers[4]:>8} "
          f"{headers[5]:>8} {headers[6]:>8}")
    for row in rows:
        print(f"{row[0]:<9} {row[1]:>3} {row[2]:>8} {row[3]:>9} {row[4]:>8} {row[5]:>8} "
              f"{row[6]:>8}")
    report = Report("Pipeline bubble: measured idle share against (S-1)/(M+S-1)", threads=1)
    report.text(f"{STAGES} stages of {args.layers // STAGES} fully connected {args.width}x"
                f"{args.width} layers, batch {args.batch}, gloo on {STAGES} CPU processes. "
                "*measured*: 1 - (the stage's forward and backward work inside the schedule) / "
                "(the step), the median over the steps, averaged over the stages.")
    report.table(headers, rows, align="lrrrrrr")
    report.write(args.markdown)
    return 0


if __name__ == "__main__":
    assert dist.is_available()
    sys.exit(main())
