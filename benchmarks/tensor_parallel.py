"""Tensor parallelism's traffic, counted: the bytes each rank sends per training step under
``--strategy tensor``, against the formula.

Splitting a pair of linear maps column-wise then row-wise (Megatron-LM) costs one all-reduce of
the pair's output forward and one of its input's gradient backward. A Transformer block has
two such pairs (attention: Q/K/V by columns, W_o by rows; the FFN: dense1, dense2), so per
block and step a rank takes part in four all-reduces of the ``B·T·d`` activations, each
sending ``2 (N-1)/N`` of its bytes in a ring:

    bytes per rank per step = 4 · L · 2 (N-1)/N · B·T·d · 4 bytes (float32).

The traffic grows with the *activations* (batch × sequence × width), not with the weights:
the opposite of data parallelism, whose all-reduce carries the gradients whatever the batch.
LeNet's split head (400→120 by columns, 120→84 by rows) sends ``2 (N-1)/N · B·(400 + 84)·4``.

Here 2 gloo CPU processes (one thread each) train each model a few steps with divekit's
``TensorParallelStrategy``; every collective issued during a step (DTensor's, in the forward
and the backward pass) is counted by a dispatch mode, with the ring model's bytes for each.
Step times (forward and backward, the split model against the whole one in each process)
are from this shared 2-core machine and only indicative.

    python benchmarks/tensor_parallel.py                 # batches 8 and 32, 3 steps each
    python benchmarks/tensor_parallel.py --smoke         # tiny sizes, 1 step: checks it runs
    python benchmarks/tensor_parallel.py --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from divekit.engine.distributed import CommCounter, DistEnv
from divekit.engine.launch import spawn_local
from divekit.engine.strategies import ring_bytes
from divekit.engine.tensor_parallel import (
    TensorParallelStrategy,
    _CountCollectives,
    activation_bytes_per_step,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, add_markdown_arg  # noqa: E402

WORLD = 2


class _Task:
    """What ``Strategy.forward_backward`` needs of a task: ``training_step(model, batch)``."""

    def __init__(self, loss):
        self.loss = loss

    def training_step(self, model, batch):
        loss = self.loss(model, batch)
        return loss, {"loss": loss.detach()}


def _encoder(width: int, heads: int, blocks: int):
    from divekit.models.transformer import TransformerEncoder

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = TransformerEncoder(100, width, 4 * width, heads, blocks, dropout=0.0)
            self.out = nn.Linear(width, 2)

        def forward(self, tokens):
            return self.out(self.encoder(tokens).mean(1))

    return Classifier()


def _bert(width: int, heads: int, blocks: int):
    from divekit.models.bert import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, num_layers=blocks, num_hiddens=width,
                                num_heads=heads, ffn_num_hiddens=2 * width, max_len=128,
                                dropout=0.0))


def _cases(smoke: bool) -> list[dict]:
    width, steps = (32, 8) if smoke else (128, 32)
    batches = [4] if smoke else [8, 32]
    cases = []
    for b in batches:
        cases.append({"model": "transformer encoder", "width": width, "heads": 4, "blocks": 2,
                      "batch": b, "steps": steps})
        cases.append({"model": "bert", "width": width, "heads": 2, "blocks": 2, "batch": b,
                      "steps": steps})
        cases.append({"model": "lenet", "batch": b})
    return cases


def _build(case: dict) -> tuple[nn.Module, _Task, tuple, float]:
    """The model, its loss, a batch and the formula's bytes per rank per step."""
    g = torch.Generator().manual_seed(0)
    b = case["batch"]
    if case["model"] == "lenet":
        from divekit.models.lenet import lenet

        x, y = torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
        formula = ring_bytes(b * (400 + 84) * 4, WORLD)
        return lenet(), _Task(lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])), (x, y), \
            formula
    t, d = case["steps"], case["width"]
    tokens = torch.randint(0, 100, (b, t), generator=g)
    y = torch.randint(0, 2, (b,), generator=g)
    formula = activation_bytes_per_step(b, t, d, case["blocks"], WORLD)
    if case["model"] == "bert":
        model = _bert(d, case["heads"], case["blocks"])
        task = _Task(lambda m, batch: F.cross_entropy(m(batch[0])[2], batch[1]))
    else:
        model = _encoder(d, case["heads"], case["blocks"])
        task = _Task(lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]))
    return model, task, (tokens, y), formula


