"""Data-parallel throughput: 1 process against 2, for each strategy (ddp, allreduce, ps).

Every run trains the same model on the same in-memory data with the same *global* batch
(per-worker batch × processes) and one thread per process, through divekit's Trainer (gloo on
the CPU, nccl on GPUs when --device cuda). It prints training samples per second (the last
epoch, so start-up is excluded), the bytes each worker sent per step (``--profile-comm``), and
the scaling efficiency ``throughput(W) / (W × throughput(1))`` against the 1-process run
measured in the same invocation.

    python benchmarks/distributed.py                       # lenet, 2 processes, 3 epochs
    python benchmarks/distributed.py --model resnet18 --size 32 --samples 512
    python benchmarks/distributed.py --smoke               # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import Report, add_markdown_arg, own_peak_rss_mb

from divekit.data.loader import TensorBatchLoader
from divekit.engine import TrainConfig, Trainer
from divekit.engine.launch import free_port
from divekit.engine.task import Task
from divekit.models import create_model


class SyntheticTask(Task):
    """Random 1-channel images and labels held in memory: the loop, not the data, is timed."""

    Config = TrainConfig

    def __init__(self, config: TrainConfig, model: str, samples: int, size: int, per_worker: int):
        super().__init__(config)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(samples, 1, size, size, generator=g)
        self.y = torch.randint(0, 10, (samples,), generator=g)
        self.model_name, self.per_worker = model, per_worker

    def build_model(self):
        return create_model(self.model_name, num_classes=10, in_channels=1)

    def train_data(self):
        return TensorBatchLoader(self.x, self.y, batch_size=self.per_worker, shuffle=True)

    def val_data(self):
        return None

    def training_step(self, model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {"loss": loss.detach()}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str,
            out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, strategy=strategy, quiet=True,
                      device=args.device, profile_comm=True)
    task = SyntheticTask(cfg, args.model, args.samples, args.size, args.global_batch // world)
    trainer = Trainer(task, cfg)
    t0 = time.perf_counter()
    history = trainer.fit()
    # every worker's own peak RSS (VmHWM: its address space's high-water mark)
    Path(f"{out}.rss{rank}").write_text(f"{own_peak_rss_mb():.1f}")
    if rank == 0:
        row = history[-1]
        Path(out).write_text(json.dumps({
            "samples_per_s": row["samples_per_s"],
            "MB_per_step": row.get("comm_MB_per_step", 0.0),
            "MB_per_step_max": row.get("comm_MB_per_step_max", 0.0),
            "seconds": time.perf_counter() - t0,
        }))


def run(world: int, strategy: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        # --smoke forks (no re-import per worker); the measured runs spawn fresh interpreters
        mp.start_processes(_worker, args=(world, free_port(), args, strategy, out), nprocs=world,
                           join=True, start_method="fork" if args.smoke else "spawn")
        result = json.loads(Path(out).read_text())
        rss = [float(Path(f"{out}.rss{r}").read_text()) for r in range(world)]
        result.update(rss_max=max(rss), rss_sum=sum(rss))
        return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--size", type=int, default=28, help="image side (default: 28)")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, 1 epoch: checks that every strategy runs (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:  # workers are forked: what is imported here, they need not import again
        args.samples, args.global_batch, args.epochs = 256, 64, 1
        importlib.import_module("torch._dynamo")  # torch.optim imports it on the first optimizer
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"{args.model} at {args.size}x{args.size}, {args.samples} samples, global batch "
          f"{args.global_batch}, {args.threads} thread(s)/process, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {args.device}", flush=True)
    base = run(1, "ddp", args)
    rows = [("1 process", base, 1.0)]
    for strategy in ("ddp", "allreduce", "ps"):
        result = run(args.nproc, strategy, args)
        rows.append((f"{args.nproc} x {strategy}", result,
                     result["samples_per_s"] / (args.nproc * base["samples_per_s"])))
    print(f"{'run':<16} {'samples/s':>10} {'MB sent/step':>13} {'max MB/step':>12} "
          f"{'efficiency':>11} {'peak RSS/worker':>16} {'all workers':>12}")
    for name, r, eff in rows:
        print(f"{name:<16} {r['samples_per_s']:>10.0f} {r['MB_per_step']:>13.3f} "
              f"{r['MB_per_step_max']:>12.3f} {eff:>10.0%} {r['rss_max']:>13,.0f} MB "
              f"{r['rss_sum']:>9,.0f} MB")
    report = Report("Data-parallel training on one machine", threads=args.threads)
    report.table(["run", "samples/s", "MB sent per worker per step", "max MB per step",
                  "scaling efficiency", "peak RSS per worker, MB", "all workers, MB"],
                 [[name, f"{r['samples_per_s']:.0f}", f"{r['MB_per_step']:.3f}",
                   f"{r['MB_per_step_max']:.3f}", f"{eff:.0%}", f"{r['rss_max']:,.0f}",
                   f"{r['rss_sum']:,.0f}"] for name, r, eff in rows],
                 caption=f"{args.model} at {args.size}×{args.size}, {args.samples:,} samples, "
                         f"global batch {args.global_batch}, {args.epochs} epoch(s) (samples/s "
                         f"of the last), {args.threads} thread(s) per process, device "
                         f"{args.device}; one run of each (no peer: the efficiency is against "
                         "the 1-process run of this invocation). Peak RSS: each worker's own "
                         "(`VmHWM`), the largest and the sum over the workers"
                         + (" (--smoke forks the workers: their peaks count the pages they "
                            "share with the parent)" if args.smoke else "") + ".")
    report.write(args.markdown)
    return 0


if __name__ == "__main__":
    assert dist.is_available()
    sys.exit(main())