def _worker(rank: int, cases: list[dict], repeats: int, out: str) -> None:
    results = []
    for case in cases:
        torch.manual_seed(0)
        model, task, batch, formula = _build(case)
        strategy = TensorParallelStrategy(model, DistEnv(rank, WORLD, rank), None,
                                          SimpleNamespace(tp=WORLD))
        counter = CommCounter()
        amp = torch.autocast("cpu", enabled=False)
        with _CountCollectives(counter, WORLD) as seen:  # also warms DTensor's caches up
            strategy.forward_backward(task, batch, 1.0, amp)
        calls = sum(seen.calls.values())
        torch.manual_seed(0)
        plain = _build(case)[0]
        split_ms, plain_ms = [], []
        for _ in range(repeats):  # timed without the counting mode (it costs per operator)
            for m, times in ((model, split_ms), (plain, plain_ms)):
                m.zero_grad(set_to_none=True)
                start = time.perf_counter()
                task.training_step(m, batch)[0].backward()
                times.append(1e3 * (time.perf_counter() - start))
        sent = torch.tensor([float(counter.sent)])
        torch.distributed.all_reduce(sent, op=torch.distributed.ReduceOp.MAX)
        results.append({**case, "measured": counter.sent, "max_rank": sent.item(),
                        "formula": formula, "calls": calls,
                        "ms": sorted(split_ms)[len(split_ms) // 2],
                        "plain_ms": sorted(plain_ms)[len(plain_ms) // 2]})
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _shape(r: dict) -> str:
    if r["model"] == "lenet":
        return f"B={r['batch']}, head 400-120-84"
    return f"B={r['batch']}, T={r['steps']}, d={r['width']}, L={r['blocks']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case (median)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step: checks that it runs")
    add_markdown_arg(p)
    args = p.parse_args()
    if args.smoke:
        args.repeats = 1
    cases = _cases(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "tp.json")
        spawn_local(_worker, WORLD, cases, args.repeats, out)
        results = json.loads(Path(out).read_text())
    headers = ["model", "shape", "all-reduces", "measured KB", "formula KB", "measured/formula",
               "step ms", "1 process ms"]
    rows = [[r["model"], _shape(r), r["calls"], f"{r['max_rank'] / 1e3:.1f}",
             f"{r['formula'] / 1e3:.1f}", f"{r['max_rank'] / r['formula']:.3f}",
             f"{r['ms']:.1f}", f"{r['plain_ms']:.1f}"] for r in results]
    print(f"tensor parallel over {WORLD} gloo processes: bytes each rank sends per training step "
          "(forward + backward)")
    print(f"{headers[0]:<20} {headers[1]:<30} {headers[2]:>11} {headers[3]:>11} "
          f"{headers[4]:>10} {headers[5]:>16} {headers[6]:>8} {headers[7]:>12}")
    for row in rows:
        print(f"{row[0]:<20} {row[1]:<30} {row[2]:>11} {row[3]:>11} {row[4]:>10} {row[5]:>16} "
              f"{row[6]:>8} {row[7]:>12}")
    report = Report("Tensor parallelism: bytes per rank per step, counted against the formula",
                    threads=1)
    report.text(f"{WORLD} gloo CPU processes, `--strategy tensor` (DTensor `parallelize_module`: "
                "Q/K/V and the FFN's first layer column-wise, W_o and the second layer "
                "row-wise; LeNet's 400→120→84 head likewise, its convolutions replicated). "
                "Measured: every collective issued in a training step's forward and backward "
                "passes, counted by a dispatch mode, with a ring all-reduce's 2(N-1)/N of its "
                "bytes; the largest rank's. Formula: 4 all-reduces of B·T·d float32 "
                "activations per block (2 forward, 2 backward) × 2(N-1)/N; for LeNet "
                "2(N-1)/N · B·(400+84)·4. Step ms: forward and backward, median of "
                f"{args.repeats}, split over the 2 ranks and the whole model in each process "
                "(both ranks at once), on a shared 2-core machine: indicative only.")
    report.table(headers, rows, align="llrrrrrr")
    report.write(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
